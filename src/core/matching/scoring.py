"""The matching math (docs/architecture.md, "Matching math"), exact and symmetric by
construction.

score(A, B) = c_i·(I_A·I_B) + c_c·(S_A·O_B + O_A·S_B) + c_b·(B_A·B_B)

The blocks are int16-quantised unit vectors (core.embedding.local): every dot product of two of
them is an integer below 2^24 in every partial sum, so float32 BLAS computes it exactly in
any order. The weighted combination is then a fixed sequence of float64 operations on
exact integers. Hence scores are bit-identical however rows are batched, score(A, B) is
bit-identical to score(B, A), and a brute-force oracle reproduces them exactly.

Finding each row's top k does not need every score exactly, only the few near the top.
The engine screens with approximate scores, one float32 product over the packed vector
(query_side · vector), whose error screening_tolerance bounds, and scores exactly only the
candidates the approximation cannot rule out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from core.embedding.vectors import QUANT_SCALE
from core.models import MatchWeights

FloatMatrix = npt.NDArray[np.float64]
IndexMatrix = npt.NDArray[np.int64]
NO_MATCH = -1
EXCLUDED = -np.inf


@dataclass(frozen=True)
class Coefficients:
    """Weights folded with the normalisation, so scores fall in [-1, 1]."""

    interests: float
    complement: float
    bio: float

    @classmethod
    def from_weights(cls, weights: MatchWeights) -> Coefficients:
        denominator = weights.total * float(QUANT_SCALE) ** 2
        return cls(
            weights.interests / denominator,
            weights.complementarity / denominator,
            weights.bio / denominator,
        )


def block_dim(width: int) -> int:
    if width % 4:
        raise ValueError(f"vector width {width} is not four equal blocks")
    return width // 4


def to_blocks(
    vectors: npt.NDArray[np.integer] | npt.NDArray[np.floating],
) -> npt.NDArray[np.float32]:
    """(n, 4d) rows [I | S | O | B] -> (4, n, d) float32, each block C-contiguous so that
    `blocks[b][:n]` feeds BLAS without a copy."""
    n, width = vectors.shape
    d = block_dim(width)
    return np.ascontiguousarray(vectors.reshape(n, 4, d).transpose(1, 0, 2), dtype=np.float32)


def pair_scores(
    query: npt.NDArray[np.float32], target: npt.NDArray[np.float32], coef: Coefficients
) -> FloatMatrix:
    """Scores of every query row against every target row; both in to_blocks() layout."""
    interests = query[0] @ target[0].T
    # S_q·O_t + O_q·S_t: integers below 2^23 each, their float32 sum stays exact.
    complement = query[1] @ target[2].T
    complement += query[2] @ target[1].T
    bio = query[3] @ target[3].T
    return combine(interests, complement, bio, coef)


def query_side(vectors: npt.NDArray[np.float32], coef: Coefficients) -> npt.NDArray[np.float32]:
    """Rows [I | S | O | B] -> [c_i·I | c_c·O | c_c·S | c_b·B], so that query_side(a) · b
    approximates score(a, b) in one float32 product (within screening_tolerance). Each
    element is computed in float64 and rounded to float32 once."""
    d = block_dim(vectors.shape[1])
    blocks = np.r_[0:d, 2 * d : 3 * d, d : 2 * d, 3 * d : 4 * d]  # S and O swap places
    scale = np.repeat([coef.interests, coef.complement, coef.complement, coef.bio], d)
    swapped: npt.NDArray[np.float32] = (vectors[:, blocks] * scale).astype(np.float32)
    return swapped


def screening_tolerance(
    coef: Coefficients, block_norms: npt.NDArray[np.float64], width: int
) -> float:
    """A bound on |approximate - exact| score for vectors whose blocks (I, S, O, B) have
    norms at most block_norms, with `width` = 4d terms per float32 dot product.

    Each query element is rounded to float32 once: relative error u = 2^-24, or, if it
    is subnormal (a tiny weight), absolute error 2^-150. A float32 dot product of n terms,
    in any order, with or without FMA, errs by at most gamma_n · sum|q_j·x_j| with
    gamma_n = n·u / (1 - n·u), plus 2^-150 per product that underflows. By
    Cauchy-Schwarz the sum of |c_j·x_j·y_j| is at most c_i·|I|² + 2·c_c·|S|·|O| +
    c_b·|B|², and the sum of |y_j| at most sqrt(n)·max|block|. Doubled, for margin and
    for the float64 rounding of the exact score itself.
    """
    u = 2.0**-24
    tiny = 2.0**-150
    terms = width
    gamma = terms * u / (1 - terms * u)
    n_i, n_s, n_o, n_b = (float(x) for x in block_norms)
    magnitude = (
        abs(coef.interests) * n_i * n_i
        + 2 * abs(coef.complement) * n_s * n_o
        + abs(coef.bio) * n_b * n_b
    )
    underflow = tiny * (terms + math.sqrt(terms) * max(n_i, n_s, n_o, n_b))
    return 2 * ((gamma * (1 + u) + u) * magnitude + (1 + gamma) * underflow)


def combine(
    interests: npt.NDArray[np.floating],
    complement: npt.NDArray[np.floating],
    bio: npt.NDArray[np.floating],
    coef: Coefficients,
) -> FloatMatrix:
    """The one place the blocks are weighted: a fixed float64 operation order.

    Each product casts its float32 input to float64 inside the ufunc (the same values as
    astype first, without the temporary copies)."""
    score: FloatMatrix = np.multiply(interests, coef.interests, dtype=np.float64)
    term: FloatMatrix = np.multiply(complement, coef.complement, dtype=np.float64)
    score += term
    np.multiply(bio, coef.bio, out=term, dtype=np.float64)
    score += term
    return score


def top_k(
    scores: FloatMatrix, id_rank: npt.NDArray[np.int64], k: int
) -> tuple[IndexMatrix, FloatMatrix]:
    """Per row, the k best columns by (score desc, id_rank asc); EXCLUDED never chosen.

    Returns (columns, scores), padded with NO_MATCH / EXCLUDED where fewer than k exist.
    Ties at the k-th score are common (empty profiles score 0 with everyone), so the
    tie-break is exact rather than whatever argpartition happens to pick.
    """
    rows, cols = scores.shape
    out_idx = np.full((rows, k), NO_MATCH, dtype=np.int64)
    out_val = np.full((rows, k), EXCLUDED, dtype=np.float64)
    take = min(k, cols)
    if rows == 0 or take == 0:
        return out_idx, out_val
    best = np.argpartition(scores, cols - take, axis=1)[:, cols - take :]
    best_vals = np.take_along_axis(scores, best, axis=1)
    threshold = best_vals.min(axis=1)
    # More than `take` scores reach the threshold: a tie at the k-th place, resolved
    # exactly below; otherwise the argpartition set is the answer.
    counts = np.count_nonzero(scores >= threshold[:, None], axis=1)

    simple = np.flatnonzero(counts == take)
    if simple.size:
        cand_cols, cand_vals = best[simple], best_vals[simple]
        order = np.lexsort((id_rank[cand_cols], -cand_vals), axis=-1)
        out_idx[simple, :take] = np.take_along_axis(cand_cols, order, axis=1)
        out_val[simple, :take] = np.take_along_axis(cand_vals, order, axis=1)
    for row in np.flatnonzero(counts != take):  # ties at the threshold: exact order
        tied_cols = np.flatnonzero(scores[row] >= threshold[row])
        tied_vals = scores[row, tied_cols]
        first = np.lexsort((id_rank[tied_cols], -tied_vals))[:take]
        out_idx[row, :take] = tied_cols[first]
        out_val[row, :take] = tied_vals[first]

    excluded = out_val == EXCLUDED
    out_idx[excluded] = NO_MATCH
    return out_idx, out_val


def grouped_top_k(
    groups: npt.NDArray[np.int64],
    items: npt.NDArray[np.int64],
    values: FloatMatrix,
    id_rank: npt.NDArray[np.int64],
    *,
    n_groups: int,
    k: int,
) -> tuple[IndexMatrix, FloatMatrix]:
    """Per group 0..n_groups-1, the k items with the best (value desc, id_rank asc), from
    flat candidate arrays (each item at most once per group); EXCLUDED values (and
    NO_MATCH items) never chosen. Padded with NO_MATCH / EXCLUDED like top_k."""
    out_idx = np.full((n_groups, k), NO_MATCH, dtype=np.int64)
    out_val = np.full((n_groups, k), EXCLUDED, dtype=np.float64)
    keep = (values > EXCLUDED) & (items >= 0)
    groups, items, values = groups[keep], items[keep], values[keep]
    order = np.lexsort((id_rank[items], -values, groups))
    groups, items, values = groups[order], items[order], values[order]
    place = np.arange(groups.size) - np.searchsorted(groups, groups)
    chosen = place < k
    out_idx[groups[chosen], place[chosen]] = items[chosen]
    out_val[groups[chosen], place[chosen]] = values[chosen]
    return out_idx, out_val


def merge_top_k(
    idx: IndexMatrix, val: FloatMatrix, id_rank: npt.NDArray[np.int64], k: int
) -> tuple[IndexMatrix, FloatMatrix]:
    """Best k of each row of small candidate sets (NO_MATCH entries sort last). The same
    choice as grouped_top_k, for sets of one width: sorting along rows is about twice as
    fast here as one flat sort by group, and a newcomer merges into every list."""
    rank_key = np.where(idx >= 0, id_rank[np.maximum(idx, 0)], np.iinfo(np.int64).max)
    order = np.lexsort((rank_key, -val), axis=-1)[:, :k]
    merged_idx = np.take_along_axis(idx, order, axis=1)
    merged_val = np.take_along_axis(val, order, axis=1)
    merged_idx[merged_val == EXCLUDED] = NO_MATCH
    return merged_idx, merged_val

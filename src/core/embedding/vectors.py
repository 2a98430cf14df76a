"""What every embedder's vectors are: four int16 blocks whose float32 dot products are exact.

A profile is four blocks of ``block_dim`` components, in the order of ``BLOCKS``: each
block L2-normalised and quantised to integers in [-QUANT_SCALE, QUANT_SCALE]
(quantize_blocks, which every embedder's output goes through).

Why quantise to int16 with scale 2047
-------------------------------------
A block q = rint(x * 2047) with ||x|| = 1 has ||q|| <= 2047 + 0.5 * sqrt(block_dim)
(triangle inequality; each component is off by at most 0.5), about 2053 for 128 dims. Every
product q_a[i] * q_b[i] is an integer, and every partial sum over any subset of indices is an
integer bounded by ||q_a|| * ||q_b|| (Cauchy-Schwarz), about 4.2e6 < 2**24. float32 represents
all integers up to 2**24 exactly, so a float32 BLAS matmul of quantised blocks performs no
rounding at all, whatever its summation order, blocking, FMA use or thread count. Scores are
therefore bit-reproducible across machines and exactly symmetric (a.b == b.a).
The bound is per block: dot products must be taken block by block, not over the full
concatenated vector (four blocks together could exceed 2**24). Adding two block products
in float32 (as core.matching.scoring does for S_A.O_B + O_A.S_B) is exact while each stays below
2**23, which embed() checks (PAIR_SUM_LIMIT; in practice squared norms are ~4.2e6).

The float stage before quantisation is reproducible too: all feature weights are small
dyadic rationals (multiples of 0.5), so bucket sums and squared norms are exact in float64
in any order, and sqrt, division and rint are correctly rounded IEEE operations.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import numpy.typing as npt

from core.models import Profile

BLOCKS = ("interests", "seeking", "offering", "bio")
QUANT_SCALE = 2047
EXACT_LIMIT = 2**24 - 1  # largest float32 integer range with every integer exact
# core.matching.scoring adds two block products in float32 (S_A.O_B + O_A.S_B); each must stay
# below 2**23 for that sum to be exact too, so embed() enforces this tighter bound.
PAIR_SUM_LIMIT = 2**23 - 1

Int16Matrix = npt.NDArray[np.int16]


def assert_exact_range(
    q: npt.NDArray[np.integer], blocks: int = len(BLOCKS), limit: int = EXACT_LIMIT
) -> None:
    """Raise ValueError unless float32 dot products of q's blocks are guaranteed exact.

    q has shape (n, blocks * block_dim) (or (blocks * block_dim,)). Checks the actual
    quantised values, so rounding in quantisation is accounted for: if every block's
    squared norm is at most ``limit`` (default 2**24 - 1), every partial sum of a block dot
    product is an integer of at most that magnitude (Cauchy-Schwarz) and float32 represents
    it exactly.
    """
    matrix = np.asarray(q)
    if matrix.ndim == 1:
        matrix = matrix[np.newaxis, :]
    if matrix.ndim != 2 or matrix.shape[1] % blocks != 0:
        raise ValueError(f"expected shape (n, {blocks} * block_dim), got {matrix.shape}")
    if not np.issubdtype(matrix.dtype, np.integer):
        raise ValueError(f"expected an integer array, got dtype {matrix.dtype}")
    wide = matrix.astype(np.int64).reshape(matrix.shape[0], blocks, matrix.shape[1] // blocks)
    squared_norms = np.einsum("nbd,nbd->nb", wide, wide)
    if squared_norms.size and int(squared_norms.max()) > limit:
        raise ValueError(
            f"block squared norm {int(squared_norms.max())} exceeds {limit}: "
            "float32 dot products would not be exact"
        )


def quantize_blocks(dense: npt.NDArray[np.floating]) -> Int16Matrix:
    """(n, blocks, d) real vectors -> (n, blocks * d) int16: each block L2-normalised, then
    scaled by QUANT_SCALE and rounded (the exactness argument in the module docstring).
    Every embedder's output goes through here."""
    n, n_blocks, d = dense.shape
    values = dense.astype(np.float64, copy=False)
    norms = np.sqrt(np.einsum("nbd,nbd->nb", values, values))[..., np.newaxis]
    # An empty block (or one whose features cancel exactly) stays all zeros.
    unit = np.divide(values, norms, out=np.zeros_like(values), where=norms > 0)
    quantised: Int16Matrix = np.rint(unit * QUANT_SCALE).astype(np.int16).reshape(n, n_blocks * d)
    assert_exact_range(quantised, limit=PAIR_SUM_LIMIT)
    return quantised


def content_hash(profile: Profile) -> str:
    """SHA-256 (hex) of the matching-relevant fields, in canonical JSON.

    Name and company are excluded: neither changes the embedding (company exclusion is
    applied by the engine). Tag order is kept, since it is part of what the user entered.
    """
    payload = {
        "title": profile.title,
        "bio": profile.bio,
        "interests": list(profile.interests),
        "seeking": list(profile.seeking),
        "offering": list(profile.offering),
    }
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

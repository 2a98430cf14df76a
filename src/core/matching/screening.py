"""Screening: each row's exact top k among many columns, scoring exactly only the few
columns an approximation cannot rule out.

The approximate scores of a whole chunk come from one float32 product, query_side(A) · x_B
(core.matching.scoring), within `tol` (scoring.screening_tolerance) of the exact ones.
From them, per row: a first threshold from a sample of columns, the k-th best survivor,
and the columns within 2·tol of it, which are then scored exactly pair by pair. The proof
that nothing of the exact top k is lost is in screen()'s docstring.

Pure numpy: the scorer (the engine's EventState) supplies the vectors' exclusions and
exact scores; nothing here reads the database.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

from core.matching.scoring import EXCLUDED, FloatMatrix, top_k

# The k-th best approximate score among this many columns is each row's first threshold;
# a row left with more candidates than WIDE_TIE (many equal scores, e.g. an empty
# profile) is scored exactly in full instead.
SCREEN_SAMPLE = 512
WIDE_TIE = 64


class Scorer(Protocol):
    """What screening needs of the event it screens (core.matching.engine.EventState)."""

    k: int
    screen_sample: int
    matchable: npt.NDArray[np.bool_]

    @property
    def tolerance(self) -> float: ...

    @property
    def id_rank(self) -> npt.NDArray[np.int64]: ...

    def excluded(
        self, a: npt.NDArray[np.int64], b: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.bool_]: ...

    def excluded_block(
        self, rows: npt.NDArray[np.int64], cols: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.bool_]: ...

    def scores_of_pairs(
        self, a: npt.NDArray[np.int64], b: npt.NDArray[np.int64]
    ) -> FloatMatrix: ...

    def exact_block(
        self,
        rows: npt.NDArray[np.int64],
        cols: npt.NDArray[np.int64],
        targets: npt.NDArray[np.float32],
    ) -> FloatMatrix: ...


def screen(
    scorer: Scorer,
    approx: npt.NDArray[np.float32],
    rows: npt.NDArray[np.int64],
    cols: npt.NDArray[np.int64],
    targets: npt.NDArray[np.float32],
    *,
    floor: FloatMatrix | None = None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], FloatMatrix]:
    """The pairs (position in rows, column) that may be in a row's top k among `cols`,
    with their exact scores. `approx` holds the rows' approximate scores against cols
    (within `tol` of the exact ones); `floor`, an exact score each row's top k already
    reaches elsewhere (lists merged later), or None.

    Why nothing is missed: let A be a row's k-th best approximate score and S its
    k-th best exact one (exclusions apart). Fewer than k columns score above S
    exactly, so fewer than k above S + tol approximately: A <= S + tol. A column of
    the exact top k scores at least S, so approximately at least S - tol >= A - 2tol.
    The k-th best of any subset of columns is at most A, so it serves as a first
    threshold that is cheap to find; the k-th best among its survivors is then A.
    """
    k, tol = scorer.k, scorer.tolerance
    n_rows, n_cols = approx.shape
    # The sample: the first matchable columns (a column that cannot match would only
    # make the threshold useless). A row with fewer than k allowed among them (its
    # colleagues came first) tries a sample four times larger, and so on.
    matchable = np.flatnonzero(scorer.matchable[cols])
    lower = np.full(n_rows, EXCLUDED)
    pending, size = np.arange(n_rows), scorer.screen_sample
    while pending.size:
        sampled = matchable[:size]
        if sampled.size >= k:
            sample = approx[np.ix_(pending, sampled)].astype(np.float64)
            sample[scorer.excluded_block(rows[pending], cols[sampled])] = EXCLUDED
            kth = np.partition(sample, sampled.size - k, axis=1)[:, sampled.size - k]
            lower[pending] = kth - 2 * tol
        if sampled.size == matchable.size:
            break
        pending, size = pending[lower[pending] == EXCLUDED], 4 * size
    if floor is not None:
        lower = np.maximum(lower, floor - tol)
    flat = np.flatnonzero(approx >= float32_below(lower)[:, None])
    at, col = np.divmod(flat, n_cols)
    near = approx.reshape(-1)[flat]
    allowed = ~scorer.excluded(rows[at], cols[col])
    at, col, near = at[allowed], col[allowed], near[allowed]

    # The k-th best approximate score among the survivors is the row's own: keep
    # what is within 2tol of it.
    order = np.lexsort((-near, at))
    place = np.arange(at.size) - np.searchsorted(at[order], at[order])
    kth = np.full(n_rows, EXCLUDED)
    at_k = order[place == k - 1]
    kth[at[at_k]] = near[at_k]
    keep = near >= np.maximum(kth - 2 * tol, lower)[at]
    at, col = at[keep], col[keep]

    # A wide tie leaves many candidates: such rows are scored exactly in full (cheaper
    # than pair by pair), the others pair by pair.
    wide = np.flatnonzero(np.bincount(at, minlength=n_rows) > WIDE_TIE)
    narrow = ~np.isin(at, wide)
    at, col = at[narrow], col[narrow]
    found = cols[col]
    exact = scorer.scores_of_pairs(rows[at], found)
    if wide.size:
        scores = scorer.exact_block(rows[wide], cols, targets)
        best, values = top_k(scores, scorer.id_rank[cols], k)
        chosen = best >= 0
        at = np.concatenate([at, np.repeat(wide, k).reshape(-1, k)[chosen]])
        found = np.concatenate([found, cols[best[chosen]]])
        exact = np.concatenate([exact, values[chosen]])
    return at, found, exact


def float32_below(values: FloatMatrix) -> npt.NDArray[np.float32]:
    """The largest float32 at or below each value: comparing float32 scores with it keeps
    every score a float64 comparison would keep."""
    rounded = values.astype(np.float32)
    too_high = rounded > values
    rounded[too_high] = np.nextafter(rounded[too_high], np.float32(-np.inf))
    return rounded

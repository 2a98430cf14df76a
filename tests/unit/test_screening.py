"""Screened top-k (core.matching.engine): approximate scores pick the candidates, exact scores
decide. Checked against a brute-force sort of exact scores on vectors made for near-ties:
score gaps far below the float32 error of the approximate product, wide exact ties, and
exclusions, with thresholds from samples of every size."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.matching import engine, screening
from core.matching.engine import EventState
from core.matching.scoring import (
    EXCLUDED,
    NO_MATCH,
    Coefficients,
    grouped_top_k,
    pair_scores,
    query_side,
    screening_tolerance,
    to_blocks,
)
from core.models import EventRecord, EventSettings, MatchWeights, MemberRow

D = 8  # block width of the made-up vectors
# Components that make near-ties: big values whose products differ by a few units.
COMPONENTS = [0, 1, -1, 2, 1000, 1001, -1000, 1447, 1448, 2047, -2047]


def made_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    """int16 rows of 4 blocks, each block's norm at most 2047 (like quantised unit
    vectors); some rows share one vector (exact ties), some are empty (ties with all)."""
    v = rng.choice(COMPONENTS, size=(n, 4, D)).astype(np.float64)
    v[rng.random((n, 4, D)) < 0.6] = 0
    norms = np.linalg.norm(v, axis=2, keepdims=True)
    v = np.where(norms > 2047, np.trunc(v * 2047 / np.maximum(norms, 1)), v)
    v = v.reshape(n, 4 * D).astype(np.int16)
    copies = rng.integers(0, n, size=n // 4)
    v[copies] = v[rng.integers(0, n, size=copies.size)]
    v[rng.integers(0, n, size=max(1, n // 10))] = 0
    return v


def make_state(
    vectors: np.ndarray,
    companies: list[str],
    k: int,
    weights: MatchWeights,
    rng: np.random.Generator,
    active: list[bool] | None = None,
) -> EventState:
    event = EventRecord(1, "screen", "screen", EventSettings(k=k, weights=weights))
    user_numbers = rng.permutation(len(vectors))  # user_id order differs from row order
    active = active or [True] * len(vectors)
    members = [
        MemberRow(i + 1, f"u{user_numbers[i]:05d}", active[i], company, [], [], [], row.tobytes())
        for i, (row, company) in enumerate(zip(vectors, companies, strict=True))
    ]
    return EventState.from_members(event, "test", vectors.shape[1], members)


def brute_lists(
    state: EventState, rows: np.ndarray, cols: np.ndarray, dismissed: set[tuple[int, int]]
) -> list[list[tuple[str, float]]]:
    """Each row's top k among cols by a plain sort of exact scores (desc, user_id asc)."""
    vectors = state.vectors[: state.n].astype(np.int16)
    scores = pair_scores(to_blocks(vectors[rows]), to_blocks(vectors[cols]), state.coef)
    out = []
    for i, r in enumerate(rows.tolist()):
        allowed = [
            (state.user_ids[c], float(scores[i, j]))
            for j, c in enumerate(cols.tolist())
            if c != r
            and state.matchable[c]
            and (r, c) not in dismissed
            and not (state.company[r] >= 0 and state.company[r] == state.company[c])
        ]
        out.append(sorted(allowed, key=lambda item: (-item[1], item[0]))[: state.k])
    return out


def as_lists(state: EventState, idx: np.ndarray, val: np.ndarray) -> list[list[tuple[str, float]]]:
    return [
        [(state.user_ids[c], float(v)) for c, v in zip(ri, rv, strict=True) if c != NO_MATCH]
        for ri, rv in zip(idx.tolist(), val.tolist(), strict=True)
    ]


weights_strategy = st.builds(
    MatchWeights,
    interests=st.sampled_from([1.0, 0.3, 1e-3]),
    complementarity=st.sampled_from([1.0, 0.999, 0.0]),
    bio=st.sampled_from([0.5, 1.0001, 7.3]),
)


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(2, 90),
    k=st.integers(1, 5),
    weights=weights_strategy,
    sample=st.sampled_from([1, 2, 3, 7, screening.SCREEN_SAMPLE]),
    wide_tie=st.sampled_from([1, 4, screening.WIDE_TIE]),
    chunk=st.sampled_from([1, 50, 1_000, engine.CHUNK_ELEMENTS]),  # 1 to all rows a chunk
    exact_rows=st.sampled_from([0, 2, engine.EXACT_CHUNK_ROWS]),
)
def test_screened_top_k_equals_a_full_exact_sort(
    seed, n, k, weights, sample, wide_tie, chunk, exact_rows
):
    """Some attendees left (not matchable: never listed, never scored as a batch)."""
    rng = np.random.default_rng(seed)
    vectors = made_vectors(rng, n)
    companies = [str(c) if c < 3 else "" for c in rng.integers(0, 8, size=n)]
    active = (rng.random(n) > 0.15).tolist()
    state = make_state(vectors, companies, k, weights, rng, active)
    state.screen_sample, state.chunk_elements = sample, chunk
    dismissed: set[tuple[int, int]] = set()
    for a, b in rng.integers(0, n, size=(n // 5, 2)).tolist():
        if a != b:
            state.dismissed.setdefault(a, set()).add(b)
            state.dismissed.setdefault(b, set()).add(a)
            dismissed |= {(a, b), (b, a)}
    everyone = np.arange(n)
    matchable = everyone[state.matchable[:n]]
    with (
        mock.patch.object(screening, "WIDE_TIE", wide_tie),
        mock.patch.object(engine, "EXACT_CHUNK_ROWS", exact_rows),
    ):
        # Every row against every row (a full rebuild)...
        idx, val = state.rank_everyone()
        assert as_lists(state, idx[matchable], val[matchable]) == brute_lists(
            state, matchable, everyone, dismissed
        )
        assert (idx[~state.matchable[:n]] == NO_MATCH).all()
        # ...and a batch: its own lists, and everyone else's best k among the batch.
        claimed = rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False)
        prepared = state.prepare([int(state.profile_ids[r]) for r in claimed])
    batch = np.sort(claimed[state.matchable[claimed]])
    assert prepared.batch.tolist() == batch.tolist()
    assert as_lists(state, prepared.batch_idx, prepared.batch_val) == brute_lists(
        state, batch, everyone, dismissed
    )
    if not batch.size:  # everyone claimed has left: nothing to score
        assert prepared.others.size == 0
        return
    assert prepared.others.tolist() == [r for r in matchable.tolist() if r not in set(batch)]
    assert as_lists(state, prepared.cand_idx, prepared.cand_val) == brute_lists(
        state, prepared.others, batch, dismissed
    )


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), weights=weights_strategy)
def test_approximate_scores_stay_within_the_tolerance(seed, weights):
    rng = np.random.default_rng(seed)
    vectors = made_vectors(rng, 200)
    coef = Coefficients.from_weights(weights)
    blocks = to_blocks(vectors)
    exact = pair_scores(blocks, blocks, coef)
    approx = query_side(vectors.astype(np.float32), coef) @ vectors.astype(np.float32).T
    norms = np.linalg.norm(vectors.reshape(200, 4, D).astype(np.float64), axis=2).max(axis=0)
    tolerance = screening_tolerance(coef, norms, 4 * D)
    assert np.abs(approx - exact).max() <= tolerance
    # Loose enough to be safe, tight enough to screen: a real 512-wide embedding's bound
    # stays far below the score gaps that matter.
    full_norms = np.full(4, 2053.0)
    assert screening_tolerance(Coefficients.from_weights(MatchWeights()), full_norms, 512) < 1e-4


def test_grouped_top_k_orders_by_value_then_rank_and_skips_excluded():
    groups = np.array([0, 0, 0, 0, 1, 1, 2])
    items = np.array([5, 3, 4, 2, 1, NO_MATCH, 0])
    values = np.array([0.5, 0.7, 0.7, EXCLUDED, 0.1, 0.9, EXCLUDED])
    id_rank = np.array([0, 1, 2, 9, 8, 7])  # item 4 ranks before item 3
    idx, val = grouped_top_k(groups, items, values, id_rank, n_groups=4, k=2)
    assert idx.tolist() == [[4, 3], [1, NO_MATCH], [NO_MATCH, NO_MATCH], [NO_MATCH, NO_MATCH]]
    assert val[0].tolist() == [0.7, 0.7]
    assert val[1, 0] == pytest.approx(0.1) and val[1, 1] == EXCLUDED


def near_ties(rng: np.random.Generator, n: int, weights: MatchWeights) -> np.ndarray:
    """Row 0 and n columns of unrelated make-up whose exact scores all lie within about
    one unit of one value: each column's interest block is completed (a coarse and a fine
    axis against the row's 900 and 1) to the same weighted total, and what remains is a
    fraction of a unit, ~1e-9, far below the float32 error of the approximate product."""
    v = np.zeros((n + 1, 4 * D), dtype=np.int64)
    v[0] = rng.integers(-400, 400, 4 * D)
    v[0, 0], v[0, 1] = 1, 900
    v[1:, 2:] = rng.integers(-150, 150, (n, 4 * D - 2))
    row = v[0]
    target = None
    for col in v[1:]:
        complement = row[D : 2 * D] @ col[2 * D : 3 * D] + row[2 * D : 3 * D] @ col[D : 2 * D]
        total = (
            weights.interests * (row[:D] @ col[:D])
            + weights.complementarity * complement
            + weights.bio * (row[3 * D :] @ col[3 * D :])
        )
        target = total + weights.interests * 50_000 if target is None else target
        units = (target - total) / weights.interests
        col[1] = np.floor(units / 900)
        col[0] = round(units - col[1] * 900)
    return v.astype(np.int16)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("sample", [7, screening.SCREEN_SAMPLE])  # a few columns, or all
def test_score_gaps_below_float32_resolution_are_ranked_exactly(seed, sample):
    """The approximate product misorders these columns (checked: for some k its top k
    misses a member of the exact top k), yet the lists come out in exact order."""
    rng = np.random.default_rng(seed)
    weights = MatchWeights(interests=1.0, complementarity=0.7, bio=0.45)
    vectors = near_ties(rng, 300, weights)
    approx = query_side(vectors[:1].astype(np.float32), Coefficients.from_weights(weights))
    approx = (approx @ vectors[1:].astype(np.float32).T)[0]
    exact = pair_scores(
        to_blocks(vectors[:1]), to_blocks(vectors[1:]), Coefficients.from_weights(weights)
    )[0]
    misses = 0
    for k in (1, 3, 5):
        kth_exact, kth_approx = np.sort(exact)[-k], np.sort(approx)[-k]
        misses += int(np.sum((exact >= kth_exact) & (approx < kth_approx)))
        state = make_state(vectors, [""] * len(vectors), k, weights, rng)
        state.screen_sample = sample
        everyone = np.arange(len(vectors))
        idx, val = state._candidates(everyone[:1], everyone)
        assert as_lists(state, idx, val) == brute_lists(state, everyone[:1], everyone, set())
    assert misses > 0


@settings(max_examples=50, deadline=None)
@given(
    first=st.lists(st.text("abcxyz", min_size=1, max_size=4), min_size=1, max_size=30, unique=True),
    later=st.lists(
        st.lists(st.text("abcxyz", min_size=1, max_size=4), max_size=80, unique=True), max_size=4
    ),
)
def test_id_rank_stays_the_user_id_order_as_rows_arrive(first, later):
    """Newcomers are ranked by insertion (up to RANK_INSERTIONS at a time), bigger
    arrivals by a sort; either way id_rank is each row's place in user_id order."""
    event = EventRecord(1, "rank", "rank", EventSettings())
    state = EventState(event, "test", 4 * D)
    seen: set[str] = set()
    for arrivals in [first, *later]:
        fresh = [u for u in arrivals if u not in seen]
        seen.update(fresh)
        state.load_members(
            [
                MemberRow(len(state.user_ids) + i + 1, u, True, "", [], [], [], None)
                for i, u in enumerate(fresh)
            ]
        )
        ordered = sorted(state.user_ids)
        assert state.id_rank.tolist() == [ordered.index(u) for u in state.user_ids]


@pytest.mark.parametrize("exact_rows", [0, engine.EXACT_CHUNK_ROWS])
def test_empty_profiles_only_still_respect_exclusions(exact_rows):
    """Every vector zero: every score is 0 and the tolerance next to nothing, yet
    colleagues and dismissed pairs stay off the lists, and ties go by user_id."""
    rng = np.random.default_rng(5)
    n = 40
    vectors = np.zeros((n, 4 * D), dtype=np.int16)
    # The batch is rows 0-9; all but row 0 work at acme, like the others 10-19.
    companies = ["" if i == 0 or i >= 20 else "acme" for i in range(n)]
    state = make_state(vectors, companies, 3, MatchWeights(), rng)
    assert state.tolerance < 1e-40
    state.dismissed = {0: {2}, 2: {0}}
    everyone = np.arange(n)
    with mock.patch.object(engine, "EXACT_CHUNK_ROWS", exact_rows):
        prepared = state.prepare([int(state.profile_ids[r]) for r in range(10)])
    dismissed = {(0, 2), (2, 0)}
    batch = everyone[:10]
    assert as_lists(state, prepared.batch_idx, prepared.batch_val) == brute_lists(
        state, batch, everyone, dismissed
    )
    assert as_lists(state, prepared.cand_idx, prepared.cand_val) == brute_lists(
        state, prepared.others, batch, dismissed
    )


@pytest.mark.parametrize("bio", [1e-37, 1e-41])
def test_a_weight_so_small_its_scores_are_subnormal_in_float32(bio):
    """Only the bio blocks are non-zero and their weight is tiny: the approximate scores
    are float32 subnormals, with a large relative error, which the tolerance must still
    cover (a review found the relative-only bound missed it)."""
    rng = np.random.default_rng(11)
    n = 300
    vectors = np.zeros((n, 4 * D), dtype=np.int16)
    vectors[:, 3 * D :] = rng.integers(300, 700, size=(n, D))
    weights = MatchWeights(interests=1.0, complementarity=0.0, bio=bio)
    state = make_state(vectors, [""] * n, 3, weights, rng)
    state.chunk_elements = 100 * n  # chunks of 100 rows: screened, with floors
    everyone = np.arange(n)
    with mock.patch.object(engine, "EXACT_CHUNK_ROWS", 0):
        prepared = state.prepare([int(state.profile_ids[r]) for r in range(150)])
    batch = everyone[:150]
    assert as_lists(state, prepared.batch_idx, prepared.batch_val) == brute_lists(
        state, batch, everyone, set()
    )
    assert as_lists(state, prepared.cand_idx, prepared.cand_val) == brute_lists(
        state, prepared.others, batch, set()
    )


def test_colleagues_filling_the_sample_widen_it():
    """The first 600 attendees work at one company: for them the first sample (512
    columns) holds nobody they may meet. The sample grows instead of letting every pair
    through the screen, and lists stay exact."""
    rng = np.random.default_rng(3)
    n = 900
    vectors = made_vectors(rng, n)
    vectors[:, :D] = rng.integers(-600, 600, size=(n, D))  # scores spread: few ties
    companies = ["acme" if i < 600 else "" for i in range(n)]
    state = make_state(vectors, companies, 3, MatchWeights(), rng)
    screened_pairs = []
    real_excluded = EventState.excluded

    def counting(self, a, b):
        screened_pairs.append(np.broadcast(a, b).size)
        return real_excluded(self, a, b)

    everyone = np.arange(n)
    with mock.patch.object(EventState, "excluded", counting):
        idx, val = state.rank_everyone()
    assert as_lists(state, idx, val) == brute_lists(state, everyone, everyone, set())
    assert sum(screened_pairs) < 0.1 * n * n  # not every acme row's 900 pairs

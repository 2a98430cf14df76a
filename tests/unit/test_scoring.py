"""The matching math: exact, symmetric, batch-invariant scores and exact top-k."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from core.embedding.local import LocalEmbedder
from core.matching.scoring import (
    EXCLUDED,
    NO_MATCH,
    Coefficients,
    merge_top_k,
    pair_scores,
    to_blocks,
    top_k,
)
from core.models import MatchWeights, Profile
from tooling.synthetic import generate_profiles


def brute_top_k(row: np.ndarray, id_rank: np.ndarray, k: int) -> list[int]:
    allowed = [j for j in range(row.size) if row[j] != EXCLUDED]
    return sorted(allowed, key=lambda j: (-row[j], id_rank[j]))[:k]


@settings(max_examples=200, deadline=None)
@given(
    scores=arrays(
        np.int8, st.tuples(st.integers(1, 6), st.integers(1, 12)), elements=st.integers(-3, 3)
    ),
    k=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_top_k_matches_a_full_sort_even_with_ties_and_exclusions(scores, k, seed):
    """Small integer scores make ties the rule; -3 stands for an excluded pair."""
    rng = np.random.default_rng(seed)
    values = np.where(scores == -3, EXCLUDED, scores.astype(np.float64))
    id_rank = rng.permutation(values.shape[1]).astype(np.int64)
    idx, val = top_k(values, id_rank, k)
    for r in range(values.shape[0]):
        expected = brute_top_k(values[r], id_rank, k)
        got = [int(j) for j in idx[r] if j != NO_MATCH]
        assert got == expected
        assert list(val[r, : len(expected)]) == [values[r, j] for j in expected]
        assert all(v == EXCLUDED for v in val[r, len(expected) :])


@settings(max_examples=100, deadline=None)
@given(
    candidates=arrays(
        np.int8, st.tuples(st.integers(1, 5), st.integers(1, 8)), elements=st.integers(-1, 4)
    ),
    k=st.integers(1, 4),
)
def test_merge_top_k_keeps_the_best_k_of_each_candidate_set(candidates, k):
    n_cols = candidates.shape[1]
    id_rank = np.arange(n_cols, dtype=np.int64)[::-1].copy()  # reversed: rank is not index
    idx = np.tile(np.arange(n_cols, dtype=np.int64), (candidates.shape[0], 1))
    val = np.where(candidates < 0, EXCLUDED, candidates.astype(np.float64))
    idx = np.where(candidates < 0, NO_MATCH, idx)
    merged_idx, _ = merge_top_k(idx, val, id_rank, k)
    for r in range(candidates.shape[0]):
        expected = brute_top_k(val[r], id_rank, k)
        assert [int(j) for j in merged_idx[r] if j != NO_MATCH] == expected


def _vectors(n: int) -> np.ndarray:
    return LocalEmbedder().embed(generate_profiles(n, seed=3)).astype(np.float32)


def test_scores_are_exact_integer_combinations():
    """float32 BLAS on quantised blocks gives the same bits as int64 arithmetic."""
    m = _vectors(300)
    coef = Coefficients.from_weights(MatchWeights(interests=0.7, complementarity=1.3, bio=0.4))
    got = pair_scores(to_blocks(m), to_blocks(m), coef)
    q = m.astype(np.int64)
    d = q.shape[1] // 4
    interests = q[:, :d] @ q[:, :d].T
    complement = q[:, d : 2 * d] @ q[:, 2 * d : 3 * d].T + q[:, 2 * d : 3 * d] @ q[:, d : 2 * d].T
    bio = q[:, 3 * d :] @ q[:, 3 * d :].T
    expected = (
        interests.astype(np.float64) * coef.interests
        + complement.astype(np.float64) * coef.complement
        + bio.astype(np.float64) * coef.bio
    )
    assert np.array_equal(got, expected)


def test_scores_are_bitwise_symmetric_and_batch_invariant():
    m = _vectors(400)
    coef = Coefficients.from_weights(MatchWeights())
    b = to_blocks(m)
    full = pair_scores(b, b, coef)
    assert np.array_equal(full, full.T)
    chunked = np.vstack([pair_scores(b[:, i : i + 37], b, coef) for i in range(0, 400, 37)])
    assert np.array_equal(full, chunked)
    single = np.vstack([pair_scores(b[:, i : i + 1], b, coef) for i in range(0, 400, 53)])
    assert np.array_equal(full[::53], single)
    assert np.all(np.abs(full) <= 1.0 + 1e-9)


def test_complementarity_rewards_two_way_seek_offer():
    """A founder seeking funding scores higher with an investor offering it than with a
    profile that shares nothing."""
    founder = Profile(user_id="f", seeking=["seed funding"], offering=["equity"])
    investor = Profile(user_id="i", seeking=["equity"], offering=["seed funding"])
    stranger = Profile(user_id="s", seeking=["gardening tips"], offering=["poetry"])
    m = LocalEmbedder().embed([founder, investor, stranger]).astype(np.float32)
    s = pair_scores(to_blocks(m), to_blocks(m), Coefficients.from_weights(MatchWeights()))
    assert s[0, 1] > 0.3
    assert s[0, 1] > s[0, 2]

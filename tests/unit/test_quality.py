"""Unit tests for the planted-truth generator (tooling.planted) and the list metrics of
`matchmaker eval` (tooling.quality) on hand-made lists. The Gini and the most-listed count
come from the event status and are tested on a real database in
tests/integration/test_eval.py."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from core.embedding.text import phrase_key, stems
from core.models import Profile
from tooling.planted import (
    CONCEPT_FORMS,
    HUB_INTERESTS,
    TOPIC_FORMS,
    generate_planted,
    relevance_base_rate,
)
from tooling.quality import (
    ModeResult,
    SizeComparison,
    Spread,
    Truth,
    changed_lists,
    coverage,
    format_comparison,
    generic_share_of_most_listed,
    most_listed,
    precision_at_k,
    precision_naming,
    spread,
)


def words_of(profile: Profile) -> set[str]:
    """Every stem the embedder could see in the profile (tags, title, bio)."""
    text = " ".join(
        [profile.title, profile.bio, *profile.interests, *profile.seeking, *profile.offering]
    )
    return set(stems(text))


# --- the generator --------------------------------------------------------------------------


def test_deterministic_by_seed_and_nested() -> None:
    first, again = generate_planted(400, seed=3), generate_planted(400, seed=3)
    assert first.profiles == again.profiles
    assert first.latent == again.latent
    assert generate_planted(400, seed=4).profiles != first.profiles
    # Newcomers of an evaluation are the next attendees of the same stream.
    assert generate_planted(150, seed=3).profiles == first.profiles[:150]
    assert [p.user_id for p in first.profiles[:2]] == ["planted-000000", "planted-000001"]


def test_profiles_are_valid_and_name_no_latent_label() -> None:
    event = generate_planted(500, seed=1)
    for profile, person in zip(event.profiles, event.latent, strict=True):
        assert Profile.model_validate(profile.model_dump()) == profile
        assert profile.interests and profile.seeking and profile.offering
        # The latent concept names are not surface words (e.g. no tag "dealflow").
        tags = {phrase_key(t) for t in (*profile.seeking, *profile.offering)}
        assert not tags & {phrase_key(c) for c in ("dealflow", "solutions", "engineering")}
        assert person.seeks and person.offers and person.topics


def test_truth_is_symmetric_and_follows_its_definition() -> None:
    event = generate_planted(300, seed=2)
    n = len(event.latent)
    a, b = np.array(list(itertools.product(range(n), repeat=2))).T
    truth = event.relevant_pairs(a, b)
    assert np.array_equal(truth.reshape(n, n), truth.reshape(n, n).T)
    assert not truth.reshape(n, n).diagonal().any()
    for i, j in list(zip(a, b, strict=True))[:: n + 7]:
        x, y = event.latent[i], event.latent[j]
        expected = (
            i != j
            and bool((x.seeks & y.offers) or (y.seeks & x.offers))
            and bool(x.topics & y.topics)
        )
        assert event.relevant(int(i), int(j)) == expected
    rate = truth.mean()
    assert 0.02 < rate < 0.2  # a minority of pairs, but everyone has relevant people
    assert truth.reshape(n, n).sum(axis=1).min() >= 1
    assert relevance_base_rate(event, samples=100_000) == pytest.approx(rate, abs=0.01)


def test_truth_is_not_derivable_from_the_words() -> None:
    """Synonyms: relevant pairs that share no stem at all; hub words: irrelevant pairs
    that share several."""
    event = generate_planted(600, seed=5)
    words = [words_of(p) for p in event.profiles]
    relevant_disjoint = irrelevant_overlapping = 0
    for i, j in itertools.combinations(range(len(words)), 2):
        shared = len(words[i] & words[j])
        if event.relevant(i, j) and shared == 0:
            relevant_disjoint += 1
        if not event.relevant(i, j) and shared >= 4:
            irrelevant_overlapping += 1
    assert relevant_disjoint > 0
    assert irrelevant_overlapping > 0


def test_vocabulary_has_synonyms_related_terms_and_hubs() -> None:
    for forms in (*CONCEPT_FORMS.values(), *TOPIC_FORMS.values()):
        assert len(forms) >= 4
        # Several surface forms with different stems per concept.
        assert len({phrase_key(f) for f in forms}) == len(forms)
    # Related concepts share a word: engineering and design talent, clean energy and
    # energy storage, cybersecurity's privacy and food security.
    assert "talent" in " ".join(CONCEPT_FORMS["engineering"] + CONCEPT_FORMS["design"])
    assert any("energy" in f for f in TOPIC_FORMS["climate"])
    assert any("energy" in f for f in TOPIC_FORMS["mobility"])
    event = generate_planted(1000, seed=6)
    hub_users = sum(1 for p in event.profiles if set(p.interests) & set(HUB_INTERESTS))
    generic = sum(1 for person in event.latent if person.generic)
    assert 0.05 < generic / 1000 < 0.25
    assert hub_users > generic  # hub words are used beyond the generic profiles


def test_negative_size_rejected() -> None:
    with pytest.raises(ValueError, match="n must be"):
        generate_planted(-1)


# --- metrics on hand-made lists -------------------------------------------------------------


def pair_truth(relevant: set[tuple[int, int]]) -> Truth:
    def truth(a: NDArray[Any], b: NDArray[Any]) -> NDArray[Any]:
        return np.array([(int(x), int(y)) in relevant for x, y in zip(a, b, strict=True)])

    return truth


def test_precision_on_known_lists() -> None:
    relevant = {(0, 1), (0, 2), (1, 0), (2, 3)}
    lists = {0: [1, 2, 3], 1: [0, 2, 3], 2: [3], 3: []}
    # Owner 0: 2/3, owner 1: 1/3, owner 2: 1/1; owner 3 has no list and is not averaged.
    assert precision_at_k(lists, pair_truth(relevant)) == pytest.approx((2 / 3 + 1 / 3 + 1) / 3)
    assert precision_at_k({0: [], 1: []}, pair_truth(relevant)) is None
    assert precision_at_k({0: [3]}, pair_truth(relevant)) == 0.0


def test_coverage_counts_people_listed_at_least_once() -> None:
    assert coverage({0: [1, 2], 1: [2, 0], 2: [1, 0], 3: [0, 1]}, 4) == pytest.approx(0.75)
    assert coverage({0: [1], 1: [0]}, 2) == 1.0
    assert coverage({}, 0) is None


def test_churn_counts_exactly_the_lists_that_changed() -> None:
    before = {1: [2, 3], 2: [1, 3], 3: [1, 2], 4: [1, 2]}
    after = {
        1: [2, 3],  # same
        2: [3, 1],  # same members, new order: changed
        3: [1, 9],  # the newcomer entered: changed
        4: [1, 2],  # same
        9: [3, 1],  # the newcomer's own list: not an existing list
    }
    assert changed_lists(before, after) == 2
    assert changed_lists(before, {k: v for k, v in after.items() if k != 4}) == 3  # gone
    assert changed_lists(before, before) == 0


def test_generic_share_of_the_most_listed() -> None:
    lists = {0: [1, 2], 1: [2, 3], 2: [1, 3], 3: [2, 0]}  # 2: 3 times, 1 and 3: twice, 0: once
    generic = [True, False, True, True]
    assert generic_share_of_most_listed(lists, generic, 1) == 1.0  # attendee 2
    assert generic_share_of_most_listed(lists, generic, 2) == 0.5  # 2, then 1 (tie by index)
    assert generic_share_of_most_listed(lists, generic, 4) == 0.75
    assert generic_share_of_most_listed({}, generic, 1) is None


def test_precision_of_entries_naming_the_most_listed() -> None:
    lists = {0: [1, 2], 1: [2, 3], 2: [1, 3], 3: [2, 0]}
    truth = pair_truth({(0, 2), (3, 2), (0, 1)})
    assert most_listed(lists, 2) == [2, 1]
    # Entries naming 2: (0,2) (1,2) (3,2): two relevant.
    assert precision_naming(lists, truth, {2}) == pytest.approx(2 / 3)
    # Entries naming 1 or 2: (0,1) (0,2) (1,2) (2,1) (3,2): three relevant.
    assert precision_naming(lists, truth, {1, 2}) == pytest.approx(3 / 5)
    assert precision_naming(lists, truth, {7}) is None


def test_spread() -> None:
    assert spread([]) is None
    summary = spread([0, 1, 2, 3, 10])
    assert summary is not None
    assert (summary.mean, summary.max) == (3.2, 10)
    assert summary.p95 == pytest.approx(np.percentile([0, 1, 2, 3, 10], 95))


def test_table_puts_modes_side_by_side() -> None:
    def result(mode: str, gini: float, drain_s: float) -> ModeResult:
        return ModeResult(
            mode=mode,
            attendees=1000,
            k=3,
            drain_s=drain_s,
            precision=0.5,
            coverage=0.8,
            gini=gini,
            max_appearances=20,
            mean_appearances=3.0,
            joins=5,
            churn=Spread(2.0, 4.0, 5),
            written=Spread(3.0, 5.0, 6),
        )

    table = format_comparison(
        SizeComparison(1000, 7, 0.08, [result("none", 0.6, 2.0), result("hubness", 0.45, 2.5)])
    )
    lines = table.splitlines()
    assert "1,000 attendees" in lines[0] and "0.080" in lines[0]
    assert lines[1].split() == ["none", "hubness", "hubness", "vs", "none"]
    gini = next(line for line in lines if line.startswith("Gini"))
    assert gini.split()[-3:] == ["0.600", "0.450", "-25.0%"]
    drain = next(line for line in lines if line.startswith("drain s"))
    assert drain.split()[-3:] == ["2.00", "2.50", "x1.25"]

"""Unit tests for tooling.synthetic (deterministic synthetic attendees)."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

from core.embedding.local import LocalEmbedder
from core.embedding.text import phrase_key
from core.embedding.vectors import BLOCKS
from core.models import MAX_TAG_CHARS, MAX_TAGS, Profile
from tooling.synthetic import COMPANIES, INTEREST_POOL, ROLES, generate_profiles, role_of


def test_ids_and_count() -> None:
    profiles = generate_profiles(25, seed=1, id_prefix="ev1-")
    assert [p.user_id for p in profiles] == [f"ev1-{i:06d}" for i in range(25)]
    assert generate_profiles(0) == []


def test_negative_n_rejected() -> None:
    with pytest.raises(ValueError, match="n must be"):
        generate_profiles(-1)


def test_deterministic_by_seed() -> None:
    assert generate_profiles(300, seed=9) == generate_profiles(300, seed=9)
    assert generate_profiles(300, seed=9) != generate_profiles(300, seed=10)


def test_prefix_stable() -> None:
    # The first m profiles do not depend on n, so benchmarks at several sizes nest.
    assert generate_profiles(500, seed=4)[:100] == generate_profiles(100, seed=4)


def test_profiles_validate_and_respect_limits() -> None:
    for profile in generate_profiles(1000, seed=2):
        # Round trip through validation: nothing is dropped or altered.
        assert Profile.model_validate(profile.model_dump()) == profile
        assert 2 <= len(profile.interests) <= 6
        assert 1 <= len(profile.seeking) <= 4
        assert 1 <= len(profile.offering) <= 3
        for tag in (*profile.interests, *profile.seeking, *profile.offering):
            assert 0 < len(tag) <= MAX_TAG_CHARS
        assert len(profile.interests) <= MAX_TAGS
        assert profile.title
        assert profile.name
        assert 20 < len(profile.bio) < 600
        assert phrase_key(profile.bio)  # a bio has content words


def test_role_mix() -> None:
    profiles = generate_profiles(2000, seed=42)
    roles = Counter(role_of(p) for p in profiles)
    assert None not in roles
    assert set(roles) == {role.name for role in ROLES}
    total_weight = sum(role.weight for role in ROLES)
    for role in ROLES:
        expected = 2000 * role.weight / total_weight
        assert 0.6 * expected < roles[role.name] < 1.4 * expected, role.name


def test_companies_collide_sometimes_but_rarely() -> None:
    profiles = generate_profiles(2000, seed=42)
    companies = Counter(p.company for p in profiles if p.company)
    assert len(COMPANIES) >= 120
    assert max(companies.values()) > 1  # collisions exist
    # ... but a random pair of attendees rarely shares a company.
    pairs_same = sum(c * (c - 1) for c in companies.values())
    assert pairs_same / (2000 * 1999) < 0.02


def test_interests_come_from_pool_and_vary() -> None:
    profiles = generate_profiles(1000, seed=42)
    pool = {t.casefold() for t in INTEREST_POOL}
    used = {t.casefold() for p in profiles for t in p.interests}
    assert used <= pool
    assert len(used) > 0.8 * len(pool)
    assert len(INTEREST_POOL) >= 55


def test_surface_forms_vary_but_stem_together() -> None:
    profiles = generate_profiles(2000, seed=42)
    funding_forms = {
        tag for p in profiles for tag in p.seeking + p.offering if "fund" in phrase_key(tag)
    }
    assert len(funding_forms) >= 3  # e.g. "seed funding", "Funding", "Seed funding"
    assert len({tag.casefold() for tag in funding_forms}) >= 2


def test_roles_complement_each_other() -> None:
    profiles = generate_profiles(2000, seed=42)
    offered = Counter(k for p in profiles for tag in p.offering for k in phrase_key(tag))
    for p in profiles:
        if role_of(p) in {"founder", "job seeker", "recruiter"}:
            # Someone at the event offers at least one thing this attendee seeks.
            assert any(any(offered[k] for k in phrase_key(tag)) for tag in p.seeking)


def _share_rate(profiles: list[Profile], seeker_role: str, offerer_role: str) -> float:
    """Fraction of (seeker, offerer) pairs where a sought stem is offered."""
    seekers = [
        {k for t in p.seeking for k in phrase_key(t)} for p in profiles if role_of(p) == seeker_role
    ]
    offerers = [
        {k for t in p.offering for k in phrase_key(t)}
        for p in profiles
        if role_of(p) == offerer_role
    ]
    hits = sum(bool(s & o) for s in seekers for o in offerers)
    return hits / (len(seekers) * len(offerers))


def test_founders_and_investors_complement() -> None:
    profiles = generate_profiles(1000, seed=42)
    assert _share_rate(profiles, "founder", "investor") > 0.3
    assert _share_rate(profiles, "investor", "founder") > 0.3
    assert _share_rate(profiles, "recruiter", "job seeker") > 0.2
    assert _share_rate(profiles, "founder", "marketer") < 0.05


def test_founders_find_investors_via_embeddings() -> None:
    # At 512 dims hash collisions between unrelated frequent tags are rare, so the
    # seeking-offering block score reflects the generator's complementarity.
    profiles = generate_profiles(1000, seed=42)
    d = 512
    vectors = LocalEmbedder(d).embed(profiles).astype(np.int64)
    seeking = vectors[:, BLOCKS.index("seeking") * d : (BLOCKS.index("seeking") + 1) * d]
    offering = vectors[:, BLOCKS.index("offering") * d : (BLOCKS.index("offering") + 1) * d]
    roles = [role_of(p) for p in profiles]
    founders = [i for i, r in enumerate(roles) if r == "founder"]
    investors = [i for i, r in enumerate(roles) if r == "investor"]
    recruiters = [i for i, r in enumerate(roles) if r == "recruiter"]
    to_investors = (seeking[founders] @ offering[investors].T).mean()
    to_recruiters = (seeking[founders] @ offering[recruiters].T).mean()
    assert to_investors > 3 * max(to_recruiters, 1)


def test_generation_is_fast() -> None:
    start = time.perf_counter()
    profiles = generate_profiles(2000)
    assert len(profiles) == 2000
    assert time.perf_counter() - start < 2.0

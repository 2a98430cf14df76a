"""Unit tests for core.embedding.text (tokenizer, stemmer) and core.embedding.local (the
hashing embedder)."""

from __future__ import annotations

import hashlib
import random
import time
from itertools import pairwise

import numpy as np
import pytest

from core.embedding.local import LocalEmbedder
from core.embedding.text import phrase_key, stem, stems, tokenize
from core.embedding.vectors import BLOCKS, QUANT_SCALE, assert_exact_range, content_hash
from core.models import Profile
from tooling.synthetic import generate_profiles

BLOCK_DIM = 128

STEM_FAMILIES = [
    ["investor", "Investors", "investing", "investment", "invest", "invested"],
    ["engineer", "engineers", "engineering"],
    ["founder", "founders", "founding"],
    ["recruiter", "recruiting", "recruitment"],
    ["design", "designer", "designers", "designing"],
    ["funding", "fund", "funds", "funded"],
    ["mentor", "mentoring", "mentorship", "mentors"],
    ["hiring", "hire", "hires"],
]


def block(vectors: np.ndarray, name: str) -> np.ndarray:
    i = BLOCKS.index(name)
    return vectors[:, i * BLOCK_DIM : (i + 1) * BLOCK_DIM]


def int_dot(a: np.ndarray, b: np.ndarray) -> int:
    return int(a.astype(np.int64) @ b.astype(np.int64))


# --- text ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", STEM_FAMILIES, ids=lambda f: f[0])
def test_stem_families_collapse(family: list[str]) -> None:
    assert len({stem(word) for word in family}) == 1


def test_stem_families_stay_distinct() -> None:
    assert len({stem(family[0]) for family in STEM_FAMILIES}) == len(STEM_FAMILIES)


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("user", "user"),
        ("users", "user"),
        ("ai", "ai"),
        ("ml", "ml"),
        ("ux", "ux"),
        ("seed", "seed"),
        ("string", "string"),
        ("business", "business"),
    ],
)
def test_stem_does_not_overstem_short_words(word: str, expected: str) -> None:
    assert stem(word) == expected


def test_stems_are_at_least_three_chars_unless_word_is_shorter() -> None:
    words = {w for p in generate_profiles(300, seed=3) for w in tokenize(p.bio)}
    for word in words:
        assert len(stem(word)) >= min(3, len(word))


def test_tokenize_folds_accents_case_and_symbols() -> None:
    assert tokenize("Café owner, naïve RÉSUMÉ") == ["cafe", "owner", "naive", "resume"]
    assert tokenize("C++ and C# on .NET") == ["cplusplus", "csharp", "dotnet"]


def test_tokenize_drops_stop_words_and_single_chars() -> None:
    assert tokenize("I am a founder of the X team") == ["founder", "team"]
    assert tokenize("") == []


def test_phrase_key_is_order_case_and_form_insensitive() -> None:
    assert phrase_key("Seed Funding") == phrase_key("funding, seed") == ("fund", "seed")
    assert phrase_key("Investors") == phrase_key("investment")
    assert phrase_key("the") == ()


def test_stems_keeps_order_and_duplicates() -> None:
    assert stems("Designers designing designs") == ["design", "design", "design"]


# --- embedder --------------------------------------------------------------------------


def test_shape_dtype_and_key() -> None:
    embedder = LocalEmbedder()
    vectors = embedder.embed(generate_profiles(20))
    assert embedder.dim == 4 * BLOCK_DIM
    assert vectors.shape == (20, embedder.dim)
    assert vectors.dtype == np.int16
    assert embedder.key == "local-v1-d128"
    assert LocalEmbedder(64).key != embedder.key
    assert LocalEmbedder(64).embed(generate_profiles(3)).shape == (3, 256)


def test_embed_empty_sequence() -> None:
    assert LocalEmbedder().embed([]).shape == (0, 4 * BLOCK_DIM)


def test_invalid_block_dim() -> None:
    with pytest.raises(ValueError, match="block_dim"):
        LocalEmbedder(0)


def test_deterministic_across_calls_and_batches() -> None:
    profiles = generate_profiles(200, seed=11)
    first = LocalEmbedder().embed(profiles)
    again = LocalEmbedder().embed(profiles)
    one_by_one = np.vstack([LocalEmbedder().embed([p]) for p in profiles[:20]])
    assert np.array_equal(first, again)
    assert np.array_equal(first[:20], one_by_one)


def test_golden_fingerprint() -> None:
    # Pins the exact output. If this fails, output changed: bump EMBEDDER_VERSION (so the
    # key changes and stored embeddings are recomputed), then update the digest.
    # Fixed profiles rather than generated ones, so generator changes do not trip this.
    vectors = LocalEmbedder().embed(GOLDEN_PROFILES)
    digest = hashlib.sha256(vectors.astype("<i2").tobytes()).hexdigest()
    assert digest == GOLDEN_DIGEST


GOLDEN_DIGEST = "d4f54d5d3449a3bf870c41c28bfbdcbd8c307595c9e52a87be863e89752906ce"
GOLDEN_PROFILES = [
    Profile(
        user_id="g1",
        title="Founder & CEO",
        bio="Building climate-tech software with C++ and Python. Looking for seed investors.",
        interests=["climate tech", "AI", "Open Source"],
        seeking=["Seed funding", "engineers", "advisors"],
        offering=["equity", "job opportunities"],
    ),
    Profile(
        user_id="g2",
        title="Angel Investor",
        bio="Café owner turned investor; I mentor first-time founders.",
        interests=["fintech", "venture capital"],
        seeking=["startups", "deal flow"],
        offering=["seed funding", "mentorship"],
    ),
    Profile(user_id="g3"),
]


def _reference_embed(profile: Profile, block_dim: int) -> np.ndarray:
    """Slow, obvious re-implementation of the documented feature scheme."""
    mask = 2**64 - 1

    def blake(feature: str, salt: bytes) -> int:
        digest = hashlib.blake2b(feature.encode(), digest_size=8, person=salt).digest()
        return int.from_bytes(digest, "little")

    def pair(a: int, b: int) -> int:  # splitmix64 finaliser of a * golden + b
        z = (a * 0x9E3779B97F4A7C15 + b) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    blocks = np.zeros((4, block_dim))

    def add(block_index: int, h: int, weight: float) -> None:
        blocks[block_index, h % block_dim] += -weight if h >> 63 else weight

    salts = {0: b"mm:interests:v1", 1: b"mm:complement:v1", 2: b"mm:complement:v1"}
    for index, tags in enumerate((profile.interests, profile.seeking, profile.offering)):
        for tag in tags:
            key = phrase_key(tag)
            for s in key:
                add(index, blake(s, salts[index]), 1.0)
            if len(key) > 1:
                add(index, blake(" ".join(key), salts[index]), 1.0)
    for text, multiplier in ((profile.title, 2.0), (profile.bio, 1.0)):
        hashes = [blake(s, b"mm:bio:v1") for s in stems(text)]
        for h in hashes:
            add(3, h, multiplier)
        for a, b in pairwise(hashes):
            add(3, pair(a, b), 0.5 * multiplier)
    norms = np.linalg.norm(blocks, axis=1, keepdims=True)
    unit = np.divide(blocks, norms, out=np.zeros_like(blocks), where=norms > 0)
    quantised: np.ndarray = np.rint(unit * QUANT_SCALE).astype(np.int16)
    return quantised.reshape(-1)


@pytest.mark.parametrize("block_dim", [128, 37])
def test_matches_reference_implementation(block_dim: int) -> None:
    profiles = [*GOLDEN_PROFILES, *generate_profiles(40, seed=13)]
    vectors = LocalEmbedder(block_dim).embed(profiles)
    for row, profile in enumerate(profiles):
        assert np.array_equal(vectors[row], _reference_embed(profile, block_dim))


def test_blocks_are_unit_norm_after_quantisation() -> None:
    vectors = LocalEmbedder().embed(generate_profiles(100, seed=5)).astype(np.int64)
    norms = np.sqrt((vectors.reshape(100, 4, BLOCK_DIM) ** 2).sum(axis=-1))
    nonzero = norms[norms > 0]
    assert np.all(np.abs(nonzero - QUANT_SCALE) < 8)


def test_empty_profile_gives_zero_vector() -> None:
    vectors = LocalEmbedder().embed([Profile(user_id="empty")])
    assert not vectors.any()


def test_empty_block_stays_zero_others_not() -> None:
    profile = Profile(user_id="a", interests=["AI"], bio="")
    vectors = LocalEmbedder().embed([profile])
    assert block(vectors, "interests").any()
    for name in ("seeking", "offering", "bio"):
        assert not block(vectors, name).any()


def test_seeking_aligns_with_offering() -> None:
    seeker = Profile(user_id="a", seeking=["Seed funding"])
    funder = Profile(user_id="b", offering=["seed funding"])
    unrelated = Profile(user_id="c", offering=["graphic design"])
    vectors = LocalEmbedder().embed([seeker, funder, unrelated])
    seeking = block(vectors, "seeking")
    offering = block(vectors, "offering")
    assert int_dot(seeking[0], offering[1]) == pytest.approx(QUANT_SCALE**2, rel=0.01)
    assert abs(int_dot(seeking[0], offering[2])) < 0.2 * QUANT_SCALE**2


def test_stemming_matters_for_alignment() -> None:
    seeker = Profile(user_id="a", seeking=["investors"])
    investor = Profile(user_id="b", offering=["Investment"])
    vectors = LocalEmbedder().embed([seeker, investor])
    assert int_dot(block(vectors, "seeking")[0], block(vectors, "offering")[1]) > 0.99 * (
        QUANT_SCALE**2
    )


def test_partial_phrase_overlap_scores_between() -> None:
    a = Profile(user_id="a", seeking=["seed funding"])
    b = Profile(user_id="b", offering=["funding"])
    c = Profile(user_id="c", offering=["seed funding"])
    vectors = LocalEmbedder().embed([a, b, c])
    seeking, offering = block(vectors, "seeking"), block(vectors, "offering")
    partial, full = int_dot(seeking[0], offering[1]), int_dot(seeking[0], offering[2])
    assert 0 < partial < full


def test_interests_do_not_leak_into_other_blocks() -> None:
    a = Profile(user_id="a", interests=["climate tech"])
    b = Profile(user_id="b", bio="climate tech", offering=["climate tech"])
    vectors = LocalEmbedder().embed([a, b])
    # Different salts: the same words hash differently per block family.
    assert not np.array_equal(block(vectors, "interests")[0], block(vectors, "bio")[1])
    assert not np.array_equal(block(vectors, "interests")[0], block(vectors, "offering")[1])


def test_title_weighs_more_than_bio() -> None:
    titled = Profile(user_id="a", title="Designer", bio="robotics")
    vectors = LocalEmbedder().embed(
        [titled, Profile(user_id="b", bio="designer"), Profile(user_id="c", bio="robotics")]
    )
    bio = block(vectors, "bio")
    assert int_dot(bio[0], bio[1]) > int_dot(bio[0], bio[2]) > 0


def test_float32_matmul_is_exact() -> None:
    profiles = generate_profiles(1000, seed=123)
    vectors = LocalEmbedder().embed(profiles)
    a_rows, b_rows = vectors[:500], vectors[500:]
    for name in BLOCKS:
        a, b = block(a_rows, name), block(b_rows, name)
        exact = a.astype(np.int64) @ b.astype(np.int64).T
        approx = a.astype(np.float32) @ b.astype(np.float32).T
        assert np.array_equal(approx.astype(np.int64), exact)
        # Exactly symmetric as well.
        assert np.array_equal(approx, (b.astype(np.float32) @ a.astype(np.float32).T).T)


def test_float32_matmul_is_exact_for_random_unit_blocks() -> None:
    # Worst-case-ish inputs: dense random unit vectors, quantised the same way.
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((1000, BLOCK_DIM))
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    q = np.rint(unit * QUANT_SCALE).astype(np.int16)
    assert_exact_range(q, blocks=1)
    a, b = q[:500], q[500:]
    exact = a.astype(np.int64) @ b.astype(np.int64).T
    approx = a.astype(np.float32) @ b.astype(np.float32).T
    assert np.array_equal(approx.astype(np.int64), exact)


def test_assert_exact_range_rejects_large_blocks() -> None:
    ok = np.zeros((2, 4 * BLOCK_DIM), dtype=np.int16)
    ok[:, 0] = QUANT_SCALE
    assert_exact_range(ok)
    too_big = np.full((1, 4 * BLOCK_DIM), 32_000, dtype=np.int16)
    with pytest.raises(ValueError, match="exceeds"):
        assert_exact_range(too_big)
    at_limit = np.zeros((1, 4 * BLOCK_DIM), dtype=np.int16)
    at_limit[0, :2] = (4095, 90)  # 4095**2 + 90**2 = 16_777_125 <= 2**24 - 1
    assert_exact_range(at_limit)
    with pytest.raises(ValueError, match="exceeds"):
        assert_exact_range(at_limit, limit=2**23 - 1)
    at_limit[0, 1] = 91  # 16_777_306 > 2**24 - 1
    with pytest.raises(ValueError, match="exceeds"):
        assert_exact_range(at_limit)
    with pytest.raises(ValueError, match="shape"):
        assert_exact_range(np.zeros((1, 5), dtype=np.int16))


def test_float32_complement_sum_is_exact() -> None:
    # core.matching.scoring adds S_a.O_b + O_a.S_b in float32; embed() keeps each below 2**23.
    vectors = LocalEmbedder().embed(generate_profiles(600, seed=8))
    a, b = vectors[:300], vectors[300:]
    s_a, o_a = block(a, "seeking"), block(a, "offering")
    s_b, o_b = block(b, "seeking"), block(b, "offering")
    f32 = s_a.astype(np.float32) @ o_b.astype(np.float32).T
    f32 += o_a.astype(np.float32) @ s_b.astype(np.float32).T
    exact = s_a.astype(np.int64) @ o_b.astype(np.int64).T + o_a.astype(np.int64) @ s_b.T
    assert np.array_equal(f32.astype(np.int64), exact)


def test_content_hash_ignores_display_fields() -> None:
    base = Profile(user_id="a", name="Ada", company="Acme", title="CTO", interests=["AI"])
    same = base.model_copy(update={"name": "Grace", "company": "Globex", "user_id": "b"})
    assert content_hash(base) == content_hash(same)
    assert len(content_hash(base)) == 64


@pytest.mark.parametrize(
    "update",
    [
        {"interests": ["AI", "robotics"]},
        {"seeking": ["jobs"]},
        {"offering": ["jobs"]},
        {"title": "CEO"},
        {"bio": "hello"},
    ],
)
def test_content_hash_changes_with_matching_fields(update: dict[str, object]) -> None:
    base = Profile(user_id="a", title="CTO", interests=["AI"])
    assert content_hash(base) != content_hash(base.model_copy(update=update))


def test_content_hash_is_stable() -> None:
    profile = Profile(user_id="a", title="Fondatrice", bio="Café", interests=["IA"])
    assert content_hash(profile) == content_hash(Profile.model_validate(profile.model_dump()))
    assert content_hash(Profile(user_id="x")) == CONTENT_HASH_OF_EMPTY


CONTENT_HASH_OF_EMPTY = hashlib.sha256(
    b'{"bio":"","interests":[],"offering":[],"seeking":[],"title":""}'
).hexdigest()


def test_random_profiles_embed_within_exact_range() -> None:
    rng = random.Random(99)
    words = ["ai", "fund", "design", "engineers", "climate", "mentor", "seed", "x" * 20]
    profiles = [
        Profile(
            user_id=f"r{i}",
            bio=" ".join(rng.choice(words) for _ in range(rng.randint(0, 300))),
            interests=[" ".join(rng.sample(words, 2)) for _ in range(rng.randint(0, 5))],
        )
        for i in range(200)
    ]
    assert_exact_range(LocalEmbedder().embed(profiles))


@pytest.mark.slow
def test_embedding_speed() -> None:
    profiles = generate_profiles(10_000, seed=1)
    start = time.perf_counter()
    LocalEmbedder().embed(profiles)
    assert time.perf_counter() - start < 4.0  # target < 2 s; slack for slow CI machines

"""Local feature-hashing embedder: profiles -> quantised int16 block vectors.

Each profile becomes four blocks of ``block_dim`` components, in the order of ``BLOCKS``.
Every block is a signed feature-hashing sketch of stems, L2-normalised and quantised to
integers in [-QUANT_SCALE, QUANT_SCALE]. The score compares blocks pairwise (interests with
interests, A's seeking with B's offering, bio with bio), so seeking and offering share one
hash salt: the same tag must land in the same bucket with the same sign in both.

Features (weights)
------------------
* interests / seeking / offering: per tag, each stem of its phrase key (1.0), plus the
  whole phrase key (1.0) when it has two or more stems.
* bio: the title's stems (2.0) and the bio's stems (1.0), plus bigrams of consecutive stems
  within the same text (0.5, times 2 in the title). Blocks are independent.
Words and phrases are hashed with blake2b (a per-block-family "person" salt); bigram hashes
are derived from the two word hashes with fixed uint64 arithmetic. Bucket = hash mod
block_dim, sign = top bit. Quantisation and why float32 products of the result are exact:
core.embedding.vectors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from core.embedding.text import phrase_key, stem, tokenize
from core.embedding.vectors import BLOCKS, Int16Matrix, quantize_blocks
from core.models import Profile

# Bump whenever output for the same input could change (here or in core.embedding.text):
# the key, and with it every cached embedding, changes with it.
EMBEDDER_VERSION = 1

DEFAULT_BLOCK_DIM = 128
MAX_BLOCK_DIM = 65_536

# blake2b "person" strings (<= 16 bytes). seeking/offering share a salt so tags align.
_SALT_INTERESTS = b"mm:interests:v1"
_SALT_COMPLEMENT = b"mm:complement:v1"
_SALT_BIO = b"mm:bio:v1"

TAG_STEM_WEIGHT = 1.0
TAG_PHRASE_WEIGHT = 1.0
TITLE_WEIGHT = 2.0  # a title says more about a person than any one bio word
BIO_WORD_WEIGHT = 1.0
BIGRAM_WEIGHT = 0.5

_U64 = npt.NDArray[np.uint64]

# (64-bit feature hash, weight) pairs of one tag.
_Features = tuple[tuple[int, float], ...]

# Constants of the splitmix64 finaliser, used to derive bigram hashes from word hashes.
_MIX_PAIR = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


@lru_cache(maxsize=131_072)
def _feature_hash(feature: str, salt: bytes) -> int:
    """Stable 64-bit hash: Python's hash() is salted per process, blake2b is not.

    The low bits (mod block_dim) pick the bucket, the top bit the sign.
    """
    digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8, person=salt).digest()
    return int.from_bytes(digest, "little")


@lru_cache(maxsize=131_072)
def _bio_word_hash(token: str) -> int:
    return _feature_hash(stem(token), _SALT_BIO)


@lru_cache(maxsize=65_536)
def _tag_features(tag: str, salt: bytes) -> _Features:
    """Each stem of the tag, plus the whole phrase when it has several stems.

    The phrase feature makes "seed funding" closer to "seed funding" than to "funding"
    alone while still giving partial credit for the shared stem.
    """
    key = phrase_key(tag)
    features = [(_feature_hash(s, salt), TAG_STEM_WEIGHT) for s in key]
    if len(key) >= 2:
        features.append((_feature_hash(" ".join(key), salt), TAG_PHRASE_WEIGHT))
    return tuple(features)


def _pair_hash(first: _U64, second: _U64) -> _U64:
    """Order-sensitive 64-bit hash of word-hash pairs (bigrams), vectorised.

    Derived from the words' blake2b hashes with fixed uint64 arithmetic (wrapping mod
    2**64), so it is as stable as they are and avoids hashing every bigram string.
    """
    z = first * _MIX_PAIR + second
    z ^= z >> np.uint64(30)
    z *= _MIX_1
    z ^= z >> np.uint64(27)
    z *= _MIX_2
    z ^= z >> np.uint64(31)
    return z


class LocalEmbedder:
    """Deterministic, dependency-free embedder (no network, no model files)."""

    def __init__(self, block_dim: int = DEFAULT_BLOCK_DIM) -> None:
        if not 1 <= block_dim <= MAX_BLOCK_DIM:
            raise ValueError(f"block_dim must be in [1, {MAX_BLOCK_DIM}], got {block_dim}")
        self._block_dim = block_dim

    @property
    def key(self) -> str:
        """Identifies embedder, version and dimensions; equal keys mean equal output."""
        return f"local-v{EMBEDDER_VERSION}-d{self._block_dim}"

    @property
    def block_dim(self) -> int:
        return self._block_dim

    @property
    def dim(self) -> int:
        return len(BLOCKS) * self._block_dim

    def embed(self, profiles: Sequence[Profile], deadline: float | None = None) -> Int16Matrix:
        """Quantised embeddings, shape (len(profiles), dim), dtype int16. (No network, so
        the deadline that bounds remote embedders is not needed here.)"""
        n, d, n_blocks = len(profiles), self._block_dim, len(BLOCKS)
        bio_block = BLOCKS.index("bio")
        # Sparse features as parallel lists: slot = row * n_blocks + block.
        tag_hashes: list[int] = []
        tag_weights: list[float] = []
        tag_slots: list[int] = []
        # Bio-block words; text id = 2 * row (title) or 2 * row + 1 (bio).
        word_hashes: list[int] = []
        word_texts: list[int] = []
        for row, profile in enumerate(profiles):
            for block, tags, salt in (
                (0, profile.interests, _SALT_INTERESTS),
                (1, profile.seeking, _SALT_COMPLEMENT),
                (2, profile.offering, _SALT_COMPLEMENT),
            ):
                slot = row * n_blocks + block
                for tag in tags:
                    for feature_hash, weight in _tag_features(tag, salt):
                        tag_hashes.append(feature_hash)
                        tag_weights.append(weight)
                        tag_slots.append(slot)
            for text_id, text in ((2 * row, profile.title), (2 * row + 1, profile.bio)):
                text_hashes = [_bio_word_hash(token) for token in tokenize(text)]
                word_hashes.extend(text_hashes)
                word_texts.extend([text_id] * len(text_hashes))

        words = np.asarray(word_hashes, dtype=np.uint64)
        texts = np.asarray(word_texts, dtype=np.int64)
        # Bigrams within one text only: the boundary between title and bio is not a phrase.
        same_text = texts[1:] == texts[:-1]
        bigram_texts = texts[1:][same_text]
        multiplier = np.where(texts % 2 == 0, TITLE_WEIGHT, 1.0)
        bigram_multiplier = np.where(bigram_texts % 2 == 0, TITLE_WEIGHT, 1.0)

        hashes = np.concatenate(
            [
                np.asarray(tag_hashes, dtype=np.uint64),
                words,
                _pair_hash(words[:-1][same_text], words[1:][same_text]),
            ]
        )
        weights = np.concatenate(
            [
                np.asarray(tag_weights, dtype=np.float64),
                multiplier * BIO_WORD_WEIGHT,
                bigram_multiplier * BIGRAM_WEIGHT,
            ]
        )
        slots = np.concatenate(
            [
                np.asarray(tag_slots, dtype=np.int64),
                (texts // 2) * n_blocks + bio_block,
                (bigram_texts // 2) * n_blocks + bio_block,
            ]
        )
        buckets = (hashes % np.uint64(d)).astype(np.int64)
        signs = np.where(hashes >> np.uint64(63), -1.0, 1.0)
        # bincount adds in input order; the sums are exact anyway (dyadic weights).
        dense = np.bincount(
            slots * d + buckets, weights=signs * weights, minlength=n * n_blocks * d
        ).astype(np.float64, copy=False)  # bincount of nothing is int64
        return quantize_blocks(dense.reshape(n, n_blocks, d))

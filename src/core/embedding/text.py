"""Deterministic text normalisation for matching: tokenizer, light stemmer, phrase keys.

Standard library only, no network and no downloaded models, so the same input gives the
same stems on every machine and every run. Any change here that alters output must bump
``core.embedding.local.EMBEDDER_VERSION``: stored embeddings are keyed by it.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

MIN_STEM_LENGTH = 3

_STOP_WORDS_TEXT = """
    about after all also am an and any are as at be been being but by can could did do does
    doing for from had has have having he her here hers him his how if im in into is it its
    just me more most my no nor not of off on once only or other our ours out over own same
    she so some such than that the their theirs them then there these they this those through
    to too under until up very was we were what when where which while who whom why will with
    would you your yours
"""
STOP_WORDS = frozenset(_STOP_WORDS_TEXT.split())

# Programming-language names that the alphanumeric split would otherwise destroy.
_SYMBOLIC_TERMS = {"c++": " cplusplus ", "c#": " csharp ", "f#": " fsharp ", ".net": " dotnet "}
_SYMBOLIC_TERM = re.compile(r"(?<![^\W_])(?:c\+\+|c#|f#)|\.net(?![^\W_])")
# Hyphenated prefixes join their word, so "co-founder" and "cofounder" agree.
_JOINED_PREFIX = re.compile(r"\b(co|e|re|pre|non|multi|cross|sub)-(?=[^\W\d_])")
# Runs of letters or digits in any script; "_" and punctuation separate tokens.
_TOKEN = re.compile(r"[^\W_]+")

_VOWELS = frozenset("aeiouy")
# A doubled final consonant left by suffix removal ("planning" -> "plann") is undoubled,
# except l/s/z, which are commonly doubled in base words ("sell", "class", "buzz").
_KEEP_DOUBLED = frozenset("lsz")


def _fold(text: str) -> str:
    """Casefold and strip accents (NFKD, drop combining marks): "Café" -> "cafe"."""
    folded = text.casefold()
    if folded.isascii():  # fast path: nothing to decompose
        return folded
    decomposed = unicodedata.normalize("NFKD", folded)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def tokenize(text: str) -> list[str]:
    """Split text into folded tokens, dropping 1-character tokens and stop words."""
    folded = _fold(text)
    if "+" in folded or "#" in folded or ".net" in folded:
        folded = _SYMBOLIC_TERM.sub(lambda m: _SYMBOLIC_TERMS[m.group(0)], folded)
    if "-" in folded:
        folded = _JOINED_PREFIX.sub(r"\1", folded)
    return [token for token in _TOKEN.findall(folded) if len(token) > 1 and token not in STOP_WORDS]


def _has_vowel(word: str) -> bool:
    return any(ch in _VOWELS for ch in word)


def _acceptable(stem_candidate: str) -> bool:
    # Refuse stems too short or vowel-less to carry meaning: "user" must not become "us",
    # "string" must not become "str".
    return len(stem_candidate) >= MIN_STEM_LENGTH and _has_vowel(stem_candidate)


# (suffix, replacement, endings that block the rule, minimum stem length), tried in order
# so that longer suffixes win; a rule whose result is too short falls through to the next.
_SUFFIX_RULES: tuple[tuple[str, str, tuple[str, ...], int], ...] = (
    ("ies", "y", (), 3),  # companies -> company
    ("sses", "ss", (), 3),  # businesses -> business
    ("xes", "x", (), 3),
    ("zes", "z", (), 3),
    ("ches", "ch", (), 3),
    ("shes", "sh", (), 3),
    ("s", "", ("ss", "us", "is"), 3),  # founders -> founder; "status", "analysis" stay
    ("ation", "ate", (), 3),  # automation -> automate, like automated/automating
    ("ship", "", (), 3),  # mentorship -> mentor, leadership -> leader
    ("ment", "", (), 4),  # investment -> invest; "comment", "payment" stay whole
    ("ing", "", (), 3),  # investing -> invest; "string", "thing" stay whole
    ("ied", "y", (), 3),  # applied -> apply
    ("ed", "", ("eed",), 3),  # funded -> fund; "seed", "speed" stay whole
    ("er", "", ("eer",), 3),  # designer -> design; "engineer", "career", "peer" stay whole
    ("tor", "t", (), 3),  # investor -> invest, creator -> creat (like create)
    ("sor", "s", (), 3),  # advisor -> advis (like advise, advising)
    ("ity", "", (), 3),  # security -> secur, like secure
    ("ive", "", (), 3),  # generative -> generat, like generate/generation
    ("e", "", ("ee",), 3),  # hire -> hir, like hiring; "employee" stays whole
)


def _undouble(word: str) -> str | None:
    """plann -> plan, staff -> staf (like staffing); None if not applicable."""
    last = word[-1:]
    if (
        len(word) >= 2
        and word[-2] == last
        and last.isalpha()
        and last not in _VOWELS
        and last not in _KEEP_DOUBLED
        and _acceptable(word[:-1])
    ):
        return word[:-1]
    return None


def _strip_once(word: str) -> str | None:
    """Apply the first applicable suffix rule; None when no rule applies."""
    for suffix, replacement, blocked_endings, min_length in _SUFFIX_RULES:
        if word.endswith(suffix) and not word.endswith(blocked_endings):
            candidate = word[: -len(suffix)] + replacement
            if len(candidate) >= min_length and _acceptable(candidate):
                return candidate
    return _undouble(word)


@lru_cache(maxsize=200_000)
def stem(word: str) -> str:
    """Light, deterministic suffix-stripping stemmer (Porter-like, much smaller).

    Suffixes are removed repeatedly until none applies, so word families collapse
    ("mentorship" -> "mentor" -> "ment", "mentoring" -> "mentor" -> "ment"). Stems shorter
    than three characters or without a vowel are never produced; short words such as
    "ai", "ml" or "ux" are returned unchanged.
    """
    current = _fold(word).strip()
    while True:
        shorter = _strip_once(current)
        if shorter is None:
            return current
        current = shorter


def stems(text: str) -> list[str]:
    """Stems of the text's tokens, in order, duplicates kept."""
    return [stem(token) for token in tokenize(text)]


@lru_cache(maxsize=100_000)
def phrase_key(phrase: str) -> tuple[str, ...]:
    """Sorted unique stems of a tag: two tags with equal keys mean the same thing.

    "Seed Funding", "seed funding" and "funding, seed" all give ("fund", "seed").
    """
    return tuple(sorted(set(stems(phrase))))

"""Human-readable reasons for a match, from the owner's point of view."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from core.embedding.text import phrase_key

MAX_REASONS = 4
MAX_SHARED_SHOWN = 3


@dataclass(frozen=True)
class Tag:
    text: str
    key: frozenset[str]


@dataclass(frozen=True)
class TagProfile:
    interests: tuple[Tag, ...]
    seeking: tuple[Tag, ...]
    offering: tuple[Tag, ...]
    # derived once: explain() runs for every entry of every list written
    interest_keys: frozenset[frozenset[str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        keys = frozenset(tag.key for tag in self.interests if tag.key)
        object.__setattr__(self, "interest_keys", keys)

    @classmethod
    def from_lists(
        cls, interests: Sequence[str], seeking: Sequence[str], offering: Sequence[str]
    ) -> TagProfile:
        return cls(
            tuple(map(_tag, interests)), tuple(map(_tag, seeking)), tuple(map(_tag, offering))
        )


@lru_cache(maxsize=65_536)
def _tag(item: str) -> Tag:
    """Tags repeat across thousands of profiles: stem each distinct one once."""
    return Tag(item, frozenset(phrase_key(item)))


def _complements(seeking: tuple[Tag, ...], offering: tuple[Tag, ...]) -> list[tuple[str, str]]:
    pairs = []
    for want in seeking:
        for give in offering:
            # one phrase contained in the other ("funding" / "seed funding"); a single
            # shared word ("product designers" / "product strategy") is not enough
            if want.key and give.key and (want.key <= give.key or give.key <= want.key):
                pairs.append((want.text, give.text))
                break
    return pairs


def explain(owner: TagProfile, other: TagProfile) -> list[str]:
    """Shared interests, then what each side seeks that the other offers."""
    reasons: list[str] = []
    shared = [tag.text for tag in owner.interests if tag.key in other.interest_keys]
    if shared:
        reasons.append("Shared interests: " + ", ".join(shared[:MAX_SHARED_SHOWN]))
    reasons.extend(
        f"You seek {want} — they offer {give}"
        for want, give in _complements(owner.seeking, other.offering)[:2]
    )
    reasons.extend(
        f"They seek {want} — you offer {give}"
        for want, give in _complements(other.seeking, owner.offering)[:2]
    )
    if not reasons:
        reasons.append("Similar background and goals")
    return reasons[:MAX_REASONS]

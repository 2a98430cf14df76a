"""The domain vocabulary every layer shares: profiles and event settings (pydantic, validated
at every boundary) and the plain records that pass between the data layer and the engine."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

USER_ID_PATTERN = r"^[A-Za-z0-9_.:@-]{1,128}$"
EVENT_CODE_PATTERN = r"^[A-Za-z0-9-]{3,64}$"

MAX_BIO_CHARS = 4000
MAX_TAGS = 50
MAX_TAG_CHARS = 200

_SURROGATE = re.compile("[\ud800-\udfff]")


def unstorable_text_problem(text: str, unit: str = "column") -> str | None:
    """Why `text` cannot be stored as UTF-8 text in PostgreSQL, or None if it can."""
    match = _SURROGATE.search(text)
    if match is not None:
        code = ord(match.group())
        where = f"{unit} {match.start() + 1}"
        if 0xDC80 <= code <= 0xDCFF:  # a byte smuggled through by surrogateescape
            return f"invalid UTF-8 (byte 0x{code - 0xDC00:02X} at {where})"
        return f"unpaired surrogate U+{code:04X} at {where}"
    if "\x00" in text:
        return f"NUL character at {unit} {text.index(chr(0)) + 1}"
    return None


UserId = Annotated[str, StringConstraints(pattern=USER_ID_PATTERN)]
EventCode = Annotated[str, StringConstraints(pattern=EVENT_CODE_PATTERN)]
Tag = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_TAG_CHARS)
]
TagList = Annotated[list[Tag], Field(max_length=MAX_TAGS)]


class DeferredModel(BaseModel):
    """Validator and serializer built on first use, not at import: each API request uses
    a few of the models, and building all of them at import was cold-start time."""

    model_config = ConfigDict(defer_build=True)


class StrictModel(DeferredModel):
    """Rejects unknown fields by name, so a typo never silently drops data, and wrong types
    instead of coercing them ("false" is not a boolean, "3" is not a number)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, strict=True)

    @field_validator("*", mode="after")
    @classmethod
    def _storable_text(cls, value: object) -> object:
        # PostgreSQL text cannot hold U+0000 or lone surrogates: a 4xx here, not a 500 later.
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and (problem := unstorable_text_problem(text, "character")):
                raise ValueError(problem)
        return value


class ProfileFields(StrictModel):
    """A profile without its user_id: the body of the API's PUT attendee route."""

    name: Annotated[str, Field(max_length=200)] = ""
    company: Annotated[str, Field(max_length=200)] = ""
    title: Annotated[str, Field(max_length=200)] = ""
    bio: Annotated[str, Field(max_length=MAX_BIO_CHARS)] = ""
    interests: TagList = Field(default_factory=list)
    seeking: TagList = Field(default_factory=list)
    offering: TagList = Field(default_factory=list)

    @field_validator("interests", "seeking", "offering")
    @classmethod
    def _dedupe_tags(cls, tags: list[str]) -> list[str]:
        # Keep the first spelling of a tag; duplicates would only double-count it.
        seen: set[str] = set()
        unique = []
        for tag in tags:
            key = tag.casefold()
            if key not in seen:
                seen.add(key)
                unique.append(tag)
        return unique


class _Identified(StrictModel):
    user_id: UserId


class Profile(ProfileFields, _Identified):
    """An attendee's profile: the matching-relevant fields plus display fields.

    (Bases in this order put user_id first: pydantic orders fields base-first.)"""


# A weight: finite, 0 to 10 (the database checks each is >= 0).
Weight = Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)]
NO_POSITIVE_WEIGHT = (
    "at least one weight must be greater than 0 (interests + complementarity + bio > 0):"
    " with every weight 0 nobody could be ranked"
)


class MatchWeights(StrictModel):
    """Per-event weights of the score blocks: interests, complementarity (what one seeks and
    the other offers, both ways) and bio; each 0 to 10, at least one greater than 0."""

    interests: Weight = 1.0
    complementarity: Weight = 1.0
    bio: Weight = 0.5

    @model_validator(mode="after")
    def _some_weight_positive(self) -> MatchWeights:
        # The database's CHECK (weight_interests + weight_complement + weight_bio > 0).
        if self.interests + self.complementarity + self.bio <= 0:
            raise ValueError(NO_POSITIVE_WEIGHT)
        return self

    @property
    def total(self) -> float:
        return self.interests + 2 * self.complementarity + self.bio


ExposureCorrection = Literal["none", "hubness"]
HUBNESS_M_MIN, HUBNESS_M_MAX = 1, 50


class EventSettings(StrictModel):
    k: Annotated[int, Field(ge=1, le=10)] = 3
    exclude_same_company: bool = True
    weights: MatchWeights = Field(default_factory=MatchWeights)
    embedder: Literal["local", "openai"] = "local"
    # One-sentence conversation starters per final match, by a chat model (needs OpenAI).
    icebreakers: bool = False
    # "hubness": lists rank by s'(A, B) = 2·s(A, B) - r(A) - r(B), r(X) the mean of X's best
    # hubness_m scores (docs/architecture.md, "Exposure correction"); "none": by s.
    exposure_correction: ExposureCorrection = "none"
    hubness_m: Annotated[int, Field(ge=HUBNESS_M_MIN, le=HUBNESS_M_MAX)] = 10


class EventIn(StrictModel):
    code: EventCode
    name: Annotated[str, Field(max_length=200)] = ""
    settings: EventSettings = Field(default_factory=EventSettings)


class Match(DeferredModel):
    user_id: str
    rank: int
    score: float
    reasons: list[str]
    icebreaker: str | None = None


class AttendeeMatches(DeferredModel):
    user_id: str
    matches: list[Match]


# --- records read from the database (already validated on the way in) -------------------


@dataclass(frozen=True)
class EventRecord:
    id: int
    code: str
    name: str
    settings: EventSettings


@dataclass(frozen=True)
class MemberRow:
    profile_id: int
    user_id: str
    active: bool
    company: str
    interests: list[str]
    seeking: list[str]
    offering: list[str]
    vector: bytes | None


@dataclass(frozen=True)
class ListEntry:
    rank: int
    matched_profile_id: int
    score: float
    reasons: list[str]

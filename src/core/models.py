"""Domain models shared by the importer, the API and the engine (pydantic at every boundary)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

USER_ID_PATTERN = r"^[A-Za-z0-9_.:@-]{1,128}$"
EVENT_CODE_PATTERN = r"^[A-Za-z0-9-]{3,64}$"

MAX_BIO_CHARS = 4000
MAX_TAGS = 50
MAX_TAG_CHARS = 200

UserId = Annotated[str, StringConstraints(pattern=USER_ID_PATTERN)]
EventCode = Annotated[str, StringConstraints(pattern=EVENT_CODE_PATTERN)]
Tag = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_TAG_CHARS)
]
TagList = Annotated[list[Tag], Field(max_length=MAX_TAGS)]


class StrictModel(BaseModel):
    """Rejects unknown fields by name, so a typo never silently drops data."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class Profile(StrictModel):
    """An attendee's profile: the matching-relevant fields plus display fields."""

    user_id: UserId
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


class MatchWeights(StrictModel):
    """Per-event weights of the score blocks (DESIGN.md §4)."""

    interests: Annotated[float, Field(ge=0, le=10)] = 1.0
    complementarity: Annotated[float, Field(ge=0, le=10)] = 1.0
    bio: Annotated[float, Field(ge=0, le=10)] = 0.5

    @property
    def total(self) -> float:
        return self.interests + 2 * self.complementarity + self.bio


class EventSettings(StrictModel):
    k: Annotated[int, Field(ge=1, le=10)] = 3
    exclude_same_company: bool = True
    weights: MatchWeights = Field(default_factory=MatchWeights)
    embedder: Literal["local"] = "local"


class EventIn(StrictModel):
    code: EventCode
    name: Annotated[str, Field(max_length=200)] = ""
    settings: EventSettings = Field(default_factory=EventSettings)


class Match(BaseModel):
    user_id: str
    rank: int
    score: float
    reasons: list[str]


class AttendeeMatches(BaseModel):
    user_id: str
    matches: list[Match]

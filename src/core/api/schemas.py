"""Request and response bodies of the HTTP API (pydantic): what a client sends and gets."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from core.models import (
    EventSettings,
    Profile,
    ProfileFields,
    StrictModel,
    UserId,
    Weight,
)


class AttendeeIn(ProfileFields):
    """A profile without its user_id (that comes from the path)."""

    def to_profile(self, user_id: str) -> Profile:
        return Profile(user_id=user_id, **self.model_dump())


class DismissIn(StrictModel):
    dismissed_user_id: UserId


class TriggerIn(StrictModel):
    """The original trigger-matchmaking body: queue by default, legacy synchronous mode."""

    useQueue: bool = True  # noqa: N815 - the legacy API's field name
    user_ids: Annotated[list[UserId], Field(max_length=1000)] | None = None


class StartIn(StrictModel):
    """The original admin-start-matching body."""

    mode: Literal["unmatched", "everyone"] = "unmatched"
    priority: Annotated[int, Field(ge=0, le=3)] = 0


class WeightsPatch(StrictModel):
    """New weights; omitted (or null) ones keep their value. At least one of the resulting
    weights must be greater than 0."""

    interests: Weight | None = None
    complementarity: Weight | None = None
    bio: Weight | None = None


class SettingsPatch(StrictModel):
    """Admin change of an event's matching settings; omitted (or null) fields keep their
    value, and so do omitted weights. Any change re-queues the whole event (k, weights,
    exclusions and the embedder change every list), and a new embedder re-embeds everyone."""

    k: Annotated[int, Field(ge=1, le=10)] | None = None
    exclude_same_company: bool | None = None
    weights: WeightsPatch | None = None
    embedder: Literal["local", "openai"] | None = None
    icebreakers: bool | None = None


class EventOut(BaseModel):
    code: str
    name: str
    settings: EventSettings
    attendees: int
    created: bool = False


class AttendeeOut(BaseModel):
    event: str
    user_id: str
    status: Literal["joined", "updated", "unchanged"]


class EnqueueOut(BaseModel):
    event: str
    queued: int
    mode: Literal["queue", "sync"]
    invoked: bool
    matched: int | None = None


class StatusOut(BaseModel):
    event: str
    job_status: str
    attendees_active: int
    attendees_with_matches: int
    pending_by_priority: dict[str, int]
    running: int
    done: int
    failed: int
    dead: int
    oldest_pending_age_s: float | None
    throughput_per_min_5m: float
    throughput_per_min_60m: float
    last_run_at: datetime | None
    last_error: str | None
    last_error_at: datetime | None
    dead_letter_queue_depth: int | None


class DeadLetterOut(BaseModel):
    user_id: str
    attempts: int
    last_error: str | None
    dead_at: datetime | None


class RedriveOut(BaseModel):
    event: str
    requeued: int
    invoked: bool


class ErrorOut(BaseModel):
    """Every error answer: a stable machine-readable code, what to fix, and for invalid
    input the problem with each field."""

    error: str
    message: str
    details: list[dict[str, str]] | None = None

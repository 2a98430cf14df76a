"""Request and response bodies of the HTTP API (pydantic): what a client sends and gets."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from core.models import (
    EventCode,
    EventSettings,
    MatchWeights,
    Profile,
    ProfileFields,
    StrictModel,
    UserId,
)


class AttendeeIn(ProfileFields):
    """A profile without its user_id (that comes from the path)."""

    def to_profile(self, user_id: str) -> Profile:
        return Profile(user_id=user_id, **self.model_dump())


class DismissIn(StrictModel):
    dismissed_user_id: UserId


UserIdList = Annotated[list[UserId], Field(max_length=1000)]
Priority = Annotated[int, Field(ge=0, le=3)]
StartMode = Literal["unmatched", "everyone"]


class TriggerIn(StrictModel):
    """The original trigger-matchmaking body: queue by default, legacy synchronous mode."""

    useQueue: bool = True  # noqa: N815 - the legacy API's field name
    user_ids: UserIdList | None = None


class StartIn(StrictModel):
    """The original admin-start-matching body."""

    mode: StartMode = "unmatched"
    priority: Priority = 0


# The seed system's edge-function bodies, spelled as its clients send them (camelCase
# only: a snake_case field is an unknown field, so a body never mixes two spellings).


class SeedTriggerIn(StrictModel):
    """POST /trigger-matchmaking: the seed's trigger-matchmaking body. No priority: a
    trigger queues at the fixed trigger priority, as POST /events/{code}/matchmaking."""

    eventCode: EventCode  # noqa: N815 - the seed's field name
    useQueue: bool = True  # noqa: N815 - the seed's field name
    userIds: UserIdList | None = None  # noqa: N815 - the seed's field name

    def to_trigger(self) -> TriggerIn:
        return TriggerIn(useQueue=self.useQueue, user_ids=self.userIds)


class SeedStartIn(StrictModel):
    """POST /admin-start-matching: the seed's admin-start-matching body."""

    eventCode: EventCode  # noqa: N815 - the seed's field name
    mode: StartMode = "unmatched"
    priority: Priority = 0

    def to_start(self) -> StartIn:
        return StartIn(mode=self.mode, priority=self.priority)


class SettingsPatch(StrictModel):
    """Admin change of an event's matching settings; omitted fields keep their value.
    Any change re-queues the whole event (k, weights, exclusions and the embedder change
    every list), and a new embedder re-embeds everyone."""

    k: Annotated[int, Field(ge=1, le=10)] | None = None
    exclude_same_company: bool | None = None
    weights: MatchWeights | None = None
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


class StartOut(EnqueueOut):
    """A manual start: what was queued, and the event's queue status right after."""

    status: StatusOut


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

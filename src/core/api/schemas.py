"""Request and response bodies of the HTTP API (pydantic): what a client sends and gets."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field

from core.models import (
    HUBNESS_M_MAX,
    HUBNESS_M_MIN,
    DeferredModel,
    EventCode,
    EventSettings,
    ExposureCorrection,
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


UserIdList = Annotated[list[UserId], Field(max_length=1000)]
Priority = Annotated[int, Field(ge=0, le=3)]
StartMode = Literal["unmatched", "everyone"]


class TriggerIn(StrictModel):
    """The original trigger-matchmaking body: queue by default, legacy synchronous mode.
    The priority (default 2, as profile edits) only ever raises a queued user's priority:
    a newcomer already queued at 3 stays at 3."""

    useQueue: bool = True  # noqa: N815 - the legacy API's field name
    user_ids: UserIdList | None = None
    priority: Priority = 2


class StartIn(StrictModel):
    """The original admin-start-matching body."""

    mode: StartMode = "unmatched"
    priority: Priority = 0


# The seed system's edge-function bodies, spelled as its clients send them (camelCase
# only: a snake_case field is an unknown field, so a body never mixes two spellings).


class SeedTriggerIn(StrictModel):
    """POST /trigger-matchmaking: the seed's trigger-matchmaking body."""

    eventCode: EventCode  # noqa: N815 - the seed's field name
    useQueue: bool = True  # noqa: N815 - the seed's field name
    userIds: UserIdList | None = None  # noqa: N815 - the seed's field name
    priority: Priority = 2

    def to_trigger(self) -> TriggerIn:
        return TriggerIn(useQueue=self.useQueue, user_ids=self.userIds, priority=self.priority)


class SeedStartIn(StrictModel):
    """POST /admin-start-matching: the seed's admin-start-matching body."""

    eventCode: EventCode  # noqa: N815 - the seed's field name
    mode: StartMode = "unmatched"
    priority: Priority = 0

    def to_start(self) -> StartIn:
        return StartIn(mode=self.mode, priority=self.priority)


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
    exposure_correction: ExposureCorrection | None = None
    hubness_m: Annotated[int, Field(ge=HUBNESS_M_MIN, le=HUBNESS_M_MAX)] | None = None


class EventOut(DeferredModel):
    code: str
    name: str
    settings: EventSettings
    attendees: int
    created: bool = False


class AttendeeOut(DeferredModel):
    event: str
    user_id: str
    status: Literal["joined", "updated", "unchanged"]


class EnqueueOut(DeferredModel):
    event: str
    queued: int
    mode: Literal["queue", "sync"]
    invoked: bool
    matched: int | None = None


JobState = Literal["idle", "queued", "running", "paused", "needs_attention"]


class QueueNowOut(DeferredModel):
    """The event's queue as it is now (not lifetime figures)."""

    pending_by_priority: dict[str, int] = Field(
        description="users waiting for their first attempt, by priority '0'-'3' (3 first)"
    )
    pending: int = Field(description="sum of pending_by_priority")
    running: int = Field(description="users a worker has claimed and is matching (live lease)")
    waiting_retry: int = Field(
        description="users whose attempt failed or whose worker vanished (lease ran out), "
        "waiting for a retry"
    )
    next_retry_at: datetime | None = Field(description="earliest retry of a waiting user")
    last_retry_at: datetime | None = Field(description="latest retry of a waiting user")
    dead: int = Field(description="this event's users dead now (attempts used up)")
    oldest_pending_age_s: float | None = Field(
        description="age of the oldest pending or waiting row, seconds"
    )


class TotalsOut(DeferredModel):
    """Lifetime totals of the event's matching (they only grow)."""

    processed: int = Field(description="attempts that completed (a user may count many times)")
    failed: int = Field(description="attempts that failed")
    died: int = Field(description="times a user went dead")
    batches: int
    lists_written: int


class CoverageOut(DeferredModel):
    """How many active attendees have the list they can have."""

    k: int
    active: int = Field(description="active attendees")
    full_lists: int = Field(description="active attendees with k matches")
    short_lists_few_candidates: int = Field(
        description="fewer than k matches because fewer than k others may be matched with "
        "them (small event, same company, dismissals)"
    )
    missing_matches: int = Field(
        description="fewer matches than their candidates allow (not matched yet or stale)"
    )
    without_list: int = Field(description="active attendees with no match at all")
    full_ratio: float | None = Field(description="full_lists / active; null without attendees")


class ExposureOut(DeferredModel):
    """How evenly attendees appear on each other's lists, and the event's correction."""

    correction: ExposureCorrection = Field(
        description="the event's exposure_correction: hubness ranks by the corrected score"
    )
    hubness_m: int | None = Field(description="the correction's m; null under none")
    max_appearances: int = Field(description="lists the most-listed attendee is on")
    mean_appearances: float | None
    gini: float | None = Field(
        description="Gini coefficient of appearances over active attendees: 0 everyone "
        "equally listed, towards 1 a few on every list; null when nobody is listed"
    )


class EmbedderOut(DeferredModel):
    configured: Literal["local", "openai"] = Field(description="what the event asks for")
    effective: Literal["local", "openai"] | None = Field(
        description="what serves it now; null when the OpenAI secret cannot be read"
    )
    reason: str
    vectors_from: str | None = Field(
        description="embedder key of the event's stored vectors (null before any)"
    )
    breaker: Literal["closed", "open"] | None = Field(
        default=None,
        description="the OpenAI provider's circuit breaker (null unless the event asks for "
        "OpenAI and a key is configured); open: the local embedder serves the whole event",
    )
    since: datetime | None = Field(
        default=None, description="when the breaker opened (null while it is closed)"
    )


class IcebreakersOut(DeferredModel):
    """Icebreaker coverage of the event's current lists (later runs fill in the pairs
    still without one, oldest first, within ICEBREAKERS_PER_RUN)."""

    pairs: int = Field(description="list entries")
    with_icebreaker: int
    ratio: float | None = Field(description="with_icebreaker / pairs; null without entries")


class DeadLetterQueueOut(DeferredModel):
    """The dead-letter queue is shared: its depth counts every event's dead letters."""

    scope: Literal["all events"] = "all events"
    depth: int | None = Field(description="messages on the queue; null when not readable")


class StatusOut(DeferredModel):
    event: str
    state: JobState = Field(description="derived from the counts now, see docs/api.md")
    state_reason: str = Field(description="why the event is in this state, in words")
    queue: QueueNowOut
    totals: TotalsOut
    coverage: CoverageOut
    exposure: ExposureOut
    embedder: EmbedderOut
    icebreakers: IcebreakersOut | None = Field(
        default=None, description="null unless the event asks for icebreakers"
    )
    dead_letter_queue: DeadLetterQueueOut
    throughput_per_min_5m: float = Field(description="users completed per minute, last 5 min")
    throughput_per_min_60m: float = Field(description="users completed per minute, last hour")
    last_run_at: datetime | None = Field(description="when the last batch finished")
    last_error: str | None
    last_error_at: datetime | None


class StartOut(EnqueueOut):
    """A manual start: what was queued, and the event's queue status right after."""

    status: StatusOut


class DeadLetterOut(DeferredModel):
    user_id: str
    attempts: int
    last_error: str | None
    dead_at: datetime | None


class RedriveOut(DeferredModel):
    event: str
    requeued: int
    invoked: bool


class ErrorOut(DeferredModel):
    """Every error answer: a stable machine-readable code, what to fix, and for invalid
    input the problem with each field."""

    error: str
    message: str
    details: list[dict[str, str]] | None = None

"""Operations behind the HTTP API (and the local server): typed in, typed out, domain errors.

Handlers authenticate and parse; this module authorises and does the work; the data
layer (core.repository) talks to PostgreSQL.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from core import repository as repo
from core.models import (
    AttendeeMatches,
    EventIn,
    EventSettings,
    Match,
    MatchWeights,
    Profile,
    ProfileFields,
    StrictModel,
    UserId,
)
from core.repository import Conn, EventRecord
from core.settings import Settings
from core.worker import Matchmaker, WorkerReport, run_worker

Role = Literal["admin", "service", "attendee"]
SYNC_POLL_S = 0.1
ADMIN_SCOPE = "matchmaker/admin"
SERVICE_SCOPE = "matchmaker/service"


# --- errors ------------------------------------------------------------------------------


class DomainError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFoundError(DomainError):
    status, code = 404, "not_found"


class ForbiddenError(DomainError):
    status, code = 403, "forbidden"


class UnauthorizedError(DomainError):
    status, code = 401, "unauthorized"


class ConflictError(DomainError):
    status, code = 409, "conflict"


class TooLargeError(DomainError):
    status, code = 413, "too_large"


class MatchingTimeoutError(DomainError):
    status, code = 503, "timeout"


# --- who is calling ----------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    """The authenticated caller, from the API Gateway JWT authorizer context.

    admin: operators (scope matchmaker/admin); service: the event app's backend (scope
    matchmaker/service); attendee: an end user whose token subject is their user_id.
    """

    subject: str
    role: Role

    @classmethod
    def from_claims(cls, claims: dict[str, Any] | None, scopes: list[str] | None) -> Principal:
        if not claims or not claims.get("sub"):
            raise UnauthorizedError("missing or invalid authorization")
        granted = set(scopes or []) | set(str(claims.get("scope", "")).split())
        role: Role = (
            "admin"
            if ADMIN_SCOPE in granted
            else "service"
            if SERVICE_SCOPE in granted
            else "attendee"
        )
        return cls(str(claims["sub"]), role)

    def require_admin(self) -> None:
        if self.role != "admin":
            raise ForbiddenError("this route needs an admin principal")

    def require_service(self) -> None:
        if self.role not in ("admin", "service"):
            raise ForbiddenError("this route needs a service or admin principal")

    def require_self_or_service(self, user_id: str) -> None:
        if self.role == "attendee" and self.subject != user_id:
            raise ForbiddenError("attendees can only act on their own matches")


# --- inputs and outputs ------------------------------------------------------------------


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


class DeadLetterOut(BaseModel):
    user_id: str
    attempts: int
    last_error: str | None
    dead_at: datetime | None


class RedriveOut(BaseModel):
    event: str
    requeued: int
    invoked: bool


# --- operations --------------------------------------------------------------------------

Invoker = Callable[[str], bool]  # async-invoke the matchmaker for an event; True if sent


def _event(conn: Conn, code: str) -> EventRecord:
    event = repo.fetch_event(conn, code)
    if event is None:
        raise NotFoundError(f"no event with code {code!r}")
    return event


def create_event(conn: Conn, principal: Principal, body: EventIn) -> EventOut:
    principal.require_service()
    existing = repo.fetch_event(conn, body.code)
    if existing is not None:
        if existing.settings != body.settings or (body.name and existing.name != body.name):
            raise ConflictError(f"event {body.code!r} exists with different settings")
        return get_event(conn, principal, body.code)
    with conn.transaction():
        record = repo.ensure_event(conn, body)
    return EventOut(
        code=record.code, name=record.name, settings=record.settings, attendees=0, created=True
    )


def get_event(conn: Conn, principal: Principal, code: str) -> EventOut:
    principal.require_service()
    event = _event(conn, code)
    counts = repo.job_status(conn, event.id)["attendees"]
    return EventOut(
        code=event.code,
        name=event.name,
        settings=event.settings,
        attendees=int(counts.get("active") or 0),
    )


def put_attendee(
    conn: Conn, principal: Principal, code: str, user_id: str, body: AttendeeIn
) -> AttendeeOut:
    principal.require_service()
    profile = body.to_profile(user_id)
    with conn.transaction():
        event = _event(conn, code)
        outcome = repo.upsert_attendee(conn, event.id, profile)
    return AttendeeOut(event=code, user_id=user_id, status=outcome)


def remove_attendee(conn: Conn, principal: Principal, code: str, user_id: str) -> None:
    principal.require_service()
    with conn.transaction():
        event = _event(conn, code)
        if not repo.leave_event(conn, event.id, user_id):
            raise NotFoundError(f"{user_id!r} is not an active attendee of {code!r}")


def get_matches(conn: Conn, principal: Principal, code: str, user_id: str) -> AttendeeMatches:
    principal.require_self_or_service(user_id)
    event = _event(conn, code)
    rows = repo.attendee_matches(conn, event.id, user_id)
    if rows is None:
        raise NotFoundError(f"{user_id!r} is not an active attendee of {code!r}")
    return AttendeeMatches(user_id=user_id, matches=[Match(**row) for row in rows])


def dismiss(conn: Conn, principal: Principal, code: str, user_id: str, body: DismissIn) -> None:
    principal.require_self_or_service(user_id)
    if body.dismissed_user_id == user_id:
        raise DomainError("an attendee cannot dismiss themselves")
    with conn.transaction():
        event = _event(conn, code)
        if not repo.both_attend(conn, event.id, user_id, body.dismissed_user_id):
            raise NotFoundError("both users must be attendees of the event")
        repo.dismiss(conn, event.id, user_id, body.dismissed_user_id)


def trigger(
    conn: Conn,
    principal: Principal,
    code: str,
    body: TriggerIn,
    *,
    settings: Settings,
    invoke: Invoker,
    deadline: float,
) -> EnqueueOut:
    """Queue mode: enqueue (the given users, or every active attendee without a list) and
    start the matchmaker now. Legacy sync mode: match the event before answering, for
    events up to SYNC_MATCH_MAX_ATTENDEES."""
    principal.require_service()
    event = _event(conn, code)
    if not body.useQueue and repo.job_is_paused(conn, event.id):
        raise ConflictError(f"event {code!r} is paused: resume it before matching")
    if not body.useQueue:
        active = int(repo.job_status(conn, event.id)["attendees"].get("active") or 0)
        if active > settings.sync_match_max_attendees:
            raise TooLargeError(
                f"event {code!r} has {active} attendees; synchronous matching is limited to "
                f"{settings.sync_match_max_attendees}: use the queue (useQueue: true)"
            )
    queued = repo.enqueue_for_matching(
        conn,
        event.id,
        user_ids=body.user_ids,
        only_unmatched=body.user_ids is None,
        priority=2,
        reason="trigger",
    )
    if body.useQueue:
        return EnqueueOut(event=code, queued=queued, mode="queue", invoked=invoke(code))
    report = _match_now(conn, settings, event, deadline)
    return EnqueueOut(
        event=code, queued=queued, mode="sync", invoked=False, matched=report.completed
    )


def _match_now(conn: Conn, settings: Settings, event: EventRecord, deadline: float) -> WorkerReport:
    """Match the event before answering. Rows another worker is processing (the schedule)
    or that wait out a retry are waited for: 'drained' for this worker is not enough."""
    worker = Matchmaker(settings)
    completed = 0
    while True:
        report = run_worker(
            conn,
            settings,
            deadline=deadline,
            event_id=event.id,
            batch_size=settings.sync_match_max_attendees,
            matchmaker=worker,
        )
        completed += report.completed
        queue = repo.job_status(conn, event.id)["queue"]
        live = ("pending_p0", "pending_p1", "pending_p2", "pending_p3", "running")
        if not any(int(queue.get(key) or 0) for key in live):
            report.completed = completed
            return report
        if time.monotonic() > deadline - SYNC_POLL_S:
            raise MatchingTimeoutError(
                "synchronous matching ran out of time; the rest stays queued"
            )
        time.sleep(SYNC_POLL_S)


def start_matching(
    conn: Conn, principal: Principal, code: str, body: StartIn, invoke: Invoker
) -> EnqueueOut:
    principal.require_admin()
    event = _event(conn, code)
    queued = repo.enqueue_for_matching(
        conn,
        event.id,
        user_ids=None,
        only_unmatched=body.mode == "unmatched",
        priority=body.priority,
        reason=f"admin_{body.mode}",
    )
    return EnqueueOut(event=code, queued=queued, mode="queue", invoked=invoke(code))


def status(
    conn: Conn, principal: Principal, code: str, dead_letter_depth: Callable[[], int | None]
) -> StatusOut:
    principal.require_admin()
    event = _event(conn, code)
    figures = repo.job_status(conn, event.id)
    job, queue, people = figures["job"], figures["queue"], figures["attendees"]
    per_minute = repo.throughput(conn, event.id)
    return StatusOut(
        event=code,
        job_status=job.get("status", "idle"),
        attendees_active=int(people.get("active") or 0),
        attendees_with_matches=int(people.get("with_matches") or 0),
        pending_by_priority={str(p): int(queue.get(f"pending_p{p}") or 0) for p in range(4)},
        running=int(queue.get("running") or 0),
        done=int(job.get("processed_count") or 0),
        failed=int(job.get("failed_count") or 0),
        dead=int(queue.get("dead") or 0),
        oldest_pending_age_s=queue.get("oldest_pending_age_s"),
        throughput_per_min_5m=per_minute["5m"],
        throughput_per_min_60m=per_minute["60m"],
        last_run_at=job.get("last_batch_at"),
        last_error=job.get("last_error"),
        last_error_at=job.get("last_error_at"),
        dead_letter_queue_depth=dead_letter_depth(),
    )


def update_settings(
    conn: Conn, principal: Principal, code: str, body: SettingsPatch, invoke: Invoker
) -> EventOut:
    principal.require_admin()
    with conn.transaction():
        event = _event(conn, code)
        settings = event.settings.model_copy(update=body.model_dump(exclude_none=True))
        changed = settings != event.settings
        if changed:
            repo.update_event_settings(conn, event.id, settings)  # the trigger re-queues
    if changed:
        invoke(code)
    return get_event(conn, principal, code)


def set_paused(conn: Conn, principal: Principal, code: str, paused: bool) -> None:
    principal.require_admin()
    event = _event(conn, code)
    repo.set_job_paused(conn, event.id, paused)


def dead_letters(conn: Conn, principal: Principal, code: str) -> list[DeadLetterOut]:
    principal.require_admin()
    event = _event(conn, code)
    return [
        DeadLetterOut(**{k: row[k] for k in ("user_id", "attempts", "last_error", "dead_at")})
        for row in repo.dead_rows(conn, event.id)
    ]


def redrive(conn: Conn, principal: Principal, code: str, invoke: Invoker) -> RedriveOut:
    principal.require_admin()
    event = _event(conn, code)
    requeued = repo.redrive_dead(conn, event.id, None)
    return RedriveOut(event=code, requeued=requeued, invoked=invoke(code) if requeued else False)


def monotonic_deadline(remaining_ms: int, max_runtime_ms: int, safety_ms: int) -> float:
    """The worker's deadline: the configured runtime, but never closer than safety_ms to
    the Lambda's own time limit."""
    budget_ms = max(0, min(max_runtime_ms, remaining_ms - safety_ms))
    return time.monotonic() + budget_ms / 1000

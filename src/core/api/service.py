"""Operations behind the HTTP API (and the local server): typed in, typed out, domain errors.

Handlers authenticate and parse; this module authorises and does the work; the data
layer (core.data.repository) talks to PostgreSQL. The legacy synchronous trigger is the
only operation that matches in-process: it imports the worker (numpy, and openai for
OpenAI events) when it runs, so that no other request pays for them at cold start.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar

import psycopg
from aws_lambda_powertools.metrics import MetricUnit
from pydantic import ValidationError

from core.api.errors import (
    ConflictError,
    DomainError,
    InvalidInputError,
    MatchingTimeoutError,
    NotFoundError,
    TooLargeError,
)
from core.api.principals import Principal
from core.api.schemas import (
    AttendeeIn,
    AttendeeOut,
    DeadLetterOut,
    DismissIn,
    EnqueueOut,
    EventOut,
    RedriveOut,
    SettingsPatch,
    StartIn,
    StartOut,
    StatusOut,
    TriggerIn,
)
from core.api.status import event_status, has_live_work, queue_now
from core.data import repository as repo
from core.data.conflicts import retry_conflicts
from core.data.repository import Conn
from core.models import AttendeeMatches, EventIn, EventRecord, EventSettings, Match
from core.observability import MetricName, logger, metrics
from core.settings import Settings

if TYPE_CHECKING:
    from core.queue.worker import WorkerReport

SYNC_POLL_S = 0.1

Invoker = Callable[[str], bool]  # start the matchmaker for an event now; True if asked


def no_wake(code: str) -> bool:
    """The Invoker of callers that leave queued work to the schedule."""
    return False


def wake_unless_present(conn: Conn, code: str, wake: Invoker) -> bool:
    """After the commit that queued an attendee's work (never inside its transaction):
    wake the matchmaker, unless a run is present (a lingering woken run holds a valid
    presence lease). Such a run claims the row before it exits: it deletes its lease,
    commits, and only then looks for work one last time, so a lease this read sees
    belongs to a run whose last look comes after our commit. True if a wake was sent."""
    if wake is no_wake:
        return False
    try:
        present = repo.matchmaker_present(conn)
    except psycopg.Error:  # the row is committed: wake rather than fail or guess
        logger.warning("presence not readable; waking", extra={"event_code": code})
        present = False
    if present:
        metrics.add_metric(name=MetricName.WAKES_SKIPPED, unit=MetricUnit.Count, value=1)
        return False
    return wake(code)


P = ParamSpec("P")
R = TypeVar("R")


def retried(operation: Callable[Concatenate[Conn, P], R]) -> Callable[Concatenate[Conn, P], R]:
    """A write operation, run again when PostgreSQL rolled its transaction back because of
    a concurrent one (nothing was written); a conflict that persists is raised. Each run
    starts over (authorisation, reads), so it sees the state that won. Side effects come
    last (the matchmaker invoke), after the writes that could conflict."""

    @functools.wraps(operation)
    def run(conn: Conn, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return retry_conflicts(
            conn, lambda: operation(conn, *args, **kwargs), what=operation.__name__
        )

    return run


def _event(conn: Conn, code: str) -> EventRecord:
    event = repo.fetch_event(conn, code)
    if event is None:
        raise NotFoundError(f"no event with code {code!r}")
    return event


@retried
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


@retried
def put_attendee(
    conn: Conn,
    principal: Principal,
    code: str,
    user_id: str,
    body: AttendeeIn,
    *,
    wake: Invoker = no_wake,
) -> AttendeeOut:
    """Join or update; a join (and an edit that changed anything) queued work, so the
    matchmaker is woken once the transaction has committed."""
    principal.require_service()
    profile = body.to_profile(user_id)
    with conn.transaction():
        event = _event(conn, code)
        outcome = repo.upsert_attendee(conn, event.id, profile)
    if outcome != "unchanged":
        wake_unless_present(conn, code, wake)
    return AttendeeOut(event=code, user_id=user_id, status=outcome)


@retried
def remove_attendee(
    conn: Conn, principal: Principal, code: str, user_id: str, *, wake: Invoker = no_wake
) -> None:
    """Leave the event: the people whose lists held the leaver are queued (and woken for)."""
    principal.require_service()
    with conn.transaction():
        event = _event(conn, code)
        if not repo.leave_event(conn, event.id, user_id):
            raise NotFoundError(f"{user_id!r} is not an active attendee of {code!r}")
    wake_unless_present(conn, code, wake)


def get_matches(conn: Conn, principal: Principal, code: str, user_id: str) -> AttendeeMatches:
    principal.require_self_or_service(user_id)
    event = _event(conn, code)
    rows = repo.attendee_matches(conn, event.id, user_id)
    if rows is None:
        raise NotFoundError(f"{user_id!r} is not an active attendee of {code!r}")
    return AttendeeMatches(user_id=user_id, matches=[Match(**row) for row in rows])


@retried
def dismiss(
    conn: Conn,
    principal: Principal,
    code: str,
    user_id: str,
    body: DismissIn,
    *,
    wake: Invoker = no_wake,
) -> None:
    principal.require_self_or_service(user_id)
    if body.dismissed_user_id == user_id:
        raise DomainError("an attendee cannot dismiss themselves")
    with conn.transaction():
        event = _event(conn, code)
        if not repo.both_attend(conn, event.id, user_id, body.dismissed_user_id):
            raise NotFoundError("both users must be attendees of the event")
        dismissed = repo.dismiss(conn, event.id, user_id, body.dismissed_user_id)
    if dismissed:  # a new dismissal queued the pair (a repeated one changes nothing)
        wake_unless_present(conn, code, wake)


@retried
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
        priority=body.priority,
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
    are waited for: 'drained' for this worker is not enough. Rows waiting out a retry
    backoff are not live work (the status's rule, has_live_work): waiting for them would
    only end in a timeout; they stay queued and admin status shows them as waiting_retry."""
    from core.queue.worker import Matchmaker, run_worker  # noqa: PLC0415 - cold start

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
        if not has_live_work(queue_now(conn, event.id)):
            report.completed = completed
            return report
        if time.monotonic() > deadline - SYNC_POLL_S:
            raise MatchingTimeoutError(
                "synchronous matching ran out of time; the rest stays queued"
            )
        time.sleep(SYNC_POLL_S)


def start_matching(
    conn: Conn,
    principal: Principal,
    code: str,
    body: StartIn,
    invoke: Invoker,
    *,
    settings: Settings,
    dead_letter_depth: Callable[[], int | None],
) -> StartOut:
    """Queue the event's unmatched attendees (or everyone) at the given priority, start
    the matchmaker, and answer with the queue status as this start left it."""
    queued, figures = _enqueue_start(
        conn, principal, code, body, settings=settings, dead_letter_depth=dead_letter_depth
    )
    return StartOut(event=code, queued=queued, mode="queue", invoked=invoke(code), status=figures)


@retried
def _enqueue_start(
    conn: Conn,
    principal: Principal,
    code: str,
    body: StartIn,
    *,
    settings: Settings,
    dead_letter_depth: Callable[[], int | None],
) -> tuple[int, StatusOut]:
    principal.require_admin()
    event = _event(conn, code)
    # The status is read in the enqueue's transaction: the queue as this start left it,
    # before any run (a lingering one polls every 0.1 s) can claim the rows.
    with conn.transaction():
        queued = repo.enqueue_for_matching(
            conn,
            event.id,
            user_ids=None,
            only_unmatched=body.mode == "unmatched",
            priority=body.priority,
            reason=f"admin_{body.mode}",
        )
        figures = event_status(conn, event, settings, dead_letter_depth)
    return queued, figures


def status(
    conn: Conn,
    principal: Principal,
    code: str,
    settings: Settings,
    dead_letter_depth: Callable[[], int | None],
) -> StatusOut:
    """The event's status (core.api.status): what `matchmaker status` shows too."""
    principal.require_admin()
    return event_status(conn, _event(conn, code), settings, dead_letter_depth)


@retried
def update_settings(
    conn: Conn, principal: Principal, code: str, body: SettingsPatch, invoke: Invoker
) -> EventOut:
    principal.require_admin()
    with conn.transaction():
        event = _event(conn, code)
        settings = patched_settings(event.settings, body)
        changed = settings != event.settings
        if changed:
            repo.update_event_settings(conn, event.id, settings)  # the trigger re-queues
    if changed:
        invoke(code)
    return get_event(conn, principal, code)


def patched_settings(current: EventSettings, patch: SettingsPatch) -> EventSettings:
    """The current settings with the patch's fields (and weights) replaced, validated as a
    whole: InvalidInputError when the result is invalid (every weight 0)."""
    merged = {**current.model_dump(), **patch.model_dump(exclude_none=True)}
    if patch.weights is not None:
        merged["weights"] = {
            **current.weights.model_dump(),
            **patch.weights.model_dump(exclude_none=True),
        }
    try:
        return EventSettings.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        raise InvalidInputError(
            f"{field}: {first['msg'].removeprefix('Value error, ')}", field=field
        ) from exc


@retried
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


@retried
def redrive(conn: Conn, principal: Principal, code: str, invoke: Invoker) -> RedriveOut:
    principal.require_admin()
    event = _event(conn, code)
    requeued = repo.redrive_dead(conn, event.id, None)
    return RedriveOut(event=code, requeued=requeued, invoked=invoke(code) if requeued else False)

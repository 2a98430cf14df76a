"""An event's status, the same for the admin API and `matchmaker status`: current queue
counts apart from lifetime totals, a job state derived from those counts, coverage and
exposure of the lists, the embedder that serves the event, and the shared dead-letter
queue labelled as shared."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from core.api.schemas import (
    CoverageOut,
    DeadLetterQueueOut,
    EmbedderOut,
    ExposureOut,
    IcebreakersOut,
    JobState,
    QueueNowOut,
    StatusOut,
    TotalsOut,
)
from core.data import repository as repo
from core.data.repository import Conn
from core.models import EventRecord, EventSettings
from core.settings import Settings


def _count(row: dict[str, Any] | None, key: str) -> int:
    return int((row or {}).get(key) or 0)


def _when(moment: datetime | None) -> str:
    return moment.isoformat(timespec="seconds") if moment else "now"


def _users(n: int) -> str:
    return f"{n} user" if n == 1 else f"{n} users"


def _retries(queue: QueueNowOut) -> str:
    first, last = _when(queue.next_retry_at), _when(queue.last_retry_at)
    return f"at {first}" if first == last else f"next {first}, last {last}"


def has_live_work(queue: QueueNowOut) -> bool:
    """Rows a worker claims now or is matching: pending rows that never failed, and running
    rows under a live lease. Rows waiting out a retry backoff (or whose lease lapsed) are
    not live work: they count as waiting_retry (the synchronous trigger agrees)."""
    return queue.pending > 0 or queue.running > 0


def queue_now(conn: Conn, event_id: int) -> QueueNowOut:
    """The event's queue as the status shows it."""
    return _queue(repo.status_figures(conn, event_id).queue)


def job_state(paused: bool, queue: QueueNowOut, coverage: CoverageOut) -> tuple[JobState, str]:
    """The one place the state comes from: the first rule that holds, in this order."""
    if paused:
        return "paused", (
            f"paused: no worker claims its users ({queue.pending} pending, "
            f"{queue.waiting_retry} waiting for a retry, {queue.dead} dead)"
        )
    idle_queue = not has_live_work(queue)
    stranded = coverage.missing_matches if idle_queue and queue.waiting_retry == 0 else 0
    if queue.dead or queue.waiting_retry or stranded:
        problems = []
        if queue.dead:
            problems.append(f"{_users(queue.dead)} dead (redrive them once the cause is fixed)")
        if queue.waiting_retry:
            problems.append(
                f"{_users(queue.waiting_retry)} waiting for a retry ({_retries(queue)})"
            )
        if stranded:
            problems.append(
                f"{_users(stranded)} with fewer matches than they could have and nothing "
                "queued for them (start matching again)"
            )
        return "needs_attention", "; ".join(problems)
    if queue.running:
        return "running", f"a worker is matching {_users(queue.running)}; {queue.pending} pending"
    if queue.pending:
        return "queued", f"{_users(queue.pending)} pending; no worker has claimed them yet"
    return "idle", (
        "nothing queued; every active attendee has k matches or as many as the event allows"
    )


def _queue(row: dict[str, Any]) -> QueueNowOut:
    by_priority = {str(p): _count(row, f"pending_p{p}") for p in range(4)}
    return QueueNowOut(
        pending_by_priority=by_priority,
        pending=sum(by_priority.values()),
        running=_count(row, "running"),
        waiting_retry=_count(row, "waiting_retry"),
        next_retry_at=row.get("next_retry_at"),
        last_retry_at=row.get("last_retry_at"),
        dead=_count(row, "dead"),
        oldest_pending_age_s=row.get("oldest_pending_age_s"),
    )


def _coverage(row: dict[str, Any], k: int) -> CoverageOut:
    active = _count(row, "active")
    full = _count(row, "full_lists")
    return CoverageOut(
        k=k,
        active=active,
        full_lists=full,
        short_lists_few_candidates=_count(row, "short_lists_few_candidates"),
        missing_matches=_count(row, "missing_matches"),
        without_list=_count(row, "without_list"),
        full_ratio=round(full / active, 6) if active else None,
    )


def _exposure(row: dict[str, Any], event: EventSettings) -> ExposureOut:
    mean, gini = row.get("mean_appearances"), row.get("gini")
    hubness = event.exposure_correction == "hubness"
    return ExposureOut(
        correction=event.exposure_correction,
        hubness_m=event.hubness_m if hubness else None,
        max_appearances=_count(row, "max_appearances"),
        mean_appearances=round(mean, 6) if mean is not None else None,
        gini=round(gini, 6) if gini is not None else None,
    )


def event_status(
    conn: Conn,
    event: EventRecord,
    settings: Settings,
    dead_letter_depth: Callable[[], int | None],
) -> StatusOut:
    # Imported here: selection loads numpy and the local embedder, which only this
    # request of the API needs (cold start of the others).
    from core.embedding.selection import effective_embedder  # noqa: PLC0415

    figures = repo.status_figures(conn, event.id)
    job = figures.job or {}
    queue = _queue(figures.queue)
    coverage = _coverage(figures.coverage, event.settings.k)
    state, reason = job_state(bool(job.get("paused")), queue, coverage)
    choice = effective_embedder(
        event,
        settings,
        lambda key: repo.read_breaker(conn, key, settings.provider_probe_interval_s),
    )
    icebreakers = None
    if event.settings.icebreakers:
        pairs, covered = repo.icebreaker_coverage(conn, event.id)
        icebreakers = IcebreakersOut(
            pairs=pairs,
            with_icebreaker=covered,
            ratio=round(covered / pairs, 6) if pairs else None,
        )
    per_minute = repo.throughput(conn, event.id)
    return StatusOut(
        event=event.code,
        state=state,
        state_reason=reason,
        queue=queue,
        totals=TotalsOut(
            processed=_count(job, "processed_count"),
            failed=_count(job, "failed_count"),
            died=_count(job, "dead_count"),
            batches=_count(job, "batches"),
            lists_written=_count(job, "lists_written"),
        ),
        coverage=coverage,
        exposure=_exposure(figures.exposure, event.settings),
        embedder=EmbedderOut(
            configured=choice.configured,
            effective=choice.effective,
            reason=choice.reason,
            vectors_from=job.get("embedder_key"),
            breaker=choice.breaker,
            since=choice.since,
        ),
        icebreakers=icebreakers,
        dead_letter_queue=DeadLetterQueueOut(depth=dead_letter_depth()),
        throughput_per_min_5m=per_minute["5m"],
        throughput_per_min_60m=per_minute["60m"],
        last_run_at=job.get("last_batch_at"),
        last_error=job.get("last_error"),
        last_error_at=job.get("last_error_at"),
    )

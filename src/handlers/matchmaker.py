"""Matchmaker Lambda: invoked every minute by EventBridge Scheduler (the safety net), by
the wake queue's event source mapping (an SQS batch naming the events whose writes queued
work: those are served first) and asynchronously for fan-out (and by the API when the
stack has no wake queue). Drains the queue until MAX_RUNTIME_MS or the Lambda's own
deadline (minus WORKER_SAFETY_MS) nears; users that exhaust their attempts go to the SQS
dead-letter queue. A run the wake queue started lingers: it keeps polling for new rows
for WAKE_LINGER_SECONDS after the queue ran dry, holding a presence lease that tells the
API not to send wakes (core/queue/worker.py, Matchmaker.run)."""

from __future__ import annotations

import json
from typing import Any, Literal

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, ValidationError

from core import aws
from core.data import repository as repo
from core.data.connections import ConnectionCache
from core.data.repository import Conn, QueueOutcome
from core.models import EventCode
from core.observability import MetricName, logger, metrics, metrics_enabled, tracer
from core.queue.deadline import monotonic_deadline
from core.queue.worker import Matchmaker, WorkerReport, run_worker
from core.settings import get_settings

connections = ConnectionCache("matchmaker-worker")
_matchmaker: Matchmaker | None = None  # event state survives warm invocations


class Invocation(BaseModel):
    """The scheduler's Input, or the payload of an async invoke from the API."""

    model_config = ConfigDict(extra="ignore")
    source: Literal["schedule", "trigger", "admin", "fan-out", "wake"] = "schedule"
    event_code: EventCode | None = None
    # A wake batch names several events (deduplicated, in the order they arrived).
    event_codes: list[EventCode] = []


class WakeMessage(BaseModel):
    """The body the API sends to the wake queue (core.aws.send_wake)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["matchmaking.wake"] = "matchmaking.wake"
    event_code: EventCode


def invocation_of(event: dict[str, Any]) -> Invocation:
    """The schedule's or an async invoke's payload, or an SQS batch from the wake queue.
    A wake that cannot be read is logged and skipped: it only asks for a run, which this
    one is, so retrying it would add nothing."""
    records = (event or {}).get("Records")
    if not isinstance(records, list):
        invocation = Invocation.model_validate(event or {})
        if invocation.event_code and not invocation.event_codes:
            invocation.event_codes = [invocation.event_code]
        return invocation
    codes: dict[str, None] = {}
    for record in records:
        try:
            codes[WakeMessage.model_validate_json(record.get("body") or "").event_code] = None
        except (ValidationError, AttributeError, json.JSONDecodeError):
            logger.warning(
                "unreadable wake message skipped",
                extra={"message_id": record.get("messageId") if isinstance(record, dict) else None},
            )
    return Invocation(source="wake", event_codes=list(codes))


def event_ids_of(conn: Conn, codes: list[str]) -> list[int]:
    """The ids of the events that exist, in the given order (a deleted event is skipped)."""
    events = (repo.fetch_event(conn, code) for code in codes)
    return [event.id for event in events if event is not None]


def _matchmaker_for() -> Matchmaker:
    global _matchmaker  # noqa: PLW0603 - deliberate warm-container cache
    if _matchmaker is None:
        _matchmaker = Matchmaker(get_settings())
    return _matchmaker


def fan_out(conn: Conn, function_name: str) -> int:
    """Start more runs for a big backlog (a from-scratch import, a full rematch): each one
    claims its own rows and scores them without the event lock, so they overlap on
    embedding and the matrix products and queue only for the short commit. Bounded by
    MAX_PARALLEL_WORKERS (the reserved concurrency, which also caps the database
    connections workers hold); helpers never fan out themselves."""
    settings = get_settings()
    if settings.max_parallel_workers <= 1:
        return 0
    wanted = repo.live_queue_depth(conn) // settings.fanout_backlog_per_worker
    helpers = min(settings.max_parallel_workers - 1, wanted)
    started = sum(aws.invoke_matchmaker(function_name, None, "fan-out") for _ in range(helpers))
    if started:
        metrics.add_metric(name=MetricName.FAN_OUT_RUNS, unit=MetricUnit.Count, value=started)
    return started


def add_run_metrics(conn: Conn, report: WorkerReport) -> None:
    """What a run did and what it left behind (docs/reliability.md, the dashboard)."""
    metrics.add_metric(name=MetricName.USERS_MATCHED, unit=MetricUnit.Count, value=report.completed)
    metrics.add_metric(
        name=MetricName.BATCHES_PROCESSED, unit=MetricUnit.Count, value=report.batches
    )
    if report.batches:
        metrics.add_metric(
            name=MetricName.BATCH_DURATION_SECONDS,
            unit=MetricUnit.Seconds,
            value=report.elapsed_s / report.batches,
        )
    metrics.add_metric(
        name=MetricName.QUEUE_DEPTH, unit=MetricUnit.Count, value=repo.live_queue_depth(conn)
    )
    p0, p1, p2, p3 = repo.pending_by_priority(conn)
    metrics.add_metric(name=MetricName.QUEUE_PENDING_P0, unit=MetricUnit.Count, value=p0)
    metrics.add_metric(name=MetricName.QUEUE_PENDING_P1, unit=MetricUnit.Count, value=p1)
    metrics.add_metric(name=MetricName.QUEUE_PENDING_P2, unit=MetricUnit.Count, value=p2)
    metrics.add_metric(name=MetricName.QUEUE_PENDING_P3, unit=MetricUnit.Count, value=p3)
    metrics.add_metric(
        name=MetricName.OLDEST_PENDING_AGE_SECONDS,
        unit=MetricUnit.Seconds,
        value=repo.oldest_pending_age_s(conn),
    )
    if report.fallback_users:
        metrics.add_metric(
            name=MetricName.PROVIDER_FALLBACKS, unit=MetricUnit.Count, value=report.fallback_users
        )
    if metrics_enabled():  # one value per newcomer: CloudWatch computes the percentiles
        for latency_ms in report.newcomer_latencies_ms:
            metrics.add_metric(
                name=MetricName.NEWCOMER_LATENCY_MS, unit=MetricUnit.Milliseconds, value=latency_ms
            )


@logger.inject_lambda_context(log_event=False)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    invocation = invocation_of(event)
    settings = get_settings()
    deadline = monotonic_deadline(
        context.get_remaining_time_in_millis(), settings.max_runtime_ms, settings.worker_safety_ms
    )
    conn = connections.get(settings)

    def dead_letters(outcomes: list[QueueOutcome]) -> None:
        metrics.add_metric(name=MetricName.DEAD_LETTERS, unit=MetricUnit.Count, value=len(outcomes))
        if settings.dead_letter_queue_url:
            aws.send_dead_letters(conn, settings.dead_letter_queue_url, outcomes)

    def wake_successor(event_code: str) -> bool:
        return aws.send_wake(settings.wake_queue_url, event_code, "successor")

    try:
        helpers = 0 if invocation.source == "fan-out" else fan_out(conn, context.function_name)
        report = run_worker(
            conn,
            settings,
            deadline=deadline,
            matchmaker=_matchmaker_for(),
            on_dead=dead_letters,
            first_event_ids=event_ids_of(conn, invocation.event_codes),
            # A run the wake queue started stays for the joins that follow (the API sends
            # no wake meanwhile); scheduled and fan-out runs leave when the queue is dry.
            linger_s=settings.wake_linger_seconds if invocation.source == "wake" else 0.0,
            wake=wake_successor if settings.wake_queue_url else None,
        )
    except Exception:
        connections.discard()  # a broken connection must not poison the next invocation
        raise
    add_run_metrics(conn, report)
    summary = {
        "source": invocation.source,
        "woken_for": len(invocation.event_codes),
        "fanned_out": helpers,
        "batches": report.batches,
        "completed": report.completed,
        "failed": report.failed,
        "dead": len(report.dead),
        "recovered": report.recovered,
        "lists_written": report.lists_written,
        "stopped": report.stopped,
        "lingered_s": round(report.lingered_s, 3),
        "woke_successor_for": report.woke_for,
        "elapsed_s": round(report.elapsed_s, 3),
    }
    logger.info("matchmaker run", extra=summary)
    return summary

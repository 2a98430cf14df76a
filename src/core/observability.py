"""The one place that configures logging and metrics for the core and the handlers, and the
registry of every custom metric the code emits (names, units, dimensions): the CloudWatch
dashboard in template.yaml and docs/reliability.md are checked against it."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.logging.formatter import LambdaPowertoolsFormatter
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.metrics.functions import is_metrics_disabled
from aws_xray_sdk.core.models.entity import Entity

from core.settings import get_settings

SERVICE_NAME = "matchmaker"
# The template sets POWERTOOLS_METRICS_NAMESPACE to the same value (a test checks it).
METRICS_NAMESPACE = "Matchmaker"

# PostgreSQL's DETAIL of an error can quote a row or a key's values ("Failing row contains
# (...)", "Key (user_id)=(...) already exists"): personal data. psycopg puts it in str(exc),
# so in every logged message, traceback and extra field; the formatter removes it.
_DATABASE_DETAIL = re.compile(r"^(\s*DETAIL:)[^\n]*", re.MULTILINE)
ROW_DATA_REMOVED = r"\1  (removed: may contain row data)"


def scrub(value: Any) -> Any:
    """value with every PostgreSQL DETAIL line blanked, in strings at any depth (objects
    become their str(), as the JSON serialiser would write them)."""
    if isinstance(value, str):
        return _DATABASE_DETAIL.sub(ROW_DATA_REMOVED, value)
    if isinstance(value, dict):
        return {key: scrub(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(item) for item in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    # anything else (an exception in stack_trace, ...) would be serialised with str()
    return scrub(str(value))


def _scrubbed_entity_json(entity: Entity) -> str:
    return json.dumps(scrub(entity.to_dict()), default=str)


# X-Ray records an exception's str() in a subsegment's cause (and Powertools the exception
# itself as metadata): the same scrub on every segment and subsegment sent to the daemon.
Entity.serialize = _scrubbed_entity_json


class ScrubbingFormatter(LambdaPowertoolsFormatter):
    """Powertools' JSON log records, scrubbed of database row contents (see scrub)."""

    def serialize(self, log: dict[str, Any]) -> str:  # type: ignore[override]
        return super().serialize(log=scrub(log))


logger = Logger(
    service=SERVICE_NAME, level=get_settings().log_level, logger_formatter=ScrubbingFormatter()
)
metrics = Metrics(namespace=METRICS_NAMESPACE, service=SERVICE_NAME)
# Only what the code calls: botocore (SQS, Lambda, Secrets Manager) and, below, psycopg.
# The default, patch_all, also tries a dozen libraries we never use (sqlite3 among them).
# Response capture is off wherever a response can hold profiles, lists or reasons (every API
# route and the API handler: `capture_response=False` on their decorators, a test checks);
# X-Ray keeps timings and errors, never personal data.
tracer = Tracer(service=SERVICE_NAME, patch_modules=("botocore",))
if not tracer.disabled:
    # SQL subsegments for queries run through conn.cursor(). X-Ray's psycopg patcher wraps
    # psycopg.connect, then fails on psycopg_pool (not installed): tolerated, as patch_all
    # always did, so that a deployed function traces exactly what it traced before.
    tracer.provider.patch(["psycopg"], raise_errors=False)  # type: ignore[call-arg]


class Dimension(StrEnum):
    """Dimension names. Powertools adds service=matchmaker to every metric; nothing else
    is added, so each metric is one CloudWatch metric (one dimension set, one value)."""

    SERVICE = "service"


class MetricName(StrEnum):
    """Every custom metric: `add_metric(name=MetricName.X, ...)` is the only way to name one."""

    USERS_MATCHED = "UsersMatched"
    BATCHES_PROCESSED = "BatchesProcessed"
    BATCH_DURATION_SECONDS = "BatchDurationSeconds"
    QUEUE_DEPTH = "QueueDepth"
    # pending rows per queue priority (0 rematch ... 3 newcomer): four names rather than a
    # Priority dimension - the same four CloudWatch metrics, but they stay in the one EMF
    # record per run with the one dimension set (another dimension set needs a record per
    # value, which Powertools' single_metric prints even when metrics are disabled)
    QUEUE_PENDING_P0 = "QueuePendingP0"
    QUEUE_PENDING_P1 = "QueuePendingP1"
    QUEUE_PENDING_P2 = "QueuePendingP2"
    QUEUE_PENDING_P3 = "QueuePendingP3"
    OLDEST_PENDING_AGE_SECONDS = "OldestPendingAgeSeconds"
    NEWCOMER_LATENCY_MS = "NewcomerLatencyMs"
    DEAD_LETTERS = "DeadLetters"
    DEAD_LETTERS_REDRIVEN = "DeadLettersRedriven"
    FAN_OUT_RUNS = "FanOutRuns"
    PROVIDER_RETRIES = "ProviderRetries"
    PROVIDER_FAULTS = "ProviderFaults"
    PROVIDER_FALLBACKS = "ProviderFallbacks"
    PROVIDER_REQUESTS = "ProviderRequests"
    PROVIDER_INPUTS = "ProviderInputs"
    PROVIDER_TOKENS = "ProviderTokens"
    PROVIDER_BREAKER_OPEN = "ProviderBreakerOpen"
    ATTENDEES_UPSERTED = "AttendeesUpserted"
    WAKES_SENT = "WakesSent"
    WAKE_FAILURES = "WakeFailures"
    WAKES_SKIPPED = "WakesSkipped"


@dataclass(frozen=True)
class MetricSpec:
    unit: MetricUnit
    emitted_by: str
    meaning: str
    dimensions: tuple[Dimension, ...] = (Dimension.SERVICE,)


_MATCHMAKER = "MatchmakerFunction (handlers/matchmaker.py)"
_PENDING = "Pending rows of priority {p} ({what}) in the whole queue at the end of a run."

METRICS: dict[MetricName, MetricSpec] = {
    MetricName.USERS_MATCHED: MetricSpec(
        MetricUnit.Count, _MATCHMAKER, "Queue rows completed (users whose lists are current)."
    ),
    MetricName.BATCHES_PROCESSED: MetricSpec(
        MetricUnit.Count, _MATCHMAKER, "Batches claimed and settled in a run."
    ),
    MetricName.BATCH_DURATION_SECONDS: MetricSpec(
        MetricUnit.Seconds, _MATCHMAKER, "Mean duration of a run's batches."
    ),
    MetricName.QUEUE_DEPTH: MetricSpec(
        MetricUnit.Count, _MATCHMAKER, "Live queue rows (pending and running) after a run."
    ),
    MetricName.QUEUE_PENDING_P0: MetricSpec(
        MetricUnit.Count, _MATCHMAKER, _PENDING.format(p=0, what="rematch, changed settings")
    ),
    MetricName.QUEUE_PENDING_P1: MetricSpec(
        MetricUnit.Count, _MATCHMAKER, _PENDING.format(p=1, what="a neighbour left")
    ),
    MetricName.QUEUE_PENDING_P2: MetricSpec(
        MetricUnit.Count, _MATCHMAKER, _PENDING.format(p=2, what="profile update, dismissal")
    ),
    MetricName.QUEUE_PENDING_P3: MetricSpec(
        MetricUnit.Count, _MATCHMAKER, _PENDING.format(p=3, what="newcomer")
    ),
    MetricName.OLDEST_PENDING_AGE_SECONDS: MetricSpec(
        MetricUnit.Seconds, _MATCHMAKER, "Age of the oldest pending row after a run (alarmed)."
    ),
    MetricName.NEWCOMER_LATENCY_MS: MetricSpec(
        MetricUnit.Milliseconds,
        _MATCHMAKER,
        "One value per newcomer (a row queued by a join): from its enqueue to the commit "
        "that wrote its list.",
    ),
    MetricName.DEAD_LETTERS: MetricSpec(
        MetricUnit.Count, _MATCHMAKER, "Users whose attempts ran out in a run (sent to the DLQ)."
    ),
    MetricName.DEAD_LETTERS_REDRIVEN: MetricSpec(
        MetricUnit.Count,
        "RedriveFunction (handlers/redrive.py)",
        "Dead users put back into the queue from the redrive queue.",
    ),
    MetricName.FAN_OUT_RUNS: MetricSpec(
        MetricUnit.Count, _MATCHMAKER, "Helper runs a run started for a big backlog."
    ),
    MetricName.PROVIDER_RETRIES: MetricSpec(
        MetricUnit.Count,
        "core/embedding/openai_provider.py (worker, API trigger)",
        "Embeddings API requests retried after a 429, a 5xx, a timeout or a lost connection.",
    ),
    MetricName.PROVIDER_FAULTS: MetricSpec(
        MetricUnit.Count,
        "core/embedding/openai_provider.py (worker, API trigger)",
        "Embeddings API requests that failed for good, whatever the class (logged as "
        "fault=transient|permanent|malformed|input|deadline): provider faults defer their "
        "users and feed the circuit breaker; a rejected input fails its user alone.",
    ),
    MetricName.PROVIDER_FALLBACKS: MetricSpec(
        MetricUnit.Count,
        _MATCHMAKER,
        "Users of events that ask for OpenAI embedded by the local embedder (no key set, "
        "or the provider's circuit breaker is open).",
    ),
    MetricName.PROVIDER_REQUESTS: MetricSpec(
        MetricUnit.Count,
        "core/embedding/openai_provider.py (worker, API trigger)",
        "Embeddings API requests sent (retries and probes included).",
    ),
    MetricName.PROVIDER_INPUTS: MetricSpec(
        MetricUnit.Count,
        "core/embedding/openai_provider.py (worker, API trigger)",
        "Texts sent to the embeddings API (retries included).",
    ),
    MetricName.PROVIDER_TOKENS: MetricSpec(
        MetricUnit.Count,
        "core/embedding/openai_provider.py (worker, API trigger)",
        "Tokens the embeddings API reported as used.",
    ),
    MetricName.PROVIDER_BREAKER_OPEN: MetricSpec(
        MetricUnit.Count,
        _MATCHMAKER,
        "1 when the provider's circuit breaker is open at the end of a run (its events are "
        "served by the local embedder), else 0.",
    ),
    MetricName.ATTENDEES_UPSERTED: MetricSpec(
        MetricUnit.Count, "ApiFunction (handlers/api.py)", "Attendees created or updated."
    ),
    MetricName.WAKES_SENT: MetricSpec(
        MetricUnit.Count,
        "ApiFunction (handlers/api.py)",
        "Wake messages sent to the wake queue after a write that queued work.",
    ),
    MetricName.WAKE_FAILURES: MetricSpec(
        MetricUnit.Count,
        "ApiFunction (handlers/api.py)",
        "Wakes that could not be sent: the work stays queued for the next schedule tick.",
    ),
    MetricName.WAKES_SKIPPED: MetricSpec(
        MetricUnit.Count,
        "ApiFunction (handlers/api.py)",
        "Wakes not sent after a write that queued work because a woken matchmaker run was "
        "present (lingering): that run claims the work before it exits.",
    ),
}


def metrics_enabled() -> bool:
    """False when POWERTOOLS_METRICS_DISABLED (local runs). Metrics with many values per
    run check it: Powertools prints a metric early every 100 values, even when disabled."""
    return not is_metrics_disabled()


def quiet_for_cli(level: int = logging.WARNING) -> None:
    """Command-line runs print their own progress; JSON logs would drown it."""
    logger.setLevel(level)

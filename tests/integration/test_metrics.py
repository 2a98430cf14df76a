"""The metrics behind the CloudWatch dashboard, as the code really emits them: the scheduled
matchmaker run on a real PostgreSQL (moto for AWS), its Powertools EMF output read from
stdout; and the OpenAI embedder's retries and faults against the fake OpenAI API.

Every record must use the namespace, the dimension set and the units of the registry in
core/observability.py, which tests/unit/test_template.py holds the dashboard to."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import openai
import pytest
from moto import mock_aws

import core.settings
import handlers.matchmaker
from core.data import repository as repo
from core.data.repository import Conn
from core.embedding.errors import EmbeddingError, ProviderUnavailableError
from core.embedding.openai_provider import OpenAIEmbedder, profile_texts
from core.observability import METRICS, METRICS_NAMESPACE, SERVICE_NAME, MetricName, metrics
from core.queue.worker import Matchmaker
from tests.helpers import PoisonEmbedder, add_attendees, queue_rows
from tests.integration.api_support import AWS_ENV, database_behind_secrets, reset_handler_state
from tests.integration.test_worker_handlers import FakeContext
from tooling.synthetic import generate_profiles

if TYPE_CHECKING:
    from tests.fake_openai import FakeOpenAI

pytest_plugins = ("tests.fake_openai",)

Emitted = dict[str, list[float]]
WAIT_BEFORE_RUN_S = 0.3


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, db_url: str) -> Iterator[None]:
    """moto for AWS and the test database behind Secrets Manager, as in the stack; no
    metrics left over from other tests, and metrics on."""
    for name, value in {**AWS_ENV, "MAX_ATTEMPTS": "2", "BACKOFF_BASE_S": "0"}.items():
        monkeypatch.setenv(name, value)
    for name in ("DATABASE_URL", "POWERTOOLS_METRICS_DISABLED", "POWERTOOLS_DEV"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    metrics.clear_metrics()
    with mock_aws():
        database_behind_secrets(monkeypatch, db_url)
        reset_handler_state()
        yield
        reset_handler_state()
    metrics.clear_metrics()


def emf_records(stdout: str) -> list[dict[str, Any]]:
    """The EMF records among the JSON lines on stdout (the logger writes there too)."""
    records = []
    for line in stdout.splitlines():
        if line.startswith("{") and '"_aws"' in line:
            records.append(json.loads(line))
    return records


def emitted(stdout: str) -> Emitted:
    """Metric name -> every value emitted, after checking each record's namespace,
    dimension set and units against the registry."""
    values: Emitted = {}
    records = emf_records(stdout)
    assert records, "no metrics were flushed"
    for record in records:
        [directive] = record["_aws"]["CloudWatchMetrics"]
        assert directive["Namespace"] == METRICS_NAMESPACE
        for definition in directive["Metrics"]:
            spec = METRICS[MetricName(definition["Name"])]
            assert directive["Dimensions"] == [[str(d) for d in spec.dimensions]]
            assert definition["Unit"] == spec.unit.value
            value = record[definition["Name"]]
            values.setdefault(definition["Name"], []).extend(
                value if isinstance(value, list) else [value]
            )
        assert record["service"] == SERVICE_NAME
    return values


def run_matchmaker(
    capsys: pytest.CaptureFixture[str], remaining_ms: int = 60_000
) -> tuple[dict[str, Any], Emitted]:
    capsys.readouterr()  # only this run's output
    summary = handlers.matchmaker.lambda_handler({"source": "schedule"}, FakeContext(remaining_ms))
    return summary, emitted(capsys.readouterr().out)


def test_a_run_emits_users_matched_and_each_newcomers_latency(
    conn: Conn, aws: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Given 8 matched attendees queued again for a rematch and 30 newcomers who joined a
    while before the run, a scheduled run reports UsersMatched = all 38 users it completed,
    one NewcomerLatencyMs per newcomer only, counted from their join (not from the claim)
    up to at most now, and an empty queue at every priority."""
    rematched = add_attendees(conn, "metrics-1a", generate_profiles(8, seed=30, id_prefix="r-"))
    run_matchmaker(capsys)
    repo.enqueue_for_matching(
        conn, rematched.id, user_ids=None, only_unmatched=False, priority=0, reason="admin_all"
    )
    joined = time.time()
    add_attendees(conn, "metrics-1", generate_profiles(30, seed=31, id_prefix="m-"))
    time.sleep(WAIT_BEFORE_RUN_S)
    summary, values = run_matchmaker(capsys)
    elapsed_ms = (time.time() - joined) * 1000

    assert summary["completed"] == 38 and queue_rows(conn) == []
    assert values[MetricName.USERS_MATCHED] == [38.0]
    assert sum(values[MetricName.BATCHES_PROCESSED]) == summary["batches"] >= 2
    latencies = values[MetricName.NEWCOMER_LATENCY_MS]
    assert len(latencies) == 30
    # the database's clock and this one are the same machine's: 5 ms of slack for rounding
    assert all(
        WAIT_BEFORE_RUN_S * 1000 - 5 <= latency <= elapsed_ms + 5 for latency in latencies
    ), (latencies, elapsed_ms)
    for pending in ("QueuePendingP0", "QueuePendingP1", "QueuePendingP2", "QueuePendingP3"):
        assert values[pending] == [0.0], pending
    assert values[MetricName.QUEUE_DEPTH] == [0.0]
    assert values[MetricName.OLDEST_PENDING_AGE_SECONDS] == [0.0]
    assert MetricName.DEAD_LETTERS not in values
    assert MetricName.PROVIDER_FALLBACKS not in values


def test_the_queue_left_behind_is_counted_per_priority(
    conn: Conn, aws: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given 8 matched attendees queued again for a rematch (priority 0) and 12 newcomers
    (priority 3), a run with no time to start a batch reports 8 pending at p0 and 12 at
    p3, matches nobody and reports no newcomer latency."""
    rematched = add_attendees(conn, "metrics-2a", generate_profiles(8, seed=32, id_prefix="r-"))
    run_matchmaker(capsys)
    queued = repo.enqueue_for_matching(
        conn, rematched.id, user_ids=None, only_unmatched=False, priority=0, reason="admin_all"
    )
    assert queued == 8
    add_attendees(conn, "metrics-2b", generate_profiles(12, seed=33, id_prefix="n-"))
    monkeypatch.setenv("WORKER_SAFETY_MS", "15000")
    core.settings.get_settings.cache_clear()

    summary, values = run_matchmaker(capsys, remaining_ms=15_200)

    assert (summary["completed"], summary["stopped"]) == (0, "deadline")
    assert values[MetricName.USERS_MATCHED] == [0.0]
    pending = [values[f"QueuePendingP{p}"] for p in range(4)]
    assert pending == [[8.0], [0.0], [0.0], [12.0]]
    assert values[MetricName.QUEUE_DEPTH] == [20.0]
    assert values[MetricName.OLDEST_PENDING_AGE_SECONDS][0] > 0
    assert MetricName.NEWCOMER_LATENCY_MS not in values


def test_dead_users_are_counted(
    conn: Conn, aws: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given one profile that can never be embedded and MAX_ATTEMPTS=2, the run that kills
    it reports DeadLetters = 1, and UsersMatched counts only the others."""
    monkeypatch.setattr(
        handlers.matchmaker,
        "_matchmaker",
        Matchmaker(
            core.settings.get_settings(), embedder_for=lambda _e: PoisonEmbedder({"d-000004"})
        ),
    )
    add_attendees(conn, "metrics-3", generate_profiles(10, seed=34, id_prefix="d-"))

    summary, values = run_matchmaker(capsys)

    assert summary["dead"] == 1
    assert sum(values[MetricName.DEAD_LETTERS]) == 1
    assert values[MetricName.USERS_MATCHED] == [float(summary["completed"])] == [9.0]


def test_an_openai_event_without_a_key_counts_its_users_as_fallbacks(
    conn: Conn, aws: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Given an event that asks for OpenAI embeddings and no key configured, its users are
    matched with the local embedder and counted as ProviderFallbacks."""
    add_attendees(
        conn, "metrics-4", generate_profiles(6, seed=35, id_prefix="o-"), embedder="openai"
    )
    local = add_attendees(conn, "metrics-5", generate_profiles(4, seed=36, id_prefix="l-"))

    summary, values = run_matchmaker(capsys)

    assert summary["completed"] == 10 and queue_rows(conn, local.id) == []
    assert values[MetricName.PROVIDER_FALLBACKS] == [6.0]


# --- the OpenAI embedder ------------------------------------------------------------------


def embedder_for(fake: FakeOpenAI, max_attempts: int) -> OpenAIEmbedder:
    client = openai.OpenAI(api_key="test", base_url=fake.base_url, max_retries=0)
    return OpenAIEmbedder(client, dimensions=16, max_attempts=max_attempts, sleep=lambda _s: None)


def test_the_openai_embedder_counts_its_retries_and_its_faults(fake_openai: FakeOpenAI) -> None:
    """A 429 then success is one ProviderRetries and no fault; a provider answering 500 to
    every attempt is (attempts - 1) retries and one ProviderFaults; a rejected input is a
    fault without retries."""
    profile = generate_profiles(1, seed=37)[0]
    assert profile_texts(profile)[0]  # it has interests: a text to reject
    metrics.clear_metrics()
    try:
        fake_openai.faults.append({"status": 429})
        embedder_for(fake_openai, max_attempts=3).embed([profile])
        assert metrics.metric_set[MetricName.PROVIDER_RETRIES]["Value"] == [1.0]
        assert MetricName.PROVIDER_FAULTS not in metrics.metric_set

        fake_openai.fail_all = {"status": 500}
        with pytest.raises(ProviderUnavailableError):
            embedder_for(fake_openai, max_attempts=3).embed([profile])
        assert metrics.metric_set[MetricName.PROVIDER_RETRIES]["Value"] == [1.0, 1.0, 1.0]
        assert metrics.metric_set[MetricName.PROVIDER_FAULTS]["Value"] == [1.0]
        fake_openai.fail_all = None

        fake_openai.reject_inputs.add(profile_texts(profile)[0])
        with pytest.raises(EmbeddingError):
            embedder_for(fake_openai, max_attempts=3).embed([profile])
        assert metrics.metric_set[MetricName.PROVIDER_RETRIES]["Value"] == [1.0, 1.0, 1.0]
        assert metrics.metric_set[MetricName.PROVIDER_FAULTS]["Value"] == [1.0, 1.0]

        record = metrics.serialize_metric_set()
        assert record["_aws"]["CloudWatchMetrics"][0]["Namespace"] == METRICS_NAMESPACE
        assert record["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["service"]]
    finally:
        metrics.clear_metrics()

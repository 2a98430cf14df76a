"""The scheduled matchmaker and the redrive consumer, invoked with the events/ files, a
real PostgreSQL and moto for SQS / Secrets Manager; and the committed OpenAPI document.
(The migrations custom resource has its own module, test_migrate_handler.py.)"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

import core.aws
import core.settings
import handlers.matchmaker
import handlers.redrive
from core.data import repository as repo
from core.queue.worker import Matchmaker, default_embedder
from handlers.api import openapi_document
from tests.helpers import PoisonEmbedder, add_attendees, queue_rows
from tests.integration.api_support import AWS_ENV, database_behind_secrets, reset_handler_state
from tooling.oracle import verify_event
from tooling.synthetic import generate_profiles

EVENTS = Path(__file__).resolve().parents[2] / "events"


def load_event(name: str) -> Any:
    return json.loads((EVENTS / name).read_text())


@dataclass
class FakeContext:
    """What Powertools and the handlers read from a Lambda context."""

    remaining_ms: int = 60_000
    function_name: str = "matchmaker-MatchmakerFunction"
    memory_limit_in_mb: int = 1024
    invoked_function_arn: str = (
        "arn:aws:lambda:us-east-1:123456789012:function:matchmaker-MatchmakerFunction"
    )
    aws_request_id: str = "0f4b2e1c-6a53-4b8e-9d2f-3c1e5a7b9d10"

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, db_url: str) -> Iterator[dict[str, str]]:
    """moto for AWS, the test database through Secrets Manager (as in the stack)."""
    for name, value in {
        **AWS_ENV,
        "MAX_ATTEMPTS": "2",
        "BACKOFF_BASE_S": "0",
        "BACKOFF_MAX_S": "0",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with mock_aws():
        dlq = database_behind_secrets(monkeypatch, db_url)
        reset_handler_state()
        yield {"dlq": dlq}
        reset_handler_state()


def dead_letter_messages(queue_url: str) -> list[dict[str, Any]]:
    sqs = boto3.client("sqs")
    found: list[dict[str, Any]] = []
    while True:
        batch = sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, VisibilityTimeout=30
        ).get("Messages", [])
        if not batch:
            return found
        found.extend(batch)


def test_a_scheduled_run_drains_the_queue_through_the_secret(conn, aws):
    """Given newcomers and the database reachable only through Secrets Manager, when the
    scheduler invokes the matchmaker with events/matchmaker/scheduled.json, then every
    list is exact and the summary says the queue drained."""
    event = add_attendees(conn, "techconf-2026", generate_profiles(80, seed=21, id_prefix="s-"))
    summary = handlers.matchmaker.lambda_handler(
        load_event("matchmaker/scheduled.json"), FakeContext()
    )
    assert summary["completed"] == 80
    assert summary["stopped"] == "drained"
    assert queue_rows(conn, event.id) == []
    assert verify_event(conn, event, default_embedder(event).key).ok


def test_a_short_remaining_time_stops_early_and_the_next_run_finishes(conn, aws, monkeypatch):
    """Given a Lambda with little time left (remaining minus the safety margin is
    shorter than a batch), the run processes nothing and leaves the queue for the next
    invocation, which (with normal time) drains it."""
    monkeypatch.setenv("WORKER_SAFETY_MS", "15000")
    core.settings.get_settings.cache_clear()
    event = add_attendees(conn, "techconf-2026", generate_profiles(40, seed=22, id_prefix="t-"))
    trigger = load_event("matchmaker/trigger.json")

    hurried = handlers.matchmaker.lambda_handler(trigger, FakeContext(remaining_ms=15_200))
    assert (hurried["completed"], hurried["stopped"]) == (0, "deadline")
    assert len(queue_rows(conn, event.id)) == 40

    relaxed = handlers.matchmaker.lambda_handler(trigger, FakeContext(remaining_ms=60_000))
    assert (relaxed["completed"], relaxed["stopped"]) == (40, "drained")
    assert verify_event(conn, event, default_embedder(event).key).ok


def test_a_user_that_always_fails_reaches_the_dead_letter_queue_and_is_redriven(
    conn, aws, monkeypatch
):
    """Given one profile that can never be embedded, when the matchmaker runs, then after
    MAX_ATTEMPTS the user is dead in the database and one message describing it is in the
    SQS dead-letter queue; replaying that message (twice) through the redrive consumer
    re-queues the user once, and after the cause is fixed they are matched."""
    poison = PoisonEmbedder({"p-000003"})
    monkeypatch.setattr(
        handlers.matchmaker,
        "_matchmaker",
        Matchmaker(core.settings.get_settings(), embedder_for=lambda _e: poison),
    )
    event = add_attendees(conn, "techconf-2026", generate_profiles(30, seed=23, id_prefix="p-"))

    summary = handlers.matchmaker.lambda_handler(
        load_event("matchmaker/scheduled.json"), FakeContext()
    )
    assert summary["dead"] == 1
    [dead] = [r for r in queue_rows(conn, event.id)]
    assert (dead["user_id"], dead["status"], dead["attempts"]) == ("p-000003", "dead", 2)
    messages = dead_letter_messages(aws["dlq"])
    assert len(messages) == 1
    letter = json.loads(messages[0]["Body"])
    assert letter["user_id"] == "p-000003"
    assert letter["event_code"] == "techconf-2026"
    assert "provider rejected" in letter["last_error"]
    assert repo.job_status(conn, event.id)["queue"]["dead"] == 1

    # Replay through the redrive consumer, with the same message twice in one batch.
    batch = load_event("redrive/sqs_batch.json")
    template = batch["Records"][0]
    batch["Records"] = [
        {**template, "messageId": f"m-{i}", "body": messages[0]["Body"]} for i in range(2)
    ]
    response = handlers.redrive.lambda_handler(batch, FakeContext())
    assert response["batchItemFailures"] == []
    rows = queue_rows(conn, event.id)
    assert [(r["user_id"], r["status"], r["attempts"], r["reason"]) for r in rows] == [
        ("p-000003", "pending", 0, "redrive")
    ]
    poison.poison.clear()
    handlers.matchmaker.lambda_handler(load_event("matchmaker/scheduled.json"), FakeContext())
    assert queue_rows(conn, event.id) == []
    assert verify_event(conn, event, default_embedder(event).key).ok


def test_the_redrive_consumer_reports_only_the_bad_records(conn, aws):
    """Given a batch with a malformed message and a valid one, the response lists only
    the malformed record as a failure (partial batch response)."""
    add_attendees(conn, "techconf-2026", generate_profiles(3, seed=24, id_prefix="r-"))
    batch = load_event("redrive/sqs_batch.json")
    batch["Records"][0]["body"] = "not json"
    response = handlers.redrive.lambda_handler(batch, FakeContext())
    assert response["batchItemFailures"] == [{"itemIdentifier": batch["Records"][0]["messageId"]}]


def test_the_committed_openapi_document_matches_the_code():
    """docs/openapi.json is generated from the resolver; regenerate it with
    `make openapi` when routes or models change."""
    committed = json.loads((EVENTS.parent / "docs" / "openapi.json").read_text())
    assert committed == openapi_document()


# A helper run in its own process. It says "ready" once imported, like a warm container
# that an async invoke reaches at once, so the runs really overlap.
HELPER_RUN = """
import json, sys
import handlers.matchmaker
from tests.integration.test_worker_handlers import FakeContext
print("ready", flush=True)
print(json.dumps(handlers.matchmaker.lambda_handler(json.loads(sys.argv[1]), FakeContext())))
"""


def test_a_big_backlog_fans_out_to_parallel_runs_that_end_exact(conn, aws, db_url, monkeypatch):
    """Given 2,000 newcomers, MAX_PARALLEL_WORKERS=3 and a backlog of 500 per worker, a
    scheduled run starts two more runs by async invoke (here: real parallel processes on
    the same database) and drains alongside them; helpers never fan out further, every
    user is completed exactly once across the three runs, and every list is exact."""
    monkeypatch.setenv("MAX_PARALLEL_WORKERS", "3")
    monkeypatch.setenv("FANOUT_BACKLOG_PER_WORKER", "500")
    monkeypatch.setenv("BULK_BATCH_SECONDS", "0")  # small batches: the runs interleave
    core.settings.get_settings.cache_clear()
    event = add_attendees(conn, "fan-out-1", generate_profiles(2000, seed=23, id_prefix="f-"))
    helpers: list[subprocess.Popen[str]] = []

    class FakeLambda:
        def invoke(self, **call: Any) -> None:  # boto3's keyword names
            assert (call["FunctionName"], call["InvocationType"]) == (
                FakeContext.function_name,
                "Event",
            )
            env = {**os.environ, "DATABASE_URL": db_url, "DB_SECRET_ARN": ""}
            helper = subprocess.Popen(
                [sys.executable, "-c", HELPER_RUN, call["Payload"].decode()],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert helper.stdout is not None
            assert helper.stdout.readline().strip() == "ready"
            helpers.append(helper)

    # Cached like the real factory, so resetting the handlers' caches works on it too.
    monkeypatch.setattr(core.aws, "lambda_client", functools.cache(FakeLambda))
    summary = handlers.matchmaker.lambda_handler(
        load_event("matchmaker/scheduled.json"), FakeContext()
    )
    outputs = [helper.communicate(timeout=120)[0] for helper in helpers]

    assert summary["fanned_out"] == 2 and len(helpers) == 2
    assert all(helper.returncode == 0 for helper in helpers)
    runs = [summary] + [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    assert [run["source"] for run in runs] == ["schedule", "fan-out", "fan-out"]
    assert [run["fanned_out"] for run in runs[1:]] == [0, 0]
    assert sum(run["completed"] for run in runs) == 2000
    assert sum(run["completed"] > 0 for run in runs) >= 2  # they really shared the work
    assert queue_rows(conn, event.id) == []
    assert verify_event(conn, event, default_embedder(event).key).ok

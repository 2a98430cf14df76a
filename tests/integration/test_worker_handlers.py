"""The scheduled matchmaker, the redrive consumer and the migrations custom resource,
invoked with the events/ files, a real PostgreSQL and moto for SQS / Secrets Manager."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import boto3
import psycopg
import pytest
from moto import mock_aws

import core.aws
import core.settings
import handlers.matchmaker
import handlers.migrate
import handlers.redrive
from core.data import repository as repo
from core.data.migrations import default_migrations_dir, discover
from core.queue.worker import Matchmaker, default_embedder
from handlers.api import openapi_document
from tests.conftest import database_uri
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


class _CloudFormation(BaseHTTPRequestHandler):
    """Receives the custom resource's PUT to its pre-signed ResponseURL."""

    received: ClassVar[list[dict[str, Any]]] = []

    def do_PUT(self) -> None:
        length = int(self.headers["Content-Length"])
        type(self).received.append(json.loads(self.rfile.read(length)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def cloudformation() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    _CloudFormation.received = []
    server = HTTPServer(("127.0.0.1", 0), _CloudFormation)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/response", _CloudFormation.received
    server.shutdown()


def _empty_database(pg_server_uri: str) -> Iterator[str]:
    name = f"mm_cfn_{int(time.time() * 1000) % 10**9}"
    with psycopg.connect(pg_server_uri, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield database_uri(pg_server_uri, name)
    with psycopg.connect(pg_server_uri, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_db(pg_server_uri: str) -> Iterator[str]:
    yield from _empty_database(pg_server_uri)


def test_the_custom_resource_migrates_on_create_and_update_and_ignores_delete(
    empty_db, cloudformation, monkeypatch
):
    """Create applies every migration and answers SUCCESS; Update is a no-op re-run;
    Delete answers SUCCESS without touching the database."""
    url, received = cloudformation
    monkeypatch.setenv("DATABASE_URL", empty_db)
    core.settings.get_settings.cache_clear()
    for name in ("create", "update", "delete"):
        event = load_event(f"migrate/{name}.json")
        event["ResponseURL"] = url
        handlers.migrate.lambda_handler(event, FakeContext())
    assert [r["Status"] for r in received] == ["SUCCESS"] * 3
    shipped = len(discover(default_migrations_dir()))
    assert shipped >= 4
    assert received[0]["Data"]["Applied"] == shipped
    assert received[1]["Data"]["Applied"] == 0
    assert received[2]["Data"] == {}
    assert {r["PhysicalResourceId"] for r in received} == {"matchmaker-migrations"}
    with psycopg.connect(empty_db) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (shipped,)
    core.settings.get_settings.cache_clear()


def test_a_failed_migration_fails_the_deploy_with_the_error(
    empty_db, cloudformation, monkeypatch, tmp_path
):
    """A broken migration file answers FAILED with the file and the database error, so
    CloudFormation fails (and rolls back) the deploy."""
    url, received = cloudformation
    (tmp_path / "0001_broken.sql").write_text("CREATE TABLE oops (;")
    monkeypatch.setenv("DATABASE_URL", empty_db)
    monkeypatch.setenv("MIGRATIONS_DIR", str(tmp_path))
    core.settings.get_settings.cache_clear()
    event = load_event("migrate/create.json")
    event["ResponseURL"] = url
    handlers.migrate.lambda_handler(event, FakeContext())
    assert received[0]["Status"] == "FAILED"
    assert "0001_broken.sql" in received[0]["Reason"]
    assert "syntax error" in received[0]["Reason"]
    core.settings.get_settings.cache_clear()


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

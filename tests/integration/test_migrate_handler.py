"""The migrations custom resource (handlers.migrate) with the events/migrate files, an empty
PostgreSQL database and a local HTTP server standing in for CloudFormation's pre-signed
ResponseURL. Every test captures the handler's logs: the URL must never be in them."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest

import core.settings
import handlers.migrate
from core.data.migrations import default_migrations_dir, discover
from core.observability import SERVICE_NAME
from core.observability import logger as powertools_logger
from tests.conftest import database_uri

EVENTS = Path(__file__).resolve().parents[2] / "events" / "migrate"
SIGNATURE = "X-Amz-Signature=not-a-real-signature-5f1c"


def load_event(name: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((EVENTS / f"{name}.json").read_text())
    return event


@dataclass
class FakeContext:
    """What Powertools and the handler read from a Lambda context."""

    remaining_ms: int = 300_000  # the custom resource's 5-minute timeout, just started
    function_name: str = "matchmaker-MigrateFunction"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = (
        "arn:aws:lambda:us-east-1:123456789012:function:matchmaker-MigrateFunction"
    )
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


@dataclass
class Answer:
    body: dict[str, Any]
    path: str
    at: float  # time.monotonic() when it arrived


@dataclass
class CloudFormation:
    url: str
    answers: list[Answer]


@pytest.fixture
def cloudformation() -> Iterator[CloudFormation]:
    """A server on 127.0.0.1 recording every PUT to its URL (pre-signed, like the real one)."""
    answers: list[Answer] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            length = int(self.headers["Content-Length"])
            body = json.loads(self.rfile.read(length))
            answers.append(Answer(body, self.path, time.monotonic()))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/stack/matchmaker/Migrations?{SIGNATURE}"
    yield CloudFormation(url, answers)
    server.shutdown()
    server.server_close()


@pytest.fixture
def empty_db(pg_server_uri: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A database without any schema, which the handler reaches through DATABASE_URL."""
    name = f"mm_cfn_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_uri, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = database_uri(pg_server_uri, name)
    monkeypatch.setenv("DATABASE_URL", url)
    for name_ in ("DB_SECRET_ARN", "MIGRATIONS_DIR"):
        monkeypatch.delenv(name_, raising=False)
    core.settings.get_settings.cache_clear()
    yield url
    core.settings.get_settings.cache_clear()
    with psycopg.connect(pg_server_uri, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def logs() -> Iterator[list[str]]:
    """The handler's log lines as Lambda would print them (Powertools' JSON formatter)."""
    capture = _Lines()
    capture.setFormatter(powertools_logger.registered_formatter)
    logging.getLogger(SERVICE_NAME).addHandler(capture)
    yield capture.lines
    logging.getLogger(SERVICE_NAME).removeHandler(capture)


def broken_migrations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sql: str) -> None:
    (tmp_path / "0001_custom.sql").write_text(sql)
    monkeypatch.setenv("MIGRATIONS_DIR", str(tmp_path))
    core.settings.get_settings.cache_clear()


def applied_versions(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        exists = conn.execute("SELECT to_regclass('schema_migrations')").fetchone()
        if exists is None or exists[0] is None:
            return []
        return [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]


def assert_url_never_logged(logs: list[str], url: str) -> None:
    assert logs, "nothing was logged: the check below would prove nothing"
    text = "\n".join(logs)
    assert url not in text
    assert "not-a-real-signature" not in text


def test_create_applies_every_migration_and_answers_success_then_update_is_a_no_op(
    empty_db, cloudformation, logs
):
    """Given an empty database, Create applies every shipped migration and PUTs SUCCESS
    with the request's ids to the ResponseURL; Update then applies nothing and answers
    SUCCESS again; the URL is never logged, the request type and ids are."""
    shipped = len(discover(default_migrations_dir()))
    assert shipped >= 4
    for name in ("create", "update"):
        event = load_event(name)
        event["ResponseURL"] = cloudformation.url
        returned = handlers.migrate.lambda_handler(event, FakeContext())
        assert returned == cloudformation.answers[-1].body

    create, update = [answer.body for answer in cloudformation.answers]
    request = load_event("create")
    assert create == {
        "Status": "SUCCESS",
        "Reason": "ok",
        "PhysicalResourceId": "matchmaker-migrations",
        "StackId": request["StackId"],
        "RequestId": request["RequestId"],
        "LogicalResourceId": "Migrations",
        "Data": {"Applied": shipped, "Drift": ""},
    }
    assert (update["Status"], update["Data"]["Applied"]) == ("SUCCESS", 0)
    assert cloudformation.answers[0].path.endswith(SIGNATURE)  # PUT to the URL as given
    assert len(applied_versions(empty_db)) == shipped
    assert_url_never_logged(logs, cloudformation.url)
    requests = [json.loads(line) for line in logs if "custom resource request" in line]
    assert [(r["request_type"], r["logical_resource_id"]) for r in requests] == [
        ("Create", "Migrations"),
        ("Update", "Migrations"),
    ]


def test_delete_answers_success_without_touching_the_database(empty_db, cloudformation, logs):
    """Delete keeps the database (it outlives the stack's custom resource): SUCCESS, no
    data, the physical id it was given, and not even the ledger table is created."""
    event = load_event("delete")
    event["ResponseURL"] = cloudformation.url
    handlers.migrate.lambda_handler(event, FakeContext())
    [answer] = [a.body for a in cloudformation.answers]
    assert (answer["Status"], answer["Data"]) == ("SUCCESS", {})
    assert answer["PhysicalResourceId"] == event["PhysicalResourceId"]
    assert applied_versions(empty_db) == []
    assert_url_never_logged(logs, cloudformation.url)


def test_a_failed_migration_answers_failed_with_the_file_and_the_error(
    empty_db, cloudformation, logs, tmp_path, monkeypatch
):
    """A broken migration file answers FAILED with the file and the database error, so
    CloudFormation fails (and rolls back) the deploy; nothing is recorded as applied."""
    broken_migrations(tmp_path, monkeypatch, "CREATE TABLE oops (;")
    event = load_event("create")
    event["ResponseURL"] = cloudformation.url
    handlers.migrate.lambda_handler(event, FakeContext())
    [answer] = [a.body for a in cloudformation.answers]
    assert answer["Status"] == "FAILED"
    assert "0001_custom.sql" in answer["Reason"]
    assert "syntax error" in answer["Reason"]
    assert applied_versions(empty_db) == []
    assert_url_never_logged(logs, cloudformation.url)


def test_a_migration_outliving_the_time_budget_answers_failed_once_before_the_timeout(
    empty_db, cloudformation, logs, tmp_path, monkeypatch
):
    """Given a migration that takes 2 s and a function with 0.3 s left before the
    watchdog's margin, FAILED is PUT while the migration is still running; when it then
    finishes, its SUCCESS is not sent: CloudFormation hears exactly one answer."""
    broken_migrations(tmp_path, monkeypatch, "SELECT pg_sleep(2);")
    event = load_event("create")
    event["ResponseURL"] = cloudformation.url
    started = time.monotonic()
    context = FakeContext(remaining_ms=handlers.migrate.WATCHDOG_MARGIN_MS + 300)
    returned = handlers.migrate.lambda_handler(event, context)
    finished = time.monotonic()
    time.sleep(0.3)  # nothing more arrives after the handler returned

    [answer] = cloudformation.answers
    assert answer.body["Status"] == "FAILED"
    assert "timeout" in answer.body["Reason"]
    assert answer.at - started < 1.5 < finished - started  # sent while the migration ran
    assert returned == answer.body
    assert applied_versions(empty_db) == ["0001"]  # it did finish, after the answer
    assert_url_never_logged(logs, cloudformation.url)


def test_a_run_that_finishes_in_time_cancels_the_watchdog(empty_db, cloudformation, logs):
    """Given a watchdog due 0.3 s after the start and a request done sooner (Delete), the
    one answer is SUCCESS, and none follows when the watchdog would have fired."""
    event = load_event("delete")
    event["ResponseURL"] = cloudformation.url
    context = FakeContext(remaining_ms=handlers.migrate.WATCHDOG_MARGIN_MS + 300)
    handlers.migrate.lambda_handler(event, context)
    time.sleep(0.8)
    assert [a.body["Status"] for a in cloudformation.answers] == ["SUCCESS"]


def test_an_event_without_a_response_url_is_answered_by_the_return_value(
    empty_db, cloudformation, logs
):
    """The committed events (no ResponseURL, as for `sam local invoke`) apply the
    migrations and get the answer returned, with nothing sent anywhere."""
    event = load_event("create")
    assert "ResponseURL" not in event
    answer = handlers.migrate.lambda_handler(event, FakeContext())
    shipped = len(discover(default_migrations_dir()))
    assert (answer["Status"], answer["Data"]["Applied"]) == ("SUCCESS", shipped)
    assert answer["RequestId"] == event["RequestId"]
    assert len(applied_versions(empty_db)) == shipped
    assert cloudformation.answers == []
    assert any("answered locally" in line for line in logs)


@pytest.mark.parametrize("name", ["create", "update", "delete"])
def test_the_committed_events_carry_no_response_url(name):
    """The sample events stay realistic (a custom resource request) but carry no URL."""
    event = load_event(name)
    assert "ResponseURL" not in event
    assert event["RequestType"] == name.capitalize()
    assert {"StackId", "RequestId", "LogicalResourceId", "ResourceType"} <= set(event)

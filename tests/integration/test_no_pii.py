"""No personal data in logs or traces: a full API session (every route) with a profile
string planted in names, companies, bios and interests, and everything the handler emits
captured - the Powertools log records (at DEBUG) and the X-Ray segments the Tracer builds
(the SDK switched on, an in-memory emitter) - then grepped for the planted string.

The API answers contain it (profiles and match lists do): so a trace that captured a
response, or a log that printed one, would contain it too. A database error whose DETAIL
quotes a failing row goes through the handler's real error path and is logged scrubbed."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from aws_xray_sdk import global_sdk_config
from aws_xray_sdk.core import xray_recorder
from aws_xray_sdk.core.context import Context
from aws_xray_sdk.core.sampling.local.sampler import LocalSampler

import core.api.service
from core.observability import logger, scrub
from tests.integration.api_support import (
    EVENTS_API,
    GRACE,
    Api,
    request,
)

PLANTED = "PLANTED-PII-7f3a"


def planted_profile(first_name: str) -> dict[str, Any]:
    return {
        "name": f"{first_name} {PLANTED}",
        "company": f"{PLANTED} {first_name} Labs",  # distinct: same-company pairs are excluded
        "title": "Staff ML Engineer",
        "bio": f"Builds recommendation systems; ask me about {PLANTED}.",
        "interests": [f"{PLANTED} robotics", "postgresql", "stream processing"],
        "seeking": ["data engineering mentor", f"{PLANTED} operations"],
        "offering": ["recommender systems", "python performance"],
    }


@dataclass
class Captured:
    """Everything the handler emitted: log lines and serialised X-Ray entities."""

    logs: io.StringIO = field(default_factory=io.StringIO)
    other_logs: list[str] = field(default_factory=list)
    segments: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join([self.logs.getvalue(), *self.other_logs, *self.segments])


class MemoryEmitter:
    """X-Ray's emitter interface, keeping what would be sent to the daemon."""

    def __init__(self, into: list[str]) -> None:
        self.into = into

    def send_entity(self, entity: Any) -> None:
        self.into.append(entity.serialize())

    def set_daemon_address(self, address: str | None) -> None:
        pass

    @property
    def ip(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return 2000


class EverythingHandler(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(logging.Formatter().format(record))


@pytest.fixture
def captured() -> Iterator[Captured]:
    """Powertools' log output (DEBUG, into a buffer), every other logger's records, and
    the X-Ray SDK on (Tracer disabled it outside Lambda) with an in-memory emitter."""
    capture = Captured()
    handler = logger.registered_handler
    stream = handler.setStream(capture.logs)
    level = logger.log_level
    logger.setLevel("DEBUG")
    others = EverythingHandler(capture.other_logs)
    logging.getLogger().addHandler(others)
    was_enabled = global_sdk_config.sdk_enabled()
    global_sdk_config.set_sdk_enabled(True)
    xray_recorder.configure(
        emitter=MemoryEmitter(capture.segments),  # type: ignore[arg-type]
        context=Context(),
        sampler=LocalSampler(),
        sampling=False,
        streaming_threshold=10_000,
        context_missing="LOG_ERROR",
    )
    try:
        yield capture
    finally:
        global_sdk_config.set_sdk_enabled(was_enabled)
        logging.getLogger().removeHandler(others)
        logger.setLevel(level)
        handler.setStream(stream)  # type: ignore[arg-type]


def traced(api: Api, event: dict[str, Any]) -> Any:
    """One request inside its own X-Ray segment, as the Lambda service opens one."""
    xray_recorder.begin_segment("matchmaker-ApiFunction")
    try:
        return api(event)
    finally:
        xray_recorder.end_segment()


def subsegment_names(entities: list[dict[str, Any]]) -> set[str]:
    names: set[str] = set()
    for entity in entities:
        for subsegment in entity.get("subsegments", []):
            names |= {subsegment["name"]} | subsegment_names([subsegment])
    return names


def session(api: Api) -> list[tuple[str, int, str]]:
    """Every route once (admin, service and attendee tokens as the events carry them)."""
    answers = []

    def call(name: str, **changes: Any) -> None:
        reply = traced(api, request(name, **changes))
        answers.append((name, reply.status, reply.text))

    call("create_event")
    call("put_attendee", body=planted_profile("Ada"))
    call("put_attendee", user_id=GRACE, body=planted_profile("Grace"))
    for i in range(6):
        call("put_attendee", user_id=f"u-9000000{i}", body=planted_profile(f"Guest{i}"))
    call("get_event")
    call("trigger_sync")
    call("get_matches")
    call("get_matches_attendee_self")
    call("trigger_queue")
    call("trigger_matchmaking_seed")
    call("admin_start")
    call("admin_start_matching_seed")
    call("admin_status")
    call("admin_settings")
    call("admin_pause")
    call("admin_resume")
    call("admin_dead_letters")
    call("admin_redrive")
    call("dismiss")
    call("remove_attendee", user_id=GRACE)
    call("remove_attendee")
    return answers


def test_a_full_api_session_logs_and_traces_no_profile_data(api: Api, captured: Captured) -> None:
    answers = session(api)
    # the session really ran: every route answered, and the answers carry the profiles
    routes = {name for name, _, _ in answers}
    # every request in events/api but the refused ones (no token, another attendee's list)
    documented = {
        path.stem for path in EVENTS_API.glob("*.json") if not path.stem.endswith("_no_auth")
    } - {"get_matches_attendee_other", "admin_status_service_token"}
    assert routes == documented
    failures = [(name, status) for name, status, _ in answers if status >= 400]
    assert failures == []
    assert any(PLANTED in text for name, _, text in answers if name == "get_matches"), answers
    # the Tracer really traced: one segment per request, with the handler's and the routes'
    # subsegments (a happy path logs nothing; the next test shows the log capture works)
    assert len(captured.segments) == len(answers)
    names = subsegment_names([json.loads(segment) for segment in captured.segments])
    assert {
        "## lambda_handler",
        "## handlers.api.create_event",
        "## handlers.api.put_attendee",
    } <= names
    leaked = [line for line in captured.text().splitlines() if PLANTED in line]
    assert leaked == []


def test_a_database_error_quoting_a_row_is_logged_without_the_row(
    api: Api, captured: Captured, monkeypatch: pytest.MonkeyPatch, db_url: str
) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute("CREATE TABLE planted (bio text CHECK (length(bio) < 5))")
        conn.commit()

    def failing_get_event(*args: Any, **kwargs: Any) -> Any:
        # a real PostgreSQL error whose DETAIL quotes the failing row, surfacing as the
        # handler's "database unavailable" path (psycopg.OperationalError)
        with psycopg.connect(db_url) as conn:
            try:
                conn.execute("INSERT INTO planted VALUES (%s)", (PLANTED,))
            except psycopg.errors.CheckViolation as exc:
                assert PLANTED in str(exc)  # what would reach the log unscrubbed
                raise psycopg.OperationalError(str(exc)) from exc
        raise AssertionError("the insert should have failed")

    monkeypatch.setattr(core.api.service, "get_event", failing_get_event)
    reply = traced(api, request("get_event"))
    assert reply.is_error(503, "unavailable")
    logs = captured.logs.getvalue()
    records = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    unavailable = [r for r in records if r.get("message") == "database unavailable"]
    assert unavailable, logs
    assert "violates check constraint" in unavailable[0]["exception"]
    assert "DETAIL:  (removed: may contain row data)" in unavailable[0]["exception"]
    assert PLANTED not in logs, [
        (k, v) for r in records for k, v in r.items() if PLANTED in json.dumps(v)
    ]


def test_scrub_blanks_detail_lines_at_any_depth_and_keeps_the_rest() -> None:
    error = 'duplicate key value violates unique constraint "p"\nDETAIL:  Key (id)=(x) exists.'
    scrubbed = scrub({"exception": error, "extra": [error], "n": 3})
    assert scrubbed["exception"].startswith('duplicate key value violates unique constraint "p"')
    assert "Key (id)=(x)" not in json.dumps(scrubbed)
    assert scrubbed["extra"] == [scrubbed["exception"]]
    assert scrubbed["n"] == 3


def test_every_tracer_decorator_of_the_api_captures_no_response() -> None:
    # a new route that returns profiles must not bring response capture back
    source = (EVENTS_API.parents[1] / "src" / "handlers" / "api.py").read_text(encoding="utf-8")
    decorators = re.findall(r"^@tracer\.(\w+)(.*)$", source, re.MULTILINE)
    assert decorators
    for name, arguments in decorators:
        assert arguments == "(capture_response=False)", f"@tracer.{name}{arguments}"


def test_a_database_error_in_a_traced_route_reaches_x_ray_without_the_row(
    api: Api, captured: Captured, monkeypatch: pytest.MonkeyPatch, db_url: str
) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute("CREATE TABLE planted (bio text CHECK (length(bio) < 5))")
        conn.commit()

    def failing_put_attendee(*args: Any, **kwargs: Any) -> Any:
        with psycopg.connect(db_url) as conn:
            conn.execute("INSERT INTO planted VALUES (%s)", (PLANTED,))  # CheckViolation
        raise AssertionError("the insert should have failed")

    monkeypatch.setattr(core.api.service, "put_attendee", failing_put_attendee)
    with pytest.raises(psycopg.errors.CheckViolation, match=PLANTED):
        traced(api, request("put_attendee", body=planted_profile("Ada")))
    traces = "\n".join(captured.segments)
    assert "CheckViolation" in traces  # the error is traced: its type, not the row
    assert PLANTED not in traces
    assert PLANTED not in captured.logs.getvalue()

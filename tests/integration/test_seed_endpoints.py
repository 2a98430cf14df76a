"""The seed system's edge functions on the HTTP API handler: POST /trigger-matchmaking and
POST /admin-start-matching, for clients migrating from it.

Both take the seed's camelCase bodies (eventCode in the body) and must behave exactly as
our own routes (POST /events/{code}/matchmaking, POST /admin/events/{code}/matching):
every field and default, roles, unknown events, strict bodies (a rejected request writes
nothing and invokes nothing), a paused event and an event too large for synchronous
matching; admin starts answer with the queue status as GET .../status reports it.
Real PostgreSQL per test, moto for SQS and Lambda (async invokes recorded).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

import core.settings
import handlers.api
from core.api.schemas import EnqueueOut, StartOut, StatusOut
from core.data.repository import Conn
from core.models import EventIn, EventRecord, Profile
from core.queue.worker import Matchmaker, default_embedder
from core.settings import Settings
from tests.helpers import lists_of, queue_rows
from tests.integration.api_support import (
    ADA,
    CODE,
    GRACE,
    WORKER_FUNCTION,
    Api,
    Invocation,
    as_admin,
    as_attendee,
    as_service,
    load_event,
    request,
    snapshot,
    without_authorizer,
)
from tooling.local_runs import import_profiles
from tooling.oracle import verify_event
from tooling.synthetic import generate_profiles

pytestmark = pytest.mark.filterwarnings("ignore:No application metrics to publish:UserWarning")

TRIGGER = "trigger_matchmaking_seed"  # events/api/trigger_matchmaking_seed.json
START = "admin_start_matching_seed"  # events/api/admin_start_matching_seed.json
TRIGGER_PAYLOAD = {"source": "trigger", "event_code": CODE}
AGE_TOLERANCE_S = 30.0


# --- fixtures and helpers ----------------------------------------------------------------


def set_env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    core.settings.get_settings.cache_clear()
    handlers.api.connections.discard()


def body_of(name: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(load_event(name)["body"])
    return body


def seed_event(conn: Conn, crowd: int = 0) -> EventRecord:
    """techconf-2026 (create_event.json) with Ada, Grace and `crowd` synthetic attendees;
    their join rows are queued, nobody is matched."""
    grace = body_of("put_attendee") | {"name": "Grace Oyelaran", "company": "Tidewater"}
    people = [
        Profile(user_id=ADA, **body_of("put_attendee")),
        Profile(user_id=GRACE, **grace),
        *generate_profiles(crowd, seed=2026, id_prefix="tc-"),
    ]
    return import_profiles(conn, EventIn(**body_of("create_event")), people)


def drain(conn: Conn, settings: Settings) -> None:
    Matchmaker(settings).run(conn, deadline=time.monotonic() + 60)


def trigger(body: Any) -> dict[str, Any]:
    return request(TRIGGER, body=body)


def start(body: Any) -> dict[str, Any]:
    return request(START, body=body)


def queue_of(conn: Conn) -> list[tuple[str, str, int, str]]:
    """(user_id, status, priority, reason) of every queue row, by user_id."""
    return sorted((r["user_id"], r["status"], r["priority"], r["reason"]) for r in queue_rows(conn))


def status_now(api: Api) -> dict[str, Any]:
    reply = api(request("admin_status"))
    assert reply.status == 200, reply
    status: dict[str, Any] = reply.json
    return status


def assert_same_status(answered: dict[str, Any], later: dict[str, Any]) -> None:
    """The status in an answer is what GET .../status says right after, except that an
    age grows with the clock (never shrinks, by at most AGE_TOLERANCE_S); nested objects
    (queue, totals, coverage...) are compared the same way."""
    assert answered.keys() == later.keys()
    for key, value in answered.items():
        if isinstance(value, dict):
            assert_same_status(value, later[key])
        elif not key.endswith("_age_s"):
            assert value == later[key], key
        elif value is None:
            assert later[key] is None, key
        else:
            assert value <= later[key] <= value + AGE_TOLERANCE_S, key


def rejected(api: Api, conn: Conn, event: dict[str, Any], status: int, error: str) -> Any:
    """The request is refused with the JSON error, nothing written, nothing invoked."""
    before = snapshot(conn)
    api.invocations.clear()
    reply = api(event)
    assert reply.is_error(status, error), reply
    assert snapshot(conn) == before, reply
    assert api.invocations == [], reply
    return reply


# --- POST /trigger-matchmaking -----------------------------------------------------------


def test_the_sample_request_queues_everyone_unmatched_and_invokes_the_matchmaker(api, conn):
    """Given 8 attendees nobody has matched, when trigger_matchmaking_seed.json
    ({"eventCode", "useQueue": true}) is sent with the service token, then 202 with the
    EnqueueOut of POST /events/{code}/matchmaking: queued 8, mode queue, invoked; every
    row is queued at the trigger priority and the matchmaker is invoked once, async."""
    event = seed_event(conn, crowd=6)

    reply = api(request(TRIGGER))

    assert reply.status == 202
    assert reply.json == {
        "event": CODE,
        "queued": 8,
        "mode": "queue",
        "invoked": True,
        "matched": None,
    }
    EnqueueOut.model_validate(reply.json)
    assert api.invocations == [Invocation(WORKER_FUNCTION, "Event", TRIGGER_PAYLOAD, 202)]
    rows = queue_rows(conn, event.id)
    assert len(rows) == 8
    assert {(r["status"], r["priority"]) for r in rows} == {("pending", 3)}  # joins stay 3


def test_only_an_event_code_means_queue_mode_and_matches_the_rest_route(api, conn, settings):
    """Given 6 matched attendees, when the seed route gets only {"eventCode"} and then
    the REST route gets {} for the same state, then both are 202 queue answers with the
    same figures (nobody is unmatched: 0)."""
    seed_event(conn, crowd=4)
    drain(conn, settings)

    seed_reply = api(trigger({"eventCode": CODE}))
    rest_reply = api(request("trigger_queue", body={}))

    assert seed_reply.status == rest_reply.status == 202
    assert seed_reply.json == rest_reply.json
    assert seed_reply.json["queued"] == 0
    assert seed_reply.json["mode"] == "queue"


def test_user_ids_queue_only_those_attendees_at_the_trigger_priority(api, conn, settings):
    """Given 6 matched attendees, when userIds names Ada, Grace and a stranger, then 202
    with queued 2: exactly Ada and Grace are queued (priority 2, reason trigger)."""
    seed_event(conn, crowd=4)
    drain(conn, settings)

    reply = api(trigger({"eventCode": CODE, "useQueue": True, "userIds": [ADA, GRACE, "u-9"]}))

    assert reply.status == 202
    assert reply.json["queued"] == 2
    assert queue_of(conn) == sorted(
        [(ADA, "pending", 2, "trigger"), (GRACE, "pending", 2, "trigger")]
    )
    assert len(api.invocations) == 1


def test_a_trigger_priority_raises_the_queued_users_and_never_lowers_a_newcomer(
    api, conn, settings
):
    """Given 6 matched attendees and a newcomer queued at 3, when the seed's body names Ada
    and the newcomer with priority 3 and then both with priority 0, then Ada is queued at
    3 and the newcomer stays at 3 (an enqueue only raises a pending row's priority)."""
    seed_event(conn, crowd=4)
    drain(conn, settings)
    assert api(request("put_attendee", user_id="u-new", body={"name": "New"})).status == 200

    raised = api(trigger({"eventCode": CODE, "userIds": [ADA, "u-new"], "priority": 3}))
    lowered = api(trigger({"eventCode": CODE, "userIds": [ADA, "u-new"], "priority": 0}))

    assert raised.status == lowered.status == 202
    assert queue_of(conn) == sorted(
        [(ADA, "pending", 3, "trigger"), ("u-new", "pending", 3, "join")]
    )


def test_an_explicit_null_user_list_means_everyone_unmatched(api, conn):
    """Given 3 unmatched attendees, when userIds is null, then all 3 are queued."""
    seed_event(conn, crowd=1)

    reply = api(trigger({"eventCode": CODE, "userIds": None}))

    assert reply.status == 202
    assert reply.json["queued"] == 3


def test_use_queue_false_matches_before_answering(api, conn):
    """Given 12 unmatched attendees, when {"eventCode", "useQueue": false} is sent, then
    200 with mode sync and matched 12: every list is stored and exact, the queue is empty
    and no Lambda was invoked."""
    event = seed_event(conn, crowd=10)

    reply = api(trigger({"eventCode": CODE, "useQueue": False}))

    assert reply.status == 200
    assert reply.json == {
        "event": CODE,
        "queued": 12,
        "mode": "sync",
        "invoked": False,
        "matched": 12,
    }
    assert queue_rows(conn, event.id) == []
    lists = lists_of(conn, event.id)
    assert len(lists) == 12
    assert all(len(v) == 3 for v in lists.values())
    assert verify_event(conn, event, default_embedder(event).key).ok
    assert api.invocations == []


def test_use_queue_false_with_user_ids_matches_just_those(api, conn, settings):
    """Given 6 matched attendees, when Ada alone is synchronously re-matched, then 200 with
    queued 1 and matched 1, and the queue is empty."""
    event = seed_event(conn, crowd=4)
    drain(conn, settings)

    reply = api(trigger({"eventCode": CODE, "useQueue": False, "userIds": [ADA]}))

    assert reply.status == 200
    assert (reply.json["queued"], reply.json["matched"]) == (1, 1)
    assert queue_rows(conn, event.id) == []


def test_sync_mode_on_a_paused_event_is_409(api, conn):
    """Given a paused event with 4 unmatched attendees, when useQueue false is sent, then
    409 conflict naming the event and telling to resume, nothing written or invoked."""
    seed_event(conn, crowd=2)
    assert api(request("admin_pause")).status == 204

    reply = rejected(api, conn, trigger({"eventCode": CODE, "useQueue": False}), 409, "conflict")

    assert CODE in reply.json["message"]
    assert "resume" in reply.json["message"]


def test_sync_mode_above_the_limit_is_413_pointing_to_the_queue(api, conn, monkeypatch):
    """Given SYNC_MATCH_MAX_ATTENDEES=5 and 12 attendees, when useQueue false is sent,
    then 413 naming both figures and useQueue, nothing written or invoked; queue mode on
    the same event is still accepted."""
    seed_event(conn, crowd=10)
    set_env(monkeypatch, SYNC_MATCH_MAX_ATTENDEES="5")

    reply = rejected(api, conn, trigger({"eventCode": CODE, "useQueue": False}), 413, "too_large")

    assert "12 attendees" in reply.json["message"]
    assert "5" in reply.json["message"]
    assert "useQueue" in reply.json["message"]
    assert api(trigger({"eventCode": CODE})).status == 202


def test_an_admin_token_may_trigger_too(api, conn):
    """Admins may call every service route: the trigger with the admin token is 202."""
    seed_event(conn)
    assert api(as_admin(request(TRIGGER))).status == 202


# --- POST /admin-start-matching ------------------------------------------------------------


def test_the_sample_start_queues_the_unmatched_and_answers_the_queue_status(api, conn, settings):
    """Given 8 matched attendees and 2 newcomers, when admin_start_matching_seed.json
    (unmatched, priority 1) is sent, then 202 with queued 2 and an async invoke, the
    newcomers keep their join priority, and the answer's status is what GET
    /admin/events/{code}/status says right after."""
    seed_event(conn, crowd=6)
    drain(conn, settings)
    newcomers = generate_profiles(2, seed=77, id_prefix="nc-")
    for person in newcomers:
        body = person.model_dump(exclude={"user_id"})
        assert api(request("put_attendee", user_id=person.user_id, body=body)).status == 200
    api.invocations.clear()

    reply = api(request(START))

    assert reply.status == 202
    StartOut.model_validate(reply.json)
    answer = dict(reply.json)
    status = answer.pop("status")
    assert answer == {"event": CODE, "queued": 2, "mode": "queue", "invoked": True, "matched": None}
    assert queue_of(conn) == [(p.user_id, "pending", 3, "join") for p in newcomers]
    assert api.invocations == [Invocation(WORKER_FUNCTION, "Event", TRIGGER_PAYLOAD, 202)]
    StatusOut.model_validate(status)
    assert status["event"] == CODE
    assert_same_status(status, status_now(api))


def test_defaults_are_unmatched_at_priority_0(api, conn, settings):
    """Given 6 matched attendees and one whose list was deleted, when only {"eventCode"}
    is sent, then exactly that one is queued at priority 0 (reason admin_unmatched)."""
    event = seed_event(conn, crowd=4)
    drain(conn, settings)
    conn.execute(
        "DELETE FROM user_matches WHERE event_id = %s"
        " AND profile_id = (SELECT id FROM profiles WHERE user_id = %s)",
        (event.id, GRACE),
    )

    reply = api(start({"eventCode": CODE}))

    assert reply.status == 202
    assert reply.json["queued"] == 1
    assert queue_of(conn) == [(GRACE, "pending", 0, "admin_unmatched")]


def test_everyone_at_priority_3_and_the_status_shows_them(api, conn, settings):
    """Given 6 matched attendees and an empty queue, when mode everyone at priority 3 is
    sent, then all 6 are queued at 3 (reason admin_everyone), and the status in the answer
    equals GET .../status afterwards and differs from the one before (empty queue)."""
    event = seed_event(conn, crowd=4)
    drain(conn, settings)
    before = status_now(api)

    reply = api(start({"eventCode": CODE, "mode": "everyone", "priority": 3}))

    assert reply.status == 202
    assert reply.json["queued"] == 6
    rows = queue_rows(conn, event.id)
    assert {(r["status"], r["priority"], r["reason"]) for r in rows} == {
        ("pending", 3, "admin_everyone")
    }
    assert len(rows) == 6
    assert_same_status(reply.json["status"], status_now(api))
    assert reply.json["status"] != before


def test_the_rest_start_route_answers_the_status_too(api, conn, settings):
    """POST /admin/events/{code}/matching answers the same StartOut: given the same state,
    the seed body and the REST body (mode everyone, priority 1) give equal answers."""
    seed_event(conn, crowd=4)
    drain(conn, settings)

    rest = api(request("admin_start", body={"mode": "everyone", "priority": 1}))
    seeded = api(start({"eventCode": CODE, "mode": "everyone", "priority": 1}))

    assert rest.status == seeded.status == 202
    StartOut.model_validate(rest.json)
    assert_same_status(rest.json["status"], seeded.json["status"])
    assert_same_status(seeded.json["status"], status_now(api))
    assert {k: v for k, v in rest.json.items() if k != "status"} == {
        k: v for k, v in seeded.json.items() if k != "status"
    }


# --- roles -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [TRIGGER, START])
def test_an_attendee_token_is_403(api, conn, name):
    seed_event(conn)
    rejected(api, conn, as_attendee(request(name), ADA), 403, "forbidden")


def test_a_service_token_on_admin_start_is_403(api, conn):
    seed_event(conn)
    reply = rejected(api, conn, as_service(request(START)), 403, "forbidden")
    assert reply.json["message"] == "this route needs an admin principal"


@pytest.mark.parametrize("name", [TRIGGER, START])
def test_no_token_is_401(api, conn, name):
    """No authorizer context (and the no_auth sample): 401, even with a broken body."""
    seed_event(conn)
    rejected(api, conn, without_authorizer(request(name)), 401, "unauthorized")
    rejected(api, conn, load_event(f"{name}_no_auth"), 401, "unauthorized")
    broken = without_authorizer(request(name, body={"eventCode": 7, "nope": True}))
    rejected(api, conn, broken, 401, "unauthorized")


# --- unknown events and bad bodies -------------------------------------------------------


@pytest.mark.parametrize("name", [TRIGGER, START])
def test_an_unknown_event_is_404_naming_it(api, conn, name):
    seed_event(conn)
    event = request(name, body=body_of(name) | {"eventCode": "techconf-2025"})
    reply = rejected(api, conn, event, 404, "not_found")
    assert "techconf-2025" in reply.json["message"]


def bad(body: Any, field: str) -> tuple[Any, str]:
    """A body the route must refuse with 422, and the field the message must name."""
    return body, field


COMMON_BAD_BODIES = [
    bad('{"eventCode": "techconf-2026",', "body"),  # malformed JSON
    bad("[]", ""),  # not an object
    bad(None, ""),  # no body at all: eventCode is required
    bad({}, "eventCode"),
    bad({"eventCode": None}, "eventCode"),
    bad({"eventCode": 2026}, "eventCode"),
    bad({"eventCode": "tech conf!"}, "eventCode"),
    bad({"eventCode": "x'; DROP TABLE events;--"}, "eventCode"),
    bad({"eventCode": "t" * 65}, "eventCode"),
    bad({"event_code": CODE}, "event_code"),  # snake_case is not an alias
    bad({"eventCode": CODE, "code": CODE}, "code"),
    bad({"eventCode": CODE, "dryRun": True}, "dryRun"),
]
TRIGGER_BAD_BODIES = [
    *COMMON_BAD_BODIES,
    bad({"eventCode": CODE, "useQueue": "false"}, "useQueue"),
    bad({"eventCode": CODE, "useQueue": 0}, "useQueue"),
    bad({"eventCode": CODE, "useQueue": None}, "useQueue"),
    bad({"eventCode": CODE, "userIds": ADA}, "userIds"),
    bad({"eventCode": CODE, "userIds": [ADA, 7]}, "userIds.1"),
    bad({"eventCode": CODE, "userIds": ["ada lindqvist"]}, "userIds.0"),
    bad({"eventCode": CODE, "userIds": [f"u-{i}" for i in range(1001)]}, "userIds"),
    bad({"eventCode": CODE, "use_queue": False}, "use_queue"),
    bad({"eventCode": CODE, "user_ids": [ADA]}, "user_ids"),
    bad({"eventCode": CODE, "priority": 4}, "priority"),
    bad({"eventCode": CODE, "priority": "1"}, "priority"),
    bad({"eventCode": CODE, "mode": "everyone"}, "mode"),
]
START_BAD_BODIES = [
    *COMMON_BAD_BODIES,
    bad({"eventCode": CODE, "mode": "all"}, "mode"),
    bad({"eventCode": CODE, "mode": None}, "mode"),
    bad({"eventCode": CODE, "priority": 4}, "priority"),
    bad({"eventCode": CODE, "priority": -1}, "priority"),
    bad({"eventCode": CODE, "priority": "1"}, "priority"),
    bad({"eventCode": CODE, "priority": 1.5}, "priority"),
    bad({"eventCode": CODE, "priority": True}, "priority"),
    bad({"eventCode": CODE, "useQueue": True}, "useQueue"),  # a start always queues
    bad({"eventCode": CODE, "userIds": [ADA]}, "userIds"),
]


@pytest.mark.parametrize(
    ("name", "body", "field"),
    [(TRIGGER, body, field) for body, field in TRIGGER_BAD_BODIES]
    + [(START, body, field) for body, field in START_BAD_BODIES],
    ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None,
)
def test_a_bad_body_is_422_naming_the_field_and_writes_nothing(api, conn, name, body, field):
    """Given the event with unmatched attendees (every valid request would queue or
    match), when the body is malformed, not an object, missing eventCode, has a wrong
    type, a value out of range or against its pattern, or an unknown field (a snake_case
    spelling included), then 422 validation_error whose details name the field, and
    nothing is written or invoked."""
    seed_event(conn)

    reply = rejected(api, conn, request(name, body=body), 422, "validation_error")

    fields = [problem["field"] for problem in reply.json["details"]]
    if field:
        assert field in fields, reply.json
        assert field in reply.json["message"], reply.json

"""The HTTP API Lambda (handlers.api.lambda_handler) end to end.

Requests are the API Gateway HTTP API (payload 2.0, JWT authorizer) events in events/api/,
adjusted per test; each test has its own migrated PostgreSQL, and moto stands in for the
dead-letter queue (SQS) and the matchmaker function (Lambda, async invokes recorded).

Covers: the happy path of every route; authorisation on every route, failing closed even
when API Gateway let a bad call through; bad input on every route that takes input (a 4xx
JSON error and not one row written); the database being unreachable or dropping the
connection (503).
"""

from __future__ import annotations

import base64
import json
import socket
import time
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from pydantic import BaseModel

import core.api.schemas
import core.models
import core.settings
import handlers.api
from core.api.schemas import ErrorOut
from core.data import repository as repo
from core.data.repository import Conn
from core.embedding.local import LocalEmbedder
from core.models import EventIn, EventRecord, Profile
from core.queue.worker import Matchmaker, WorkerReport, default_embedder
from core.settings import Settings
from handlers.api import MAX_BODY_BYTES, openapi_document
from tests.helpers import PoisonEmbedder, add_attendees, lists_of, queue_rows
from tests.integration.api_support import (
    ADA,
    CODE,
    EVENTS_API,
    GRACE,
    TABLES,
    WORKER_FUNCTION,
    Api,
    FakeLambdaContext,
    Invocation,
    as_admin,
    as_attendee,
    as_service,
    claims_of,
    load_event,
    request,
    scalar,
    snapshot,
    without_authorizer,
)
from tooling.local_runs import import_profiles
from tooling.oracle import verify_event
from tooling.synthetic import generate_profiles

pytestmark = pytest.mark.filterwarnings("ignore:No application metrics to publish:UserWarning")

# Route files by who may call them (trigger has two files: queue and sync mode).
SERVICE_ROUTES = [
    "create_event",
    "get_event",
    "put_attendee",
    "remove_attendee",
    "trigger_queue",
    "trigger_sync",
    "trigger_matchmaking_seed",
]
SELF_ROUTES = ["get_matches", "dismiss"]  # service, admin, or the attendee themselves
ADMIN_ROUTES = [
    "admin_start",
    "admin_status",
    "admin_pause",
    "admin_resume",
    "admin_settings",
    "admin_dead_letters",
    "admin_redrive",
    "admin_start_matching_seed",
]
ALL_ROUTES = SERVICE_ROUTES + SELF_ROUTES + ADMIN_ROUTES
CODE_ROUTES = [name for name in ALL_ROUTES if name != "create_event"]
# The seed system's edge functions take the event code in the body (eventCode).
BODY_CODE_ROUTES = ["trigger_matchmaking_seed", "admin_start_matching_seed"]
USER_ROUTES = ["put_attendee", "remove_attendee", "get_matches", "dismiss"]

TRIGGER_PAYLOAD = {"source": "trigger", "event_code": CODE}
GRACE_BODY = {
    "name": "Grace Oyelaran",
    "company": "Tidewater Logistics",
    "title": "Principal Data Engineer",
    "bio": "Runs the Kafka platform behind real-time freight tracking; looking for people "
    "who put recommendation models into production.",
    "interests": ["stream processing", "kafka operations", "postgresql"],
    "seeking": ["recommender systems", "machine learning"],
    "offering": ["data engineering mentor", "kafka operations"],
}
INJECTION_USER_ID = "x'); DROP TABLE profiles;--"
INJECTION_CODE = "x'; DROP TABLE events;--"


# --- fixtures and helpers ----------------------------------------------------------------


def set_env(monkeypatch: pytest.MonkeyPatch, **values: str | None) -> None:
    """Change the handler's environment mid-test (fresh settings, fresh connection)."""
    for name, value in values.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    core.settings.get_settings.cache_clear()
    handlers.api.connections.discard()


def body_of(name: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(load_event(name)["body"])
    return body


def seed(conn: Conn, crowd: int = 0) -> EventRecord:
    """techconf-2026 with the settings of create_event.json, Ada (put_attendee.json),
    Grace and `crowd` synthetic attendees; their join rows are queued, nobody matched."""
    people = [
        Profile(user_id=ADA, **body_of("put_attendee")),
        Profile(user_id=GRACE, **GRACE_BODY),
        *generate_profiles(crowd, seed=2026, id_prefix="tc-"),
    ]
    return import_profiles(conn, EventIn(**body_of("create_event")), people)


def for_event(name: str, code: str) -> dict[str, Any]:
    """The route's request for another event code: in its path, or in the body's
    eventCode for the seed's edge functions."""
    if name in BODY_CODE_ROUTES:
        return request(name, body=body_of(name) | {"eventCode": code})
    return request(name, code=code)


def drain(conn: Conn, settings: Settings, worker: Matchmaker | None = None) -> WorkerReport:
    return (worker or Matchmaker(settings)).run(conn, deadline=time.monotonic() + 60)


def queue_of(conn: Conn) -> list[tuple[str, str, int, str]]:
    """(user_id, status, priority, reason) of every queue row, by user_id."""
    return sorted((r["user_id"], r["status"], r["priority"], r["reason"]) for r in queue_rows(conn))


def make_dead(conn: Conn, user_id: str, error: str = "provider rejected the profile") -> None:
    """The user's pending queue row, dead as if its attempts were used up."""
    cur = conn.execute(
        "UPDATE matchmaking_queue SET status = 'dead', attempts = 5, dead_at = now(),"
        " last_error = %s WHERE status = 'pending'"
        " AND profile_id = (SELECT id FROM profiles WHERE user_id = %s)",
        (error, user_id),
    )
    assert cur.rowcount == 1


def jwt_payload(event: dict[str, Any]) -> dict[str, Any]:
    token = event["headers"]["authorization"].removeprefix("Bearer ")
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


# --- the event files ---------------------------------------------------------------------


def test_every_route_has_an_event_file_shaped_like_api_gateway_sends_it():
    """Given the resolver's routes, when the events/api files are read, then every route
    has a valid-auth event whose routeKey, rawPath, pathParameters, http block, headers,
    body and JWT claims are consistent, as an HTTP API payload 2.0 with a JWT authorizer."""
    routes = {
        f"{method.upper()} {path}"
        for path, methods in openapi_document()["paths"].items()
        for method in methods
    }
    assert len(routes) == 16
    assert {load_event(name)["routeKey"] for name in ALL_ROUTES} == routes

    names = {path.stem for path in EVENTS_API.glob("*.json")}
    variants = {f"{name}_no_auth" for name in ALL_ROUTES} | {
        "get_matches_attendee_self",
        "get_matches_attendee_other",
        "admin_status_service_token",
    }
    assert names == set(ALL_ROUTES) | variants
    for name in sorted(names):
        event = load_event(name)
        ctx = event["requestContext"]
        method, template = event["routeKey"].split(" ", 1)
        path = template
        for key, value in (event.get("pathParameters") or {}).items():
            path = path.replace("{" + key + "}", value)
        assert event["version"] == "2.0", name
        assert event["isBase64Encoded"] is False, name
        assert event["rawQueryString"] == "", name
        assert ctx["routeKey"] == event["routeKey"], name
        assert ctx["stage"] == "$default", name
        assert event["rawPath"] == ctx["http"]["path"] == path, name
        assert ctx["http"]["method"] == method, name
        assert ctx["http"]["userAgent"] == event["headers"]["user-agent"], name
        assert ctx["http"]["sourceIp"] == event["headers"]["x-forwarded-for"], name
        assert isinstance(ctx["timeEpoch"], int), name
        assert all(key == key.lower() for key in event["headers"]), name
        if "body" in event:
            assert isinstance(json.loads(event["body"]), dict), name
            assert int(event["headers"]["content-length"]) == len(event["body"].encode()), name
            assert event["headers"]["content-type"] == "application/json", name
        if name.endswith("_no_auth"):
            assert "authorizer" not in ctx
            assert "authorization" not in event["headers"]
            continue
        jwt = ctx["authorizer"]["jwt"]
        # API Gateway hands the verified claims over as strings.
        assert jwt["claims"] == {k: str(v) for k, v in jwt_payload(event).items()}, name
        assert {"sub", "iss", "aud", "exp", "iat", "scope"} <= set(jwt["claims"]), name
        if jwt["scopes"] is not None:
            assert jwt["scopes"] == jwt["claims"]["scope"].split(), name
    for name in ADMIN_ROUTES:
        assert "matchmaker/admin" in claims_of(name)["scope"].split(), name
    for name in SERVICE_ROUTES + SELF_ROUTES + ["admin_status_service_token"]:
        assert claims_of(name)["scope"] == "matchmaker/service", name
    assert claims_of("get_matches_attendee_self")["sub"] == ADA
    assert load_event("get_matches_attendee_self")["pathParameters"]["user_id"] == ADA
    assert claims_of("get_matches_attendee_other")["sub"] == ADA
    assert load_event("get_matches_attendee_other")["pathParameters"]["user_id"] == GRACE


def _documented_model(schema: dict[str, Any]) -> tuple[type[BaseModel], bool]:
    """The pydantic model a response schema refers to, and whether it is a list of them."""
    many = schema.get("type") == "array"
    name = (schema["items"] if many else schema)["$ref"].rsplit("/", 1)[1]
    model = getattr(core.api.schemas, name, None) or getattr(core.models, name)
    return model, many


def test_the_openapi_document_says_what_every_route_answers(api, conn):
    """Given the seeded event, every route's event file answers with a success code its
    operation documents, with a body of the documented model (none for 204); the same
    request without a token, and with a bad event code, answers a documented error status
    with the ErrorOut body. The document requires the bearer JWT everywhere."""
    document = openapi_document()
    assert document["security"] == [{"jwt": []}]
    assert document["components"]["securitySchemes"]["jwt"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
    }
    seed(conn)
    for name in sorted(ALL_ROUTES, key=lambda n: n == "remove_attendee"):  # leaving: last
        method, path = load_event(name)["routeKey"].split(" ", 1)
        answers = document["paths"][path][method.lower()]["responses"]
        for status, answer in answers.items():
            if status.startswith("2"):
                continue
            schema = answer["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorOut"}, (name, status)

        reply = api(request(name))
        assert str(reply.status) in answers and reply.status < 300, (name, reply)
        content = answers[str(reply.status)].get("content")
        if reply.status == 204:
            assert content is None and reply.text == "", name
        else:
            model, many = _documented_model(content["application/json"]["schema"])
            for item in reply.json if many else [reply.json]:
                model.model_validate(item)

        bad = [without_authorizer(request(name))]
        if name != "create_event":  # the one route without a code in its path
            bad.append(for_event(name, "x"))
        for rejected in map(api, bad):
            assert str(rejected.status) in answers, (name, rejected)
            ErrorOut.model_validate(rejected.json)
            assert rejected.is_error(rejected.status), (name, rejected)


# --- happy paths -------------------------------------------------------------------------


def test_create_event_is_201_then_200_idempotent_then_409_on_other_settings(api, conn):
    """Given no event, when create_event.json is sent twice, then the first answer is 201
    with the stored event and the second 200 (nothing created); when the same code comes
    with other settings or another name, then 409 and the event is unchanged."""
    first = api(request("create_event"))
    assert first.status == 201
    assert first.json == {**body_of("create_event"), "attendees": 0, "created": True}
    row = conn.execute(
        "SELECT code, name, k, exclude_same_company, weight_interests, weight_complement,"
        " weight_bio, embedder FROM events"
    ).fetchall()
    assert row == [(CODE, "TechConf 2026", 3, True, 1.0, 1.0, 0.5, "local")]

    again = api(request("create_event"))
    assert again.status == 200
    assert again.json == {**body_of("create_event"), "attendees": 0, "created": False}

    before = snapshot(conn)
    other_k = body_of("create_event")
    other_k["settings"]["k"] = 5
    other_name = body_of("create_event") | {"name": "TechConf 2026 Lisbon"}
    for body in (other_k, other_name):
        reply = api(request("create_event", body=body))
        assert reply.is_error(409, "conflict"), reply
        assert CODE in reply.json["message"]
    assert snapshot(conn) == before


def test_put_attendee_joins_updates_or_leaves_unchanged_and_queues_what_changed(
    api, conn, settings
):
    """Given the event, when Ada's profile is PUT, then she joins and a join row (priority
    3) is queued; when the same profile is PUT again, then 'unchanged' and nothing queued;
    when her bio changes, then 'updated' and a profile_update row (priority 2) is queued;
    when only her name changes, then 'updated' but nothing is queued (display only)."""
    assert api(request("create_event")).status == 201

    joined = api(request("put_attendee"))
    assert joined.status == 200
    assert joined.json == {"event": CODE, "user_id": ADA, "status": "joined"}
    assert queue_of(conn) == [(ADA, "pending", 3, "join")]
    with conn.cursor(row_factory=dict_row) as cur:
        stored = cur.execute(
            "SELECT name, company, title, bio, interests, seeking, offering FROM profiles"
            " WHERE user_id = %s",
            (ADA,),
        ).fetchone()
    assert stored == body_of("put_attendee")
    drain(conn, settings)
    assert queue_of(conn) == []

    same = api(request("put_attendee"))
    assert same.json["status"] == "unchanged"
    assert queue_of(conn) == []

    edited = body_of("put_attendee") | {"bio": "Now leading the streaming migration."}
    updated = api(request("put_attendee", body=edited))
    assert updated.status == 200
    assert updated.json["status"] == "updated"
    assert queue_of(conn) == [(ADA, "pending", 2, "profile_update")]
    drain(conn, settings)

    renamed = api(request("put_attendee", body=edited | {"name": "Ada Lindqvist-Berg"}))
    assert renamed.json["status"] == "updated"
    assert queue_of(conn) == []
    assert scalar(conn, "SELECT name FROM profiles WHERE user_id = %s", (ADA,)) == (
        "Ada Lindqvist-Berg"
    )


def test_get_event_reports_its_settings_and_active_attendees(api, conn):
    """Given the event with Ada, Grace and three more, one of whom left, when
    get_event.json is sent, then 200 with the settings and 4 active attendees."""
    seed(conn, crowd=3)
    assert api(request("remove_attendee", user_id="tc-000001")).status == 204

    reply = api(request("get_event"))

    assert reply.status == 200
    assert reply.json == {**body_of("create_event"), "attendees": 4, "created": False}


def test_remove_attendee_is_204_then_404_and_the_leaver_is_gone(api, conn, settings):
    """Given matched attendees, when Ada is removed, then 204 with an empty body, she is
    inactive, nobody's list holds her and her own matches are 404; when she is removed
    again, then 404; when her profile is PUT again, then she re-joins."""
    event = seed(conn, crowd=6)
    drain(conn, settings)
    assert any(ADA in [m for m, _ in v] for v in lists_of(conn, event.id).values())

    reply = api(request("remove_attendee"))
    assert reply.status == 204
    assert reply.text == ""
    assert (
        scalar(
            conn,
            "SELECT a.active FROM attendees a JOIN profiles p ON p.id = a.profile_id"
            " WHERE p.user_id = %s",
            (ADA,),
        )
        is False
    )
    assert all(ADA not in [m for m, _ in v] for v in lists_of(conn, event.id).values())
    assert api(request("get_matches")).is_error(404, "not_found")

    again = api(request("remove_attendee"))
    assert again.is_error(404, "not_found"), again
    assert ADA in again.json["message"]

    assert api(request("put_attendee")).json["status"] == "joined"


def test_matches_after_draining_the_queue_are_the_stored_ranked_lists(api, conn, settings):
    """Given 14 attendees and a drained queue, when get_matches.json (service token) and
    get_matches_attendee_self.json (Ada's own token) are sent, then both answer 200 with
    her k=3 stored matches, ranked, scores non-increasing, each with reasons."""
    event = seed(conn, crowd=12)
    drain(conn, settings)
    assert verify_event(conn, event, default_embedder(event).key).ok

    reply = api(request("get_matches"))

    assert reply.status == 200
    body = reply.json
    assert body["user_id"] == ADA
    assert [m["rank"] for m in body["matches"]] == [1, 2, 3]
    assert [(m["user_id"], m["score"]) for m in body["matches"]] == lists_of(conn, event.id)[ADA]
    scores = [m["score"] for m in body["matches"]]
    assert scores == sorted(scores, reverse=True)
    assert all(
        m["reasons"] and all(isinstance(r, str) for r in m["reasons"]) for m in body["matches"]
    )
    assert ADA not in [m["user_id"] for m in body["matches"]]
    own = api(load_event("get_matches_attendee_self"))
    assert own.status == 200
    assert own.json == body


def test_dismiss_hides_the_person_at_once_and_both_are_rematched(api, conn, settings):
    """Given matched attendees, when Ada dismisses her top match, then 204, the dismissal
    is stored, neither list shows the other straight away (before any re-match), and both
    are queued (priority 2, 'dismissal'); after the queue drains both have full lists
    without each other; dismissing again is a harmless 204."""
    event = seed(conn, crowd=10)
    drain(conn, settings)
    top = api(request("get_matches")).json["matches"][0]["user_id"]

    reply = api(request("dismiss", body={"dismissed_user_id": top}))

    assert reply.status == 204
    assert reply.text == ""
    assert scalar(conn, "SELECT count(*) FROM dismissals") == 1
    ada_now = [m["user_id"] for m in api(request("get_matches")).json["matches"]]
    assert top not in ada_now
    assert len(ada_now) == 2
    top_now = [m["user_id"] for m in api(request("get_matches", user_id=top)).json["matches"]]
    assert ADA not in top_now
    assert queue_of(conn) == sorted(
        [(ADA, "pending", 2, "dismissal"), (top, "pending", 2, "dismissal")]
    )

    drain(conn, settings)
    lists = lists_of(conn, event.id)
    assert len(lists[ADA]) == 3
    assert top not in [m for m, _ in lists[ADA]]
    assert ADA not in [m for m, _ in lists[top]]
    assert verify_event(conn, event, default_embedder(event).key).ok

    before = snapshot(conn)
    assert api(request("dismiss", body={"dismissed_user_id": top})).status == 204
    assert snapshot(conn) == before


def test_trigger_in_queue_mode_queues_and_invokes_the_matchmaker_async(api, conn):
    """Given 8 attendees nobody has matched yet, when trigger_queue.json is sent, then 202
    with queued 8 and invoked true, and the matchmaker function was invoked once with
    InvocationType Event and {"source": "trigger", "event_code": ...}; when a user list
    is given, then only those attendees (not strangers) are queued."""
    event = seed(conn, crowd=6)

    reply = api(request("trigger_queue"))

    assert reply.status == 202
    assert reply.json == {
        "event": CODE,
        "queued": 8,
        "mode": "queue",
        "invoked": True,
        "matched": None,
    }
    assert api.invocations == [Invocation(WORKER_FUNCTION, "Event", TRIGGER_PAYLOAD, 202)]
    assert len(queue_rows(conn, event.id)) == 8
    assert all(r["status"] == "pending" for r in queue_rows(conn, event.id))

    some = api(request("trigger_queue", body={"user_ids": [ADA, GRACE, "u-99999999"]}))
    assert some.status == 202
    assert some.json["queued"] == 2
    assert len(api.invocations) == 2


def test_trigger_without_a_matchmaker_function_queues_but_does_not_invoke(api, conn, monkeypatch):
    """Given no MATCHMAKER_FUNCTION_NAME, when trigger_queue.json is sent, then 202 with
    the rows queued, invoked false and no Lambda call (the schedule picks them up)."""
    seed(conn, crowd=2)
    set_env(monkeypatch, MATCHMAKER_FUNCTION_NAME=None)

    reply = api(request("trigger_queue"))

    assert reply.status == 202
    assert reply.json["queued"] == 4
    assert reply.json["invoked"] is False
    assert api.invocations == []


def test_trigger_in_sync_mode_writes_the_matches_before_answering(api, conn):
    """Given 12 attendees nobody has matched, when trigger_sync.json ({"useQueue": false})
    is sent, then 200 with mode sync and matched 12, every list is stored and exact and
    the queue is empty when the answer arrives; no Lambda is invoked."""
    event = seed(conn, crowd=10)

    reply = api(request("trigger_sync"))

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


def test_trigger_in_sync_mode_does_not_wait_for_a_row_waiting_out_a_retry(api, conn):
    """Given 12 matched attendees and Ada re-queued after a failed attempt, backing off for an
    hour, when trigger_sync.json is sent with 4 s left in the Lambda, then 200 at once (the
    backoff is no live work: waiting for it could only time out) and admin status agrees:
    nothing pending or running, Ada waiting for a retry, her row untouched."""
    event = seed(conn, crowd=10)
    assert api(request("trigger_sync")).json["matched"] == 12
    repo.enqueue_for_matching(
        conn, event.id, user_ids=[ADA], only_unmatched=False, priority=2, reason="profile"
    )
    conn.execute(
        "UPDATE matchmaking_queue SET attempts = 1, last_error = 'provider down',"
        " run_after = now() + interval '1 hour' WHERE event_id = %s AND status = 'pending'",
        (event.id,),
    )
    backing_off = queue_rows(conn, event.id)
    assert [(r["status"], r["attempts"]) for r in backing_off] == [("pending", 1)]

    # (waiting for Ada would end in 503 matching_timeout after about 2 s)
    reply = api(request("trigger_sync"), FakeLambdaContext(remaining_ms=4_000))

    assert reply.status == 200, reply
    assert (reply.json["queued"], reply.json["matched"]) == (0, 0)
    assert queue_rows(conn, event.id) == backing_off
    status = api(request("admin_status")).json
    assert (status["queue"]["pending"], status["queue"]["running"]) == (0, 0)
    assert status["queue"]["waiting_retry"] == 1
    assert status["state"] == "needs_attention"


def test_trigger_in_sync_mode_above_the_limit_is_413_and_matches_nothing(api, conn, monkeypatch):
    """Given SYNC_MATCH_MAX_ATTENDEES=5 and 12 attendees, when trigger_sync.json is sent,
    then 413 with a message naming both figures and the queue, and nothing is written
    or invoked; with the limit at exactly 12 the same request matches (200)."""
    event = seed(conn, crowd=10)
    set_env(monkeypatch, SYNC_MATCH_MAX_ATTENDEES="5")
    before = snapshot(conn)

    reply = api(request("trigger_sync"))

    assert reply.is_error(413, "too_large"), reply
    message = reply.json["message"]
    assert "12 attendees" in message
    assert "5" in message
    assert "useQueue" in message
    assert snapshot(conn) == before
    assert scalar(conn, "SELECT count(*) FROM user_matches") == 0
    assert len(queue_rows(conn, event.id)) == 12
    assert api.invocations == []

    set_env(monkeypatch, SYNC_MATCH_MAX_ATTENDEES="12")
    at_limit = api(request("trigger_sync"))
    assert at_limit.status == 200
    assert at_limit.json["matched"] == 12


def test_trigger_in_sync_mode_on_a_paused_event_does_not_claim_success(api, conn):
    """Given a paused event with 6 unmatched attendees, when trigger_sync.json is sent,
    then either everyone is matched before the answer (200) or the call is refused with
    a 409 JSON error; never a 200 'sync' answer that matched nobody."""
    seed(conn, crowd=4)
    assert api(request("admin_pause")).status == 204

    reply = api(request("trigger_sync"))

    if reply.status == 200:
        assert reply.json["matched"] == 6
        assert scalar(conn, "SELECT count(DISTINCT profile_id) FROM user_matches") == 6
    else:
        assert reply.is_error(409, "conflict"), reply


def test_admin_start_queues_the_unmatched_or_everyone_at_the_given_priority(api, conn, settings):
    """Given 10 matched attendees and 2 newcomers, when admin_start.json (unmatched,
    priority 1) is sent, then 202 with queued 2 (newcomers keep their higher join
    priority), the event's queue status and an async invoke; when mode everyone at
    priority 0 is sent, then all 12 are queued: 10 at priority 0, the 2 newcomers still
    at 3."""
    event = seed(conn, crowd=8)
    drain(conn, settings)
    newcomers = generate_profiles(2, seed=77, id_prefix="nc-")
    for person in newcomers:
        body = person.model_dump(exclude={"user_id"})
        assert api(request("put_attendee", user_id=person.user_id, body=body)).status == 200

    unmatched = api(request("admin_start"))

    assert unmatched.status == 202
    answer = unmatched.json
    status = answer.pop("status")  # the queue status after the enqueue
    assert answer == {
        "event": CODE,
        "queued": 2,
        "mode": "queue",
        "invoked": True,
        "matched": None,
    }
    assert status["event"] == CODE
    assert queue_of(conn) == [(p.user_id, "pending", 3, "join") for p in newcomers]
    assert api.invocations == [Invocation(WORKER_FUNCTION, "Event", TRIGGER_PAYLOAD, 202)]

    everyone = api(request("admin_start", body={"mode": "everyone", "priority": 0}))

    assert everyone.status == 202
    assert everyone.json["queued"] == 12
    priorities = [r["priority"] for r in queue_rows(conn, event.id)]
    assert sorted(priorities) == [0] * 10 + [3] * 2
    assert {r["reason"] for r in queue_rows(conn, event.id) if r["priority"] == 0} == {
        "admin_everyone"
    }
    assert len(api.invocations) == 2


def test_admin_status_figures_are_what_the_database_and_the_queue_say(api, conn, settings):
    """Given 12 matched attendees, then an edit (priority 2), a departure (neighbours at
    priority 1), a full rematch (priority 0), two rows claimed by a worker, one dead row
    and 3 messages on the dead-letter queue, when admin_status.json is sent, then every
    figure equals what the database and SQS say."""
    event = seed(conn, crowd=10)
    drain(conn, settings)
    edited = body_of("put_attendee") | {"bio": "Switched to platform work."}
    assert api(request("put_attendee", body=edited)).status == 200
    assert api(request("remove_attendee", user_id="tc-000003")).status == 204
    assert api(request("admin_start", body={"mode": "everyone", "priority": 0})).status == 202
    make_dead(conn, "tc-000007")
    conn.execute("SELECT * FROM mm_claim(2, 60, NULL)")
    api.put_dead_letters(3)

    reply = api(request("admin_status"))

    assert reply.status == 200
    status = reply.json
    pending = dict(
        conn.execute(
            "SELECT priority::text, count(*) FROM matchmaking_queue"
            " WHERE event_id = %s AND status = 'pending' GROUP BY priority",
            (event.id,),
        ).fetchall()
    )
    by_status = dict(
        conn.execute(
            "SELECT status, count(*) FROM matchmaking_queue WHERE event_id = %s GROUP BY status",
            (event.id,),
        ).fetchall()
    )
    with conn.cursor(row_factory=dict_row) as cur:
        job = cur.execute(
            "SELECT * FROM matchmaking_jobs WHERE event_id = %s", (event.id,)
        ).fetchone()
    assert job is not None
    queue, totals, coverage = status["queue"], status["totals"], status["coverage"]
    assert status["event"] == CODE
    assert status["state"] == "needs_attention"  # one dead user
    assert job["status"] == "running"  # the stored column, which status no longer reads
    assert queue["pending_by_priority"] == {str(p): pending.get(str(p), 0) for p in range(4)}
    assert queue["pending"] == sum(queue["pending_by_priority"].values())
    assert queue["pending"] == by_status["pending"] > 0
    assert queue["pending_by_priority"]["0"] > 0
    assert queue["running"] == by_status["running"] == 2
    assert queue["waiting_retry"] == 0 and queue["next_retry_at"] is None
    assert queue["dead"] == by_status["dead"] == 1
    assert totals["processed"] == job["processed_count"] == 12
    assert totals["failed"] == job["failed_count"] == 0
    assert totals["batches"] == job["batches"] > 0
    assert coverage["active"] == 11
    assert coverage["active"] - coverage["without_list"] == scalar(
        conn,
        "SELECT count(DISTINCT m.profile_id) FROM user_matches m JOIN attendees a"
        " ON a.event_id = m.event_id AND a.profile_id = m.profile_id"
        " WHERE a.active AND m.event_id = %s",
        (event.id,),
    )
    assert status["dead_letter_queue"] == {"scope": "all events", "depth": 3}
    assert queue["oldest_pending_age_s"] is not None
    assert queue["oldest_pending_age_s"] >= 0
    assert status["throughput_per_min_60m"] == pytest.approx(12 / 60)
    assert status["last_run_at"] is not None
    assert status["last_error"] is None


def test_admin_status_without_a_readable_dead_letter_queue_still_answers(api, conn, monkeypatch):
    """Given DEAD_LETTER_QUEUE_URL naming a queue that does not exist, when
    admin_status.json is sent, then 200 with the dead-letter queue's depth null."""
    seed(conn)
    set_env(
        monkeypatch,
        DEAD_LETTER_QUEUE_URL="https://sqs.us-east-1.amazonaws.com/123456789012/gone",
    )

    reply = api(request("admin_status"))

    assert reply.status == 200
    assert reply.json["dead_letter_queue"] == {"scope": "all events", "depth": None}


def test_pause_stops_the_worker_for_the_event_and_resume_restarts_it(api, conn, settings):
    """Given 6 queued attendees of techconf-2026 and 3 of another event, when
    admin_pause.json is sent, then 204, status says paused, a worker matches the other
    event but claims nothing of this one, and a new join keeps it paused; when
    admin_resume.json is sent, then 204, status is queued, the matchmaker is invoked
    and a worker then matches everyone."""
    event = seed(conn, crowd=4)
    other = add_attendees(conn, "devsummit-2026", generate_profiles(3, seed=9, id_prefix="ds-"))

    paused = api(request("admin_pause"))

    assert paused.status == 204
    assert paused.text == ""
    assert api(request("admin_status")).json["state"] == "paused"
    report = drain(conn, settings)
    assert report.claimed == 3
    assert queue_rows(conn, other.id) == []
    assert [r["status"] for r in queue_rows(conn, event.id)] == ["pending"] * 6
    assert [r["attempts"] for r in queue_rows(conn, event.id)] == [0] * 6
    newcomer = generate_profiles(1, seed=5, id_prefix="nc-")[0]
    body = newcomer.model_dump(exclude={"user_id"})
    assert api(request("put_attendee", user_id=newcomer.user_id, body=body)).status == 200
    assert api(request("admin_status")).json["state"] == "paused"
    assert drain(conn, settings).claimed == 0
    assert api.invocations == []

    resumed = api(request("admin_resume"))

    assert resumed.status == 204
    assert resumed.text == ""
    assert api(request("admin_status")).json["state"] == "queued"
    assert api.invocations == [Invocation(WORKER_FUNCTION, "Event", TRIGGER_PAYLOAD, 202)]
    assert drain(conn, settings).completed == 7
    assert api(request("admin_status")).json["state"] == "idle"
    assert all(len(v) == 3 for v in lists_of(conn, event.id).values())


def test_dead_letters_list_the_dead_and_redrive_requeues_and_they_get_matched(api, conn, settings):
    """Given a worker whose embedder always rejects Grace, when the queue drains, then
    admin_dead_letters.json lists Grace with her attempts, error and time of death; when
    admin_redrive.json is sent, then requeued 1 and invoked, the list is empty, and a
    healthy worker then matches her; a second redrive requeues nothing and invokes
    nothing."""
    event = seed(conn, crowd=8)
    poisoned = Matchmaker(settings, embedder_for=lambda _event: PoisonEmbedder({GRACE}))
    drain(conn, settings, poisoned)

    listed = api(request("admin_dead_letters"))

    assert listed.status == 200
    dead = listed.json
    assert len(dead) == 1
    assert dead[0]["user_id"] == GRACE
    assert dead[0]["attempts"] == settings.max_attempts
    assert f"provider rejected the profile of {GRACE}" in dead[0]["last_error"]
    assert dead[0]["dead_at"] is not None
    assert api(request("admin_status")).json["queue"]["dead"] == 1

    redriven = api(request("admin_redrive"))

    assert redriven.status == 200
    assert redriven.json == {"event": CODE, "requeued": 1, "invoked": True}
    assert api.invocations == [Invocation(WORKER_FUNCTION, "Event", TRIGGER_PAYLOAD, 202)]
    assert queue_of(conn) == [(GRACE, "pending", 2, "redrive")]
    assert api(request("admin_dead_letters")).json == []
    assert api(request("admin_status")).json["queue"]["dead"] == 0
    drain(conn, settings)
    grace = api(request("get_matches", user_id=GRACE))
    assert len(grace.json["matches"]) == 3
    assert verify_event(conn, event, default_embedder(event).key).ok

    again = api(request("admin_redrive"))
    assert again.json == {"event": CODE, "requeued": 0, "invoked": False}
    assert len(api.invocations) == 1


def test_bio_with_sql_and_markup_is_stored_verbatim_and_the_tables_are_intact(api, conn):
    """Given the event, when a profile whose text looks like SQL injection, markup and
    psycopg placeholders is PUT, then 200 joined, every field is stored byte for byte and
    every table still exists with its rows."""
    seed(conn)
    hostile = {
        "name": "Robert'); DROP TABLE profiles;-- Zoë Ångström 🚀",
        "company": 'ACME"; DELETE FROM events; --',
        "title": "%s %(bio)s {0} $1",
        "bio": "' OR '1'='1'; TRUNCATE attendees CASCADE; -- <script>alert(1)</script> \\x00",
        "interests": ["'; DROP TABLE user_matches;--", "E'\\\\'"],
        "seeking": ["$$; DELETE FROM dismissals; $$"],
        "offering": ['" OR ""="'],
    }

    reply = api(request("put_attendee", user_id="u-bobby.tables", body=hostile))

    assert reply.status == 200
    assert reply.json["status"] == "joined"
    with conn.cursor(row_factory=dict_row) as cur:
        stored = cur.execute(
            "SELECT name, company, title, bio, interests, seeking, offering FROM profiles"
            " WHERE user_id = 'u-bobby.tables'"
        ).fetchone()
    assert stored == hostile
    for table in TABLES:
        assert scalar(conn, "SELECT to_regclass(%s)::text", (table,)) == table
    assert scalar(conn, "SELECT count(*) FROM profiles") == 3
    assert scalar(conn, "SELECT count(*) FROM events") == 1
    assert scalar(conn, "SELECT count(*) FROM attendees WHERE active") == 3


# --- authorisation on every route (fail closed) ------------------------------------------


@pytest.fixture
def effective(conn: Conn) -> EventRecord:
    """State in which every route's request would change something if it were allowed:
    the event with Ada and Grace, and Grace's queue row dead (redrive has work)."""
    event = seed(conn)
    make_dead(conn, GRACE)
    return event


def effective_request(name: str) -> dict[str, Any]:
    """The route's valid request, creating a new event for create_event."""
    if name == "create_event":
        return request(name, body=body_of(name) | {"code": "devsummit-2026"})
    return request(name)


def without_sub(event: dict[str, Any]) -> dict[str, Any]:
    claims = dict(event["requestContext"]["authorizer"]["jwt"]["claims"])
    del claims["sub"]
    event["requestContext"]["authorizer"]["jwt"]["claims"] = claims
    return event


@pytest.mark.parametrize("name", ALL_ROUTES)
def test_every_route_without_verified_claims_is_401_and_changes_nothing(api, conn, effective, name):
    """Given state the request would change, when the route is called without an
    authorizer context or with JWT claims lacking `sub` (even with the admin scope), then
    401 unauthorized, nothing written, nothing invoked."""
    cases = [
        ("no authorizer", without_authorizer(effective_request(name)), 401),
        ("no sub", without_sub(effective_request(name)), 401),
        ("no sub, admin scope", without_sub(as_admin(effective_request(name))), 401),
    ]
    assert rejections(api, conn, cases) == []


MALFORMED_AUTHORIZERS = [
    None,
    {},
    {"jwt": None},
    {"jwt": {"claims": None, "scopes": ["matchmaker/admin"]}},
    {"jwt": {"claims": {}, "scopes": ["matchmaker/admin"]}},
    {"jwt": {"claims": {"sub": ""}, "scopes": ["matchmaker/admin"]}},
    {"jwt": {"claims": {"sub": None, "scope": "matchmaker/admin"}, "scopes": None}},
    {"jwt": {"claims": "sub=ops", "scopes": ["matchmaker/admin"]}},
    {"lambda": {"sub": "ops", "scope": "matchmaker/admin"}},
    {"iam": {"userArn": "arn:aws:iam::123456789012:user/ops"}},
]


def test_malformed_authorizer_contexts_are_401(api, conn, effective):
    """Given authorizer contexts API Gateway should never send with a JWT authorizer (null,
    empty, null or empty or non-dict claims, empty or null sub, a Lambda or IAM
    authorizer instead), when an admin route is called, then 401 and nothing written."""
    cases = []
    for authorizer in MALFORMED_AUTHORIZERS:
        event = request("admin_pause")
        event["requestContext"]["authorizer"] = authorizer
        cases.append((json.dumps(authorizer), event, 401))
    assert rejections(api, conn, cases) == []


@pytest.mark.parametrize("name", SERVICE_ROUTES + ADMIN_ROUTES)
def test_an_attendee_token_on_service_and_admin_routes_is_403(api, conn, effective, name):
    """Given Ada's own attendee token (no API scope), when a service or admin route is
    called, then 403 forbidden, nothing written, nothing invoked."""
    before = snapshot(conn)

    reply = api(as_attendee(effective_request(name), ADA))

    assert reply.is_error(403, "forbidden"), reply
    assert snapshot(conn) == before
    assert api.invocations == []


@pytest.mark.parametrize("name", ADMIN_ROUTES)
def test_a_service_token_on_admin_routes_is_403(api, conn, effective, name):
    """Given the event app's service token, when an admin route is called, then 403
    forbidden, nothing written, nothing invoked."""
    before = snapshot(conn)

    reply = api(as_service(request(name)))

    assert reply.is_error(403, "forbidden"), reply
    assert reply.json["message"] == "this route needs an admin principal"
    assert snapshot(conn) == before
    assert api.invocations == []


def test_the_service_token_file_on_admin_status_is_403(api, conn, effective):
    """Given admin_status_service_token.json, when it is sent, then 403."""
    assert api(load_event("admin_status_service_token")).is_error(403, "forbidden")


def test_the_request_without_authorization_file_is_401(api, conn, effective):
    """Given get_matches_no_auth.json (no authorizer in requestContext), then 401."""
    assert api(load_event("get_matches_no_auth")).is_error(401, "unauthorized")


def test_an_attendee_reads_and_dismisses_only_their_own_matches(api, conn, settings):
    """Given matched attendees, when Ada's token reads her matches, then 200; when it reads
    Grace's, then 403; when it dismisses on her own path, then 204; when it dismisses on
    Grace's path (making Grace dismiss Ada), then 403 and no dismissal is stored."""
    seed(conn, crowd=6)
    drain(conn, settings)

    assert api(load_event("get_matches_attendee_self")).status == 200
    other = api(load_event("get_matches_attendee_other"))
    assert other.is_error(403, "forbidden"), other

    before = snapshot(conn)
    forged = as_attendee(request("dismiss", user_id=GRACE, body={"dismissed_user_id": ADA}), ADA)
    assert api(forged).is_error(403, "forbidden")
    assert snapshot(conn) == before

    own = as_attendee(request("dismiss"), ADA)
    assert api(own).status == 204
    assert conn.execute(
        "SELECT a.user_id, b.user_id FROM dismissals d JOIN profiles a ON a.id = d.profile_id"
        " JOIN profiles b ON b.id = d.dismissed_profile_id"
    ).fetchall() == [(ADA, GRACE)]


@pytest.mark.parametrize(
    ("claims", "scopes"),
    [
        ({"sub": "ops|m.okafor", "scope": "openid matchmaker/admin"}, None),
        ({"sub": "ops|m.okafor"}, ["matchmaker/admin"]),
    ],
    ids=["scope-claim", "scopes-list"],
)
def test_admin_scope_counts_from_the_scope_claim_or_the_scopes_list(
    api, conn, effective, claims, scopes
):
    """Given an admin token whose scope arrives only in the `scope` claim, or only in the
    authorizer's scopes list, when admin and service routes are called, then both pass."""
    assert api(request("admin_status", claims=claims, scopes=scopes)).status == 200
    assert api(request("get_event", claims=claims, scopes=scopes)).status == 200


@pytest.mark.parametrize(
    ("name", "changes"),
    [
        ("put_attendee", {"body": '{"name": "Ada",'}),
        ("get_matches", {"user_id": INJECTION_USER_ID}),
        ("admin_start", {"body": {"mode": "all"}}),
    ],
    ids=["malformed-body", "bad-path-parameter", "bad-field"],
)
def test_unauthenticated_calls_with_bad_input_are_401_not_422(api, conn, effective, name, changes):
    """Given no authorizer context, when a route is called with invalid input, then the
    answer is still 401 (fail closed: nothing about the input is looked at)."""
    reply = api(without_authorizer(request(name, **changes)))
    assert reply.is_error(401, "unauthorized"), reply


# --- bad input on every route that takes input -------------------------------------------


def bad(name: str, status: int, case: str, marks: Any = None, **changes: Any) -> Any:
    """A bad-input case: the route file, the expected status, the request changes."""
    return (name, status, case, marks, changes)


BAD_INPUT = [
    # create_event
    bad("create_event", 422, "create-malformed-json", body='{"code": "techconf-2026",'),
    bad("create_event", 422, "create-array-body", body="[]"),
    bad("create_event", 422, "create-no-body", body=None),
    bad("create_event", 422, "create-missing-code", body={"name": "TechConf"}),
    bad("create_event", 422, "create-code-not-a-string", body={"code": 2026}),
    bad(
        "create_event", 422, "create-k-wrong-type", body={"code": CODE, "settings": {"k": "three"}}
    ),
    bad("create_event", 422, "create-k-out-of-range", body={"code": CODE, "settings": {"k": 11}}),
    bad(
        "create_event",
        422,
        "create-weight-wrong-type",
        body={"code": CODE, "settings": {"weights": {"bio": "high"}}},
    ),
    bad(
        "create_event",
        422,
        "create-unknown-embedder",
        body={"code": CODE, "settings": {"embedder": "word2vec"}},
    ),
    bad("create_event", 422, "create-unknown-field", body={"code": CODE, "venue": "Lisbon"}),
    bad(
        "create_event",
        422,
        "create-unknown-nested-field",
        body={"code": CODE, "settings": {"radius": 3}},
    ),
    bad("create_event", 422, "create-bad-code", body={"code": "tech conf 2026!"}),
    bad("create_event", 422, "create-injection-code", body={"code": INJECTION_CODE}),
    bad("create_event", 422, "create-name-too-long", body={"code": CODE, "name": "x" * 201}),
    bad("create_event", 422, "create-nul-in-name", body={"code": CODE, "name": "Tech\u0000Conf"}),
    # put_attendee
    bad("put_attendee", 422, "put-malformed-json", body='{"name": "Ada", "bio": }'),
    bad("put_attendee", 422, "put-no-body", body=None),
    bad("put_attendee", 422, "put-interests-not-a-list", body={"interests": "machine learning"}),
    bad("put_attendee", 422, "put-bio-not-a-string", body={"bio": 42}),
    bad("put_attendee", 422, "put-name-a-list", body={"name": ["Ada"]}),
    bad("put_attendee", 422, "put-unknown-field", body={"email": "ada@example.com"}),
    bad("put_attendee", 422, "put-user-id-in-body", body={"user_id": GRACE}),
    bad("put_attendee", 422, "put-bio-too-long", body={"bio": "b" * 4001}),
    bad("put_attendee", 422, "put-nul-in-bio", body={"bio": "nul \u0000 byte"}),
    bad("put_attendee", 422, "put-lone-surrogate", body={"name": "lone \ud800 surrogate"}),
    bad("put_attendee", 422, "put-51-tags", body={"interests": ["ai"] * 51}),
    bad("put_attendee", 422, "put-tag-too-long", body={"seeking": ["s" * 201]}),
    bad("put_attendee", 422, "put-blank-tag", body={"offering": ["  "]}),
    bad("put_attendee", 404, "put-unknown-event", code="techconf-2025"),
    # remove_attendee / get_matches
    bad("remove_attendee", 404, "remove-not-an-attendee", user_id="u-00000000"),
    bad("get_matches", 404, "matches-not-an-attendee", user_id="u-00000000"),
    bad(
        "get_matches",
        404,
        "matches-slash-in-user-id",
        user_id="u/../../admin",
    ),
    # dismiss
    bad("dismiss", 422, "dismiss-malformed-json", body='{"dismissed_user_id": '),
    bad("dismiss", 422, "dismiss-missing-field", body={}),
    bad("dismiss", 422, "dismiss-id-not-a-string", body={"dismissed_user_id": 42424242}),
    bad("dismiss", 422, "dismiss-id-a-list", body={"dismissed_user_id": [GRACE]}),
    bad(
        "dismiss", 422, "dismiss-unknown-field", body={"dismissed_user_id": GRACE, "reason": "spam"}
    ),
    bad("dismiss", 422, "dismiss-injection-id", body={"dismissed_user_id": INJECTION_USER_ID}),
    bad("dismiss", 400, "dismiss-themselves", body={"dismissed_user_id": ADA}),
    bad("dismiss", 404, "dismiss-a-stranger", body={"dismissed_user_id": "u-00000000"}),
    bad("dismiss", 404, "dismiss-by-a-stranger", user_id="u-00000000"),
    # trigger
    bad("trigger_queue", 422, "trigger-malformed-json", body="{useQueue: true}"),
    bad("trigger_queue", 422, "trigger-usequeue-wrong-type", body={"useQueue": "maybe"}),
    bad("trigger_sync", 422, "trigger-usequeue-string", body={"useQueue": "false"}),
    bad("trigger_queue", 422, "trigger-user-ids-not-a-list", body={"user_ids": ADA}),
    bad(
        "trigger_queue",
        422,
        "trigger-injection-user-id",
        body={"user_ids": [ADA, INJECTION_USER_ID]},
    ),
    bad(
        "trigger_queue",
        422,
        "trigger-1001-user-ids",
        body={"user_ids": [f"u-{i}" for i in range(1001)]},
    ),
    bad("trigger_queue", 422, "trigger-unknown-field", body={"useQueue": True, "dryRun": True}),
    bad("trigger_queue", 422, "trigger-priority-range", body={"useQueue": True, "priority": 4}),
    # admin_start
    bad("admin_start", 422, "start-malformed-json", body='{"mode": "everyone" "priority": 1}'),
    bad("admin_start", 422, "start-unknown-mode", body={"mode": "all"}),
    bad("admin_start", 422, "start-priority-too-high", body={"priority": 4}),
    bad("admin_start", 422, "start-priority-negative", body={"priority": -1}),
    bad("admin_start", 422, "start-priority-wrong-type", body={"priority": "high"}),
    bad("admin_start", 422, "start-unknown-field", body={"mode": "everyone", "dryRun": True}),
    # admin_settings (a valid patch would re-queue the event and invoke the matchmaker)
    bad("admin_settings", 422, "settings-k-zero", body={"k": 0}),
    bad("admin_settings", 422, "settings-k-a-string", body={"k": "2"}),
    bad("admin_settings", 422, "settings-weight-negative", body={"weights": {"bio": -1}}),
    bad(
        "admin_settings",
        422,
        "settings-weights-all-zero",
        body={"weights": {"interests": 0, "complementarity": 0, "bio": 0}},
    ),
    bad("admin_settings", 422, "settings-weight-nan", body='{"weights": {"bio": NaN}}'),
    bad("admin_settings", 422, "settings-unknown-embedder", body={"embedder": "word2vec"}),
    bad("admin_settings", 422, "settings-array-of-a-patch", body=[{"k": 2}]),
    # hostile bodies that ended in 5xx or were taken as their first element
    bad(
        "create_event",
        422,
        "create-weights-all-zero",
        body={
            "code": "devsummit-2026",
            "settings": {"weights": dict.fromkeys(["interests", "complementarity", "bio"], 0)},
        },
    ),
    bad("create_event", 422, "create-array-of-an-event", body=[{"code": "devsummit-2026"}]),
    bad("create_event", 422, "create-depth-10000", body="[" * 10_000 + "]" * 10_000),
    bad(
        "create_event",
        422,
        "create-5000-digit-k",
        body='{"code": "x", "settings": {"k": ' + "1" * 5000 + "}}",
    ),
    bad("put_attendee", 422, "put-array-of-a-profile", body=[{"bio": "overwritten"}]),
    # oversize bodies that fail validation too
    bad(
        "put_attendee",
        413,
        "put-oversize-bio",
        body={"bio": "b" * (MAX_BODY_BYTES + 1)},
    ),
    bad(
        "create_event",
        413,
        "create-oversize-malformed",
        body="{" + " " * MAX_BODY_BYTES + '"code": }',
    ),
]

BAD_BY_ROUTE: dict[str, list[tuple[str, dict[str, Any], int]]] = {}
for _name, _status, _case, _marks, _changes in BAD_INPUT:
    if _marks is None:
        BAD_BY_ROUTE.setdefault(_name, []).append((_case, _changes, _status))
ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    413: "too_large",
    415: "unsupported_media_type",
    422: "validation_error",
}


def rejections(api: Api, conn: Conn, cases: list[tuple[str, dict[str, Any], int]]) -> list[str]:
    """Send each (label, event, status) case; return what went wrong: any answer that is
    not `status` with a JSON error body, any row written, any Lambda invoked."""
    problems = []
    for label, event, status in cases:
        before = snapshot(conn)
        reply = api(event)
        if not reply.is_error(status, ERROR_CODES[status]):
            problems.append(f"{label}: {reply}")
        if snapshot(conn) != before:
            problems.append(f"{label}: rows were written")
        if api.invocations:
            problems.append(f"{label}: the matchmaker was invoked")
            api.invocations.clear()
    return problems


def assert_rejected(api: Api, conn: Conn, event: dict[str, Any], status: int) -> None:
    assert rejections(api, conn, [(event["rawPath"], event, status)]) == []


@pytest.mark.parametrize("name", sorted(BAD_BY_ROUTE))
def test_bad_input_is_a_4xx_json_error_and_writes_nothing(api, conn, effective, name):
    """Given the event with Ada and Grace, when a route gets malformed JSON, a wrong type,
    an unknown field, an out-of-range or pattern-breaking value, or names someone who is
    not there, then a 4xx JSON body with `error` and `message`, and no row written in
    events, profiles, attendees, the queue, jobs, matches or dismissals."""
    cases = [
        (case, request(name, **changes), status) for case, changes, status in BAD_BY_ROUTE[name]
    ]
    assert rejections(api, conn, cases) == []


BAD_CODES = ["tc", "x" * 65, "tech_conf", INJECTION_CODE, "techconf 2026", "tëchconf"]
BAD_USER_IDS = [INJECTION_USER_ID, "u" * 129, "ada lindqvist", "u-1,u-2", "ü-1", "u-1;u-2"]


@pytest.mark.parametrize("name", CODE_ROUTES)
def test_bad_path_parameters_are_422_and_an_unknown_event_404_on_every_route(
    api, conn, effective, name
):
    """Given the event, when a route's {code} (the seed routes' eventCode) breaks the
    event-code pattern (too short, too long, underscore, SQL, space, non-ASCII) or its
    {user_id} breaks the user-id pattern (SQL, 129 characters, space, comma, non-ASCII,
    semicolon), then 422; when the code names an event that does not exist, then 404;
    nothing is written either way."""
    cases = [(f"code {code!r}", for_event(name, code), 422) for code in BAD_CODES]
    if name in USER_ROUTES:
        cases += [(f"user {u!r}", request(name, user_id=u), 422) for u in BAD_USER_IDS]
    cases.append(("unknown event", for_event(name, "techconf-2025"), 404))
    assert rejections(api, conn, cases) == []


def padded(event: dict[str, Any], size: int) -> dict[str, Any]:
    """The request with its valid body (or {}) padded with whitespace to `size` bytes."""
    raw = event.get("body", "{}")
    padding = size - len(raw.encode())
    assert padding >= 0
    event["body"] = raw[:-1] + " " * padding + raw[-1]
    event["headers"]["content-type"] = "application/json"
    event["headers"]["content-length"] = str(size)
    return event


@pytest.mark.parametrize("name", ALL_ROUTES)
def test_a_body_over_256_kib_is_413_on_every_route(api, conn, effective, name):
    """Given the event, when a route gets its valid body padded to 256 KiB + 1 byte
    (still valid JSON), then 413 too_large and nothing written or invoked."""
    assert_rejected(api, conn, padded(effective_request(name), MAX_BODY_BYTES + 1), 413)


def test_a_body_of_exactly_256_kib_is_accepted(api, conn, effective):
    """Given the event, when Ada's profile arrives padded to exactly 256 KiB, then 200."""
    reply = api(padded(request("put_attendee"), MAX_BODY_BYTES))
    assert reply.status == 200
    assert reply.json["status"] == "unchanged"


# --- the database down -------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_a_database_refusing_connections_is_503_on_every_route(api, monkeypatch):
    """Given DATABASE_URL pointing at a closed port, when every route is called, then each
    answers 503 unavailable as JSON, quickly, and nothing is invoked."""
    set_env(monkeypatch, DATABASE_URL=f"postgresql://postgres@127.0.0.1:{closed_port()}/mm")
    for name in ALL_ROUTES:
        started = time.monotonic()
        reply = api(request(name))
        assert reply.is_error(503, "unavailable"), (name, reply)
        assert time.monotonic() - started < 3, name
    assert api.invocations == []


def test_a_database_that_never_answers_is_503_after_the_connect_timeout(api, monkeypatch):
    """Given a server that accepts TCP connections but never speaks and CONNECT_TIMEOUT_S=1,
    when get_event.json is sent, then 503 within a few seconds instead of hanging."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        set_env(monkeypatch, DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/mm")
        started = time.monotonic()
        reply = api(request("get_event"))
        elapsed = time.monotonic() - started
    assert reply.is_error(503, "unavailable"), reply
    assert elapsed < 5


def test_a_connection_dropped_between_invocations_is_503_then_recovers(api, conn):
    """Given a warm container whose cached connection the server has since closed, when
    a request arrives, then 503 unavailable (the connection is discarded); when the
    client retries, then a new connection serves it (200)."""
    seed(conn)
    assert api(request("get_event")).status == 200
    killed = conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'matchmaker-api' AND datname = current_database()"
    ).fetchall()
    assert killed == [(True,)]

    reply = api(request("get_event"))

    assert reply.is_error(503, "unavailable"), reply
    retry = api(request("get_event"))
    assert retry.status == 200
    assert retry.json["attendees"] == 2


def test_admin_settings_change_requeues_the_event_and_a_drain_applies_it(api, conn, settings):
    """Given a matched event, when admin_settings.json changes k to 2 (and asks for the
    OpenAI embedder, which without a key falls back to the local one), then 200 with the
    new settings, every attendee is queued at priority 0, the matchmaker is invoked, and
    after a drain every list has 2 entries and equals the oracle's; repeating the same
    change is a no-op (nothing queued, no invoke)."""
    event = seed(conn, crowd=4)
    drain(conn, settings)
    assert queue_rows(conn, event.id) == []

    reply = api(request("admin_settings", body={"k": 2, "embedder": "openai"}))

    assert reply.status == 200
    assert reply.json["settings"]["k"] == 2
    assert reply.json["settings"]["embedder"] == "openai"
    rows = queue_rows(conn, event.id)
    assert {(r["priority"], r["reason"]) for r in rows} == {(0, "settings_changed")}
    assert len(rows) == reply.json["attendees"]
    assert len(api.invocations) == 1
    drain(conn, settings)
    updated = repo.fetch_event(conn, CODE)
    assert updated is not None and updated.settings.k == 2
    lists = lists_of(conn, event.id)
    assert all(len(matches) == 2 for matches in lists.values())
    assert verify_event(conn, updated, LocalEmbedder().key).ok

    api.invocations.clear()
    again = api(request("admin_settings", body={"k": 2, "embedder": "openai"}))
    assert again.status == 200
    assert queue_rows(conn, event.id) == []
    assert api.invocations == []


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_a_body_that_is_not_json_is_415_and_writes_nothing(api, conn, content_type):
    """Given put_attendee.json with its body sent as another media type (what `curl -d`
    does without a header), then 415 with the documented error shape, and no row."""
    event = request("put_attendee")
    event["headers"]["content-type"] = content_type
    assert_rejected(api, conn, event, 415)


@pytest.mark.parametrize("conflicts", [1, 99])
def test_a_request_rolled_back_by_a_deadlock_is_retried_then_503(api, conn, monkeypatch, conflicts):
    """Given the join's transaction rolled back by a deadlock once, the operation runs its
    transaction again within the same request and answers 200 joined; given conflicts
    that persist, 503 conflict after three tries, and nothing is written."""
    event = seed(conn)
    real_join = repo.upsert_profiles_and_join
    calls = {"n": 0}

    def conflicting(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] <= conflicts:
            raise psycopg.errors.DeadlockDetected("deadlock detected (simulated)")
        real_join(*args, **kwargs)

    monkeypatch.setattr(repo, "upsert_profiles_and_join", conflicting)
    reply = api(request("put_attendee", user_id="newcomer-1"))

    joined = conn.execute(
        "SELECT count(*) FROM attendees a JOIN profiles p ON p.id = a.profile_id"
        " WHERE a.event_id = %s AND p.user_id = 'newcomer-1'",
        (event.id,),
    ).fetchone()
    if conflicts == 1:
        assert (reply.status, reply.json["status"], joined) == (200, "joined", (1,))
    else:
        assert reply.is_error(503, "conflict"), reply
        assert calls["n"] == 3
        assert joined == (0,)

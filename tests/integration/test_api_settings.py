"""PATCH /admin/events/{code}/settings through the HTTP API handler (real PostgreSQL, moto
for the matchmaker invoke): every field, alone and together, lands in the stored row and
re-queues the event; every invalid value is a 422 that writes nothing. And every CHECK
constraint of the schema that input can reach has a model (or operation) counterpart that
rejects the same value first, with the same words, before the database is touched."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from core.data.repository import Conn
from core.models import EventIn, EventRecord, Profile
from core.queue.worker import Matchmaker
from core.settings import Settings
from tests.helpers import queue_rows
from tests.integration.api_support import (
    ADA,
    CODE,
    GRACE,
    WORKER_FUNCTION,
    load_event,
    request,
    snapshot,
)
from tooling.local_runs import import_profiles

pytestmark = pytest.mark.filterwarnings("ignore:No application metrics to publish:UserWarning")

CREATED = json.loads(load_event("create_event")["body"])["settings"]  # what seeded starts with
GRACE_BODY = {
    "name": "Grace Oyelaran",
    "company": "Tidewater Logistics",
    "interests": ["stream processing", "kafka operations", "postgresql"],
    "seeking": ["recommender systems"],
    "offering": ["kafka operations"],
}
# The settings as the events row stores them (column names differ from the model's).
STORED_SETTINGS = """
    SELECT k, exclude_same_company, embedder, icebreakers, exposure_correction, hubness_m,
           weight_interests AS interests,
           weight_complement AS complementarity, weight_bio AS bio
    FROM events WHERE code = %s"""


def join_both(conn: Conn) -> EventRecord:
    """techconf-2026 (create_event.json) with Ada and Grace joined (their rows queued)."""
    return import_profiles(
        conn,
        EventIn(**json.loads(load_event("create_event")["body"])),
        [
            Profile(user_id=ADA, **json.loads(load_event("put_attendee")["body"])),
            Profile(user_id=GRACE, **GRACE_BODY),
        ],
    )


@pytest.fixture
def matched(conn: Conn, settings: Settings) -> EventRecord:
    """The event with Ada and Grace, matched: nothing queued."""
    event = join_both(conn)
    assert Matchmaker(settings).run(conn, deadline=time.monotonic() + 60).completed == 2
    assert queue_rows(conn, event.id) == []
    return event


def stored(conn: Conn) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(STORED_SETTINGS, (CODE,)).fetchone()
    assert row is not None
    weights = {name: row.pop(name) for name in ("interests", "complementarity", "bio")}
    return {**row, "weights": weights}


def patch(body: Any) -> dict[str, Any]:
    return request("admin_settings", body=body)


def with_changes(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` settings with `changes` applied, weights field by field."""
    weights = {**base["weights"], **changes.get("weights", {})}
    return {**base, **changes, "weights": weights}


# --- every field through the route -------------------------------------------------------

MATCHING_PATCHES = {
    "k": {"k": 5},
    "exclude_same_company": {"exclude_same_company": False},
    "weights-partial": {"weights": {"bio": 2.5}},
    "weights-full": {"weights": {"interests": 0, "complementarity": 3.25, "bio": 0}},
    "embedder": {"embedder": "openai"},
    "exposure_correction": {"exposure_correction": "hubness"},
    "hubness_m": {"hubness_m": 25},
    "all-at-once": {
        "k": 1,
        "exclude_same_company": False,
        "weights": {"interests": 10, "complementarity": 0.125, "bio": 0},
        "embedder": "openai",
        "icebreakers": True,
        "exposure_correction": "hubness",
        "hubness_m": 1,
    },
}


@pytest.mark.parametrize("case", sorted(MATCHING_PATCHES))
def test_each_matching_setting_is_stored_and_requeues_the_event(api, conn, matched, case):
    """Given the matched event, when an admin PATCHes k, the same-company rule, some or
    all weights, the embedder, or all of them, then 200 with the new settings, the stored
    row holds exactly them (omitted weights keep their value), every active attendee is
    queued at priority 0 for settings_changed, and the matchmaker is invoked once."""
    expected = with_changes(CREATED, MATCHING_PATCHES[case])
    assert expected != CREATED

    reply = api(patch(MATCHING_PATCHES[case]))

    assert reply.status == 200, reply
    assert reply.json["settings"] == expected
    assert stored(conn) == expected
    rows = queue_rows(conn, matched.id)
    assert sorted((r["user_id"], r["priority"], r["reason"]) for r in rows) == sorted(
        [(ADA, 0, "settings_changed"), (GRACE, 0, "settings_changed")]
    )
    assert [(i.function_name, i.invocation_type, i.payload) for i in api.invocations] == [
        (WORKER_FUNCTION, "Event", {"source": "trigger", "event_code": CODE})
    ]


def test_icebreakers_are_stored_without_requeueing_the_lists(api, conn, matched):
    """Given the matched event, when an admin turns icebreakers on, then 200, the stored
    row says so, and nothing is queued: the setting changes no score or list (icebreakers
    come with the lists written from then on)."""
    reply = api(patch({"icebreakers": True}))

    assert reply.status == 200, reply
    assert reply.json["settings"] == {**CREATED, "icebreakers": True}
    assert stored(conn) == {**CREATED, "icebreakers": True}
    assert queue_rows(conn, matched.id) == []


@pytest.mark.parametrize(
    "body",
    [{}, {"k": CREATED["k"]}, {"weights": {"bio": CREATED["weights"]["bio"]}}, {"k": None}],
    ids=["empty", "same-k", "same-weight", "null-k"],
)
def test_a_patch_that_changes_nothing_queues_and_invokes_nothing(api, conn, matched, body):
    """Given the matched event, when the patch is empty, repeats the current values or
    sends null (null keeps the value, like omitting it), then 200 with the settings as
    they were, nothing written, nothing queued, no invoke."""
    before = snapshot(conn)
    reply = api(patch(body))
    assert reply.status == 200, reply
    assert reply.json["settings"] == CREATED
    assert snapshot(conn) == before
    assert api.invocations == []


INVALID_PATCHES = {
    "k-0": ({"k": 0}, "greater than or equal to 1"),
    "k-11": ({"k": 11}, "less than or equal to 10"),
    "k-float": ({"k": 2.5}, "valid integer"),
    "k-string": ({"k": "5"}, "valid integer"),
    "k-bool": ({"k": True}, "valid integer"),
    "k-huge": ('{"k": 1' + "0" * 30 + "}", "digits"),
    "same-company-string": ({"exclude_same_company": "false"}, "valid boolean"),
    "weight-negative": ({"weights": {"bio": -0.1}}, "greater than or equal to 0"),
    "weight-above-10": ({"weights": {"interests": 10.5}}, "less than or equal to 10"),
    "weight-string": ({"weights": {"complementarity": "1"}}, "valid number"),
    "weight-nan": ('{"weights": {"bio": NaN}}', "NaN"),
    "weight-infinity": ('{"weights": {"bio": Infinity}}', "Infinity"),
    "weight-overflow": ('{"weights": {"bio": 1e309}}', "out of range"),
    "weights-all-zero": (
        {"weights": {"interests": 0, "complementarity": 0, "bio": 0}},
        "at least one weight must be greater than 0",
    ),
    "weights-unknown": ({"weights": {"gravity": 1}}, "Extra inputs"),
    "weights-a-list": ({"weights": [1, 1, 0.5]}, "weights"),
    "embedder-unknown": ({"embedder": "word2vec"}, "'local' or 'openai'"),
    "icebreakers-string": ({"icebreakers": "yes"}, "valid boolean"),
    "unknown-field": ({"radius": 3}, "Extra inputs"),
    "valid-but-one-bad": ({"k": 4, "embedder": "word2vec"}, "embedder"),
}


@pytest.mark.parametrize("case", sorted(INVALID_PATCHES))
def test_an_invalid_patch_is_422_and_writes_nothing(api, conn, matched, case):
    """Given the matched event, when a patch has a value out of range, of the wrong type,
    not finite, all weights 0, an unknown field or embedder, then 422 validation_error
    saying what is wrong, nothing written (settings, queue), no invoke."""
    body, words = INVALID_PATCHES[case]
    before = snapshot(conn)
    reply = api(patch(body))
    assert reply.is_error(422, "validation_error"), reply
    assert words in reply.json["message"]
    assert snapshot(conn) == before
    assert api.invocations == []


def test_a_partial_weight_patch_that_leaves_every_weight_zero_is_422(api, conn, matched):
    """Given the event's interest and complementarity weights set to 0 (bio 0.5 left),
    when a patch sets only bio to 0, then 422 (the merged weights are all 0), nothing
    written: the whole result is validated, not only the fields sent."""
    assert api(patch({"weights": {"interests": 0, "complementarity": 0}})).status == 200
    before = snapshot(conn)
    api.invocations.clear()

    reply = api(patch({"weights": {"bio": 0}}))

    assert reply.is_error(422, "validation_error"), reply
    assert "at least one weight must be greater than 0" in reply.json["message"]
    assert reply.json["details"] == [{"field": "weights", "message": reply.json["message"]}]
    assert snapshot(conn) == before
    assert api.invocations == []


# --- every CHECK constraint has a counterpart before the database -------------------------


@dataclass
class Counterpart:
    """A value that breaks a CHECK constraint: SQL proving the database would refuse it
    (with that constraint), and requests carrying it that the API refuses first."""

    violate: str  # SQL using %(value)s
    value: Any
    requests: Callable[[Any], list[dict[str, Any]]]
    words: str  # what the API's message says
    status: int = 422


def _weight(field: str, column: str) -> Counterpart:
    return Counterpart(
        f"INSERT INTO events (code, {column}) VALUES ('chk-weight', %(value)s)",
        -0.5,
        lambda v: [
            request("create_event", body={"code": "chk-w", "settings": {"weights": {field: v}}}),
            patch({"weights": {field: v}}),
        ],
        "greater than or equal to 0",
    )


def _tags(field: str) -> Counterpart:
    return Counterpart(
        f"INSERT INTO profiles (user_id, {field}) VALUES ('chk-tags', %(value)s)",
        [f"tag {i}" for i in range(51)],
        lambda v: [request("put_attendee", body={field: v})],
        "at most 50 items",
    )


INPUT_CHECKS: dict[str, Counterpart] = {
    "events_code_check": Counterpart(
        "INSERT INTO events (code) VALUES (%(value)s)",
        "tech conf",
        lambda v: [request("create_event", body={"code": v})],
        "should match pattern",
    ),
    "events_k_check": Counterpart(
        "INSERT INTO events (code, k) VALUES ('chk-k', %(value)s)",
        11,
        lambda v: [
            request("create_event", body={"code": "chk-k", "settings": {"k": v}}),
            patch({"k": v}),
        ],
        "less than or equal to 10",
    ),
    "events_exposure_correction_check": Counterpart(
        "INSERT INTO events (code, exposure_correction) VALUES ('chk-exp', %(value)s)",
        "quota",
        lambda v: [
            request("create_event", body={"code": "chk-e", "settings": {"exposure_correction": v}}),
            patch({"exposure_correction": v}),
        ],
        "Input should be 'none' or 'hubness'",
    ),
    "events_hubness_m_check": Counterpart(
        "INSERT INTO events (code, hubness_m) VALUES ('chk-m', %(value)s)",
        51,
        lambda v: [
            request("create_event", body={"code": "chk-m", "settings": {"hubness_m": v}}),
            patch({"hubness_m": v}),
        ],
        "less than or equal to 50",
    ),
    "events_weight_interests_check": _weight("interests", "weight_interests"),
    "events_weight_complement_check": _weight("complementarity", "weight_complement"),
    "events_weight_bio_check": _weight("bio", "weight_bio"),
    "events_check": Counterpart(
        "INSERT INTO events (code, weight_interests, weight_complement, weight_bio)"
        " VALUES ('chk-sum', %(value)s, %(value)s, %(value)s)",
        0.0,
        lambda v: [
            request(
                "create_event",
                body={
                    "code": "chk-s",
                    "settings": {"weights": dict.fromkeys(CREATED["weights"], v)},
                },
            ),
            patch({"weights": dict.fromkeys(CREATED["weights"], v)}),
        ],
        "at least one weight must be greater than 0 (interests + complementarity + bio > 0)",
    ),
    "profiles_user_id_check": Counterpart(
        "INSERT INTO profiles (user_id) VALUES (%(value)s)",
        "u" * 129,
        lambda v: [
            request("put_attendee", user_id=v),
            request("dismiss", body={"dismissed_user_id": v}),
            request("trigger_queue", body={"user_ids": [v]}),
        ],
        "should match pattern",
    ),
    "profiles_bio_check": Counterpart(
        "INSERT INTO profiles (user_id, bio) VALUES ('chk-bio', %(value)s)",
        "b" * 4001,
        lambda v: [request("put_attendee", body={"bio": v})],
        "at most 4000 characters",
    ),
    "profiles_interests_check": _tags("interests"),
    "profiles_seeking_check": _tags("seeking"),
    "profiles_offering_check": _tags("offering"),
    "matchmaking_queue_priority_check": Counterpart(
        "UPDATE matchmaking_queue SET priority = %(value)s",
        4,
        lambda v: [request("admin_start", body={"priority": v})],
        "less than or equal to 3",
    ),
    "dismissals_check": Counterpart(
        "INSERT INTO dismissals (event_id, profile_id, dismissed_profile_id)"
        " SELECT a.event_id, a.profile_id, a.profile_id FROM attendees a"
        " JOIN profiles p ON p.id = a.profile_id WHERE p.user_id = %(value)s",
        ADA,
        lambda v: [request("dismiss", body={"dismissed_user_id": v})],  # dismiss.json is Ada's
        "cannot dismiss themselves",
        status=400,
    ),
}
# Constraints on what only the worker and the queue write, never a request's input.
INTERNAL_CHECKS = {
    "icebreakers_text_check": "icebreaker sentences come from the chat model, trimmed",
    "matchmaking_jobs_status_check": "job states are set by the worker and pause/resume",
    "matchmaking_queue_check": "a lease token exactly while running, set by the worker",
    "matchmaking_queue_status_check": "queue states are set by the worker and redrive",
    "profile_vectors_check": "vectors are written by the embedder",
    "provider_breaker_state_check": "the circuit breaker's state is set by the worker",
    "profile_vectors_dims_check": "vectors are written by the embedder",
    "user_matches_check": "lists are written by the engine, which never lists oneself",
    "user_matches_rank_check": "ranks 1..k come from the engine, k at most 10",
}


def check_constraints(conn: Conn) -> dict[str, str]:
    """Every CHECK constraint of the schema: name -> definition."""
    rows = conn.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE contype = 'c' AND connamespace = 'public'::regnamespace"
    ).fetchall()
    return {name: definition for name, definition in rows}


def test_every_check_constraint_is_either_reached_by_input_or_internal(conn):
    """A new CHECK constraint fails this test until it is given a model counterpart (or
    is shown to be out of any request's reach)."""
    assert not INPUT_CHECKS.keys() & INTERNAL_CHECKS.keys()
    assert set(check_constraints(conn)) == INPUT_CHECKS.keys() | INTERNAL_CHECKS.keys()


@pytest.mark.parametrize("name", sorted(INPUT_CHECKS))
def test_each_check_constraint_has_a_model_counterpart_that_rejects_first(api, conn, name):
    """Given the event with Ada and Grace joined, for each CHECK constraint input can
    reach: the value breaks exactly that constraint when written straight to the database,
    and every request carrying it is refused by the API first (422 from the model, or 400
    from the operation for dismissing oneself) with the constraint's words (its pattern
    itself, for pattern checks), writing nothing."""
    join_both(conn)
    counterpart = INPUT_CHECKS[name]
    definition = check_constraints(conn)[name]

    with pytest.raises(psycopg.errors.CheckViolation) as refused, conn.transaction():
        conn.execute(counterpart.violate, {"value": counterpart.value})
    assert refused.value.diag.constraint_name == name

    pattern = re.search(r"~ '([^']*)'", definition)
    words = [counterpart.words] + ([pattern.group(1)] if pattern else [])
    error = {422: "validation_error", 400: "bad_request"}[counterpart.status]
    problems = []
    for event in counterpart.requests(counterpart.value):
        before = snapshot(conn)
        reply = api(event)
        if not reply.is_error(counterpart.status, error):
            problems.append(f"{event['routeKey']}: {reply}")
        elif missing := [w for w in words if w not in reply.json["message"]]:
            problems.append(f"{event['routeKey']}: {reply.json['message']!r} lacks {missing}")
        if snapshot(conn) != before:
            problems.append(f"{event['routeKey']}: rows were written")
    assert problems == []

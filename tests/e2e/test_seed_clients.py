"""A client of the seed system, unchanged but for the base URL and the token, against
`matchmaker serve` over real HTTP: it calls the seed's edge functions
(POST /trigger-matchmaking, POST /admin-start-matching) with the seed's camelCase bodies
and reads the matches it asked for."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from core.api.schemas import StartOut, StatusOut
from tests.e2e.test_serve import (
    Server,
    call,
    make_event,
    matches_of,
    own_server,
    wait_drained,
)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """One `matchmaker serve` for the module, as tests/e2e/test_serve.py starts it."""
    with own_server("matchmaker-seed-e2e-") as srv:
        yield srv


def test_a_seed_client_triggers_synchronously_reads_matches_and_starts_matching(
    server: Server,
) -> None:
    """Given an event with 8 attendees, when the old client triggers matchmaking in the
    legacy synchronous mode, then 200 with everyone matched and every attendee's list is
    there to read straight away; when the operator's old admin-start call re-queues
    everyone, then 202 with the queue status in the answer, and the queue drains."""
    code = "seed-client"
    ids = make_event(server, code, 8, prefix="sc-")
    wait_drained(server, code)  # the joins are matched by the schedule: re-match all
    for user_id in ids:
        path = f"/events/{code}/attendees/{user_id}/matches"
        assert call(server, "GET", path, server.service).status == 200

    sync = call(
        server,
        "POST",
        "/trigger-matchmaking",
        server.service,
        {"eventCode": code, "useQueue": False, "userIds": ids},
    )

    assert sync.status == 200, sync.text
    assert sync.body == {
        "event": code,
        "queued": 8,
        "mode": "sync",
        "invoked": False,
        "matched": 8,
    }
    for user_id in ids:
        matches = matches_of(server, code, user_id)
        assert len(matches) == 3, (user_id, matches)
        assert user_id not in matches

    started = call(
        server,
        "POST",
        "/admin-start-matching",
        server.admin,
        {"eventCode": code, "mode": "everyone", "priority": 1},
    )

    assert started.status == 202, started.text
    answer = StartOut.model_validate(started.body)
    assert (answer.event, answer.queued, answer.mode) == (code, 8, "queue")
    status = StatusOut.model_validate(started.body["status"])
    assert status.event == code
    # Read right after the enqueue: the 8 rows are still to do, so it is not the status
    # of the drained queue (which counts them done).
    drained = wait_drained(server, code)
    assert started.body["status"].keys() == drained.keys()
    assert started.body["status"] != drained


def test_a_seed_client_in_queue_mode_gets_its_matches_from_the_matchmaker(
    server: Server,
) -> None:
    """Given 6 attendees, when the old client sends only {"eventCode"} (queue mode), then
    202 queued and, once the queue drains, every attendee has a list."""
    code = "seed-queue"
    ids = make_event(server, code, 6, prefix="sq-")

    reply = call(server, "POST", "/trigger-matchmaking", server.service, {"eventCode": code})

    assert reply.status == 202, reply.text
    assert reply.body["mode"] == "queue"
    wait_drained(server, code)
    assert all(len(matches_of(server, code, user_id)) == 3 for user_id in ids)


def test_the_seed_routes_check_tokens_roles_events_and_bodies(server: Server) -> None:
    """Without a token 401; the service token on admin-start 403; an unknown event 404;
    a snake_case field, or a priority on the trigger, 422 naming it."""
    code = "seed-refusals"
    make_event(server, code, 3, prefix="sr-")
    wait_drained(server, code)
    trigger, start = "/trigger-matchmaking", "/admin-start-matching"

    assert call(server, "POST", trigger, None, {"eventCode": code}).is_error(401, "unauthorized")
    assert call(server, "POST", start, None, {"eventCode": code}).is_error(401, "unauthorized")
    forbidden = call(server, "POST", start, server.service, {"eventCode": code})
    assert forbidden.is_error(403, "forbidden"), forbidden.text
    for path, token in ((trigger, server.service), (start, server.admin)):
        unknown = call(server, "POST", path, token, {"eventCode": "seed-nope"})
        assert unknown.is_error(404, "not_found"), unknown.text
    snake = call(server, "POST", trigger, server.service, {"eventCode": code, "user_ids": []})
    assert snake.is_error(422, "validation_error"), snake.text
    assert "user_ids" in snake.body["message"]
    priority = call(server, "POST", trigger, server.service, {"eventCode": code, "priority": 4})
    assert priority.is_error(422, "validation_error"), priority.text
    assert "priority" in priority.body["message"]

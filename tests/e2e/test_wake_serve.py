"""`matchmaker serve` with the schedule an hour apart: the only thing that can start the
matchmaker is the wake a write sends (the wake queue on moto's SQS server, consumed as the
event source mapping would). Newcomers, a burst of them and an edit get their lists
without any trigger call or schedule tick. Not timed beyond a generous bound."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.test_serve import Server, _stop_orphaned_postgres, call, launch, stop
from tooling.synthetic import generate_profiles

K = 3  # the default k of an event created without settings
WAIT_S = 20.0  # far above the second it takes: this test checks that it happens at all


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    workdir = Path(tempfile.mkdtemp(prefix="matchmaker-wake-"))
    srv = launch(env, workdir, "--schedule-seconds", "3600")
    try:
        yield srv
    finally:
        if stop(srv) == -9:
            _stop_orphaned_postgres(srv.pgdata)
        shutil.rmtree(workdir, ignore_errors=True)


def put(server: Server, code: str, user_id: str, seed: int) -> None:
    [profile] = generate_profiles(1, seed=seed, id_prefix="w-")
    body = profile.model_dump(exclude={"user_id"})
    reply = call(server, "PUT", f"/events/{code}/attendees/{user_id}", server.service, body)
    assert reply.status == 200, reply.text


def list_of(server: Server, code: str, user_id: str) -> list[str]:
    reply = call(server, "GET", f"/events/{code}/attendees/{user_id}/matches", server.service)
    assert reply.status == 200, reply.text
    return [m["user_id"] for m in reply.body["matches"]]


def wait_full(server: Server, code: str, user_ids: list[str]) -> None:
    deadline = time.monotonic() + WAIT_S
    missing = list(user_ids)
    while missing and time.monotonic() < deadline:
        missing = [u for u in missing if len(list_of(server, code, u)) < K]
        if missing:
            time.sleep(0.1)
    assert not missing, f"{len(missing)} without a full list\n{server.diagnostics()}"


def test_joins_get_full_lists_without_a_trigger_or_a_schedule_tick(server: Server) -> None:
    """Given an event created over HTTP and the schedule an hour away, when 12 attendees
    join one by one, then every one of them has k matches soon after, with no trigger."""
    code = "wake-steady"
    assert call(server, "POST", "/events", server.service, {"code": code}).status == 201
    people = [f"s-{i:03d}" for i in range(12)]
    for i, user_id in enumerate(people):
        put(server, code, user_id, seed=i)
    wait_full(server, code, people)


def test_a_burst_and_an_edit_are_served_by_wakes(server: Server) -> None:
    """Given a matched event, when 60 newcomers join at once and one attendee then changes
    their profile, then all 60 have full lists and the edited attendee is matched again
    (queue empty) without any trigger."""
    code = "wake-burst"
    assert call(server, "POST", "/events", server.service, {"code": code}).status == 201
    base = [f"b-{i:03d}" for i in range(10)]
    for i, user_id in enumerate(base):
        put(server, code, user_id, seed=1000 + i)
    wait_full(server, code, base)

    burst = [f"n-{i:03d}" for i in range(60)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda pair: put(server, code, pair[1], 2000 + pair[0]), enumerate(burst)))
    wait_full(server, code, burst)

    put(server, code, base[0], seed=9999)  # another profile for the same attendee
    deadline = time.monotonic() + WAIT_S
    while True:
        status = call(server, "GET", f"/admin/events/{code}/status", server.admin).body
        if status["queue"]["pending"] == status["queue"]["running"] == 0:
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    assert len(list_of(server, code, base[0])) == K

"""A woken run lingers (issue 14, the last gap: fewer runs per 100 joins at a steady rate).

A run the wake queue started keeps polling for new rows after the queue ran dry, holding
a presence lease (db/migrations/0011); the API sends no wake while a lease is valid; the
run leaves by deleting its lease, committing, and only then looking once more. The steps
that could race are driven explicitly here: through the lingering run's pause between
polls (Matchmaker.pause) and around its lease's deletion (repo.release_presence), never by
sleeps racing each other. Real PostgreSQL; moto for SQS; EMF metrics read from stdout."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

import core.settings
import handlers.matchmaker
from core.data import repository as repo
from core.data.connections import connect
from core.data.repository import Conn
from core.queue.worker import Matchmaker
from core.settings import Settings
from tests.helpers import add_attendees, queue_rows
from tests.integration import test_wake
from tests.integration.api_support import CODE, Api, reset_handler_state
from tests.integration.test_metrics import emitted
from tests.integration.test_wake import (
    K,
    drain_everything,
    event_with_crowd,
    matches_of,
    put,
    received,
)
from tests.integration.test_worker_handlers import FakeContext
from tooling.synthetic import generate_profiles

pytestmark = pytest.mark.filterwarnings("ignore:No application metrics to publish:UserWarning")

# test_wake's fixtures: the API with WAKE_QUEUE_URL set and EMF metrics on, and the queue
api = test_wake.api
wake_queue = test_wake.wake_queue


def wake_batch(code: str = CODE) -> dict[str, Any]:
    """The SQS event the wake queue's event source mapping hands the matchmaker."""
    body = json.dumps({"type": "matchmaking.wake", "event_code": code, "reason": "attendee"})
    return {"Records": [{"messageId": "m-1", "body": body, "eventSource": "aws:sqs"}]}


def linger(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    monkeypatch.setenv("WAKE_LINGER_SECONDS", str(seconds))
    core.settings.get_settings.cache_clear()
    reset_handler_state()


def presence_rows(conn: Conn) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT run_id, worker_id, lease_until FROM matchmaker_presence").fetchall()


def pausing(on_first_poll: Callable[[], None]) -> Callable[[float], None]:
    """A lingering run's pause between polls that does `on_first_poll` the first time."""
    calls: list[float] = []

    def pause(seconds: float) -> None:
        calls.append(seconds)
        if len(calls) == 1:
            on_first_poll()
        time.sleep(seconds)

    return pause


def wrap_release(
    monkeypatch: pytest.MonkeyPatch, before: Callable[[], None], after: Callable[[], None]
) -> list[int]:
    """repo.release_presence with `before`/`after` run around the first real deletion."""
    real = repo.release_presence
    calls: list[int] = []

    def release(conn: Conn, run_id: uuid.UUID) -> None:
        calls.append(1)
        if len(calls) == 1:
            before()
        real(conn, run_id)
        if len(calls) == 1:
            after()

    monkeypatch.setattr(repo, "release_presence", release)
    return calls


def nothing() -> None:
    return None


@pytest.mark.parametrize("joins", ["before the lease is deleted", "after the lease is deleted"])
def test_a_join_between_the_last_empty_claim_and_the_exit_is_served_by_the_leaving_run(
    api: Api, conn: Conn, wake_queue: str, monkeypatch: pytest.MonkeyPatch, capsys: Any, joins: str
) -> None:
    """The lost-wake race. Given a woken run that lingered and found nothing, when a
    newcomer's join commits after the run's last empty claim and (a) before its lease's
    deletion commits: the API sees the lease and sends no wake (WakesSkipped), or (b)
    after it: the API sends a wake; either way the run's last look, which starts after the
    deletion, finds the row and the same run gives the newcomer a full list."""
    event_with_crowd(conn, CODE, 20, seed=21)
    drain_everything(conn)
    linger(monkeypatch, 0.2)
    joined: list[int] = []

    def join() -> None:
        assert (
            presence_rows(conn) != [] if joins.startswith("before") else presence_rows(conn) == []
        )
        joined.append(put(api, "n-race", seed=210))

    first = join if joins.startswith("before") else nothing
    then = join if joins.startswith("after") else nothing
    releases = wrap_release(monkeypatch, first, then)
    capsys.readouterr()

    summary = handlers.matchmaker.lambda_handler(wake_batch(), FakeContext())

    assert joined == [200]
    wakes = received(wake_queue)
    out = emitted(capsys.readouterr().out)
    if joins.startswith("before"):
        assert wakes == []
        assert out.get("WakesSkipped") == [1.0]
    else:
        assert [json.loads(w["body"])["event_code"] for w in wakes] == [CODE]
        assert "WakesSkipped" not in out
    assert summary["completed"] == 1  # the newcomer, by this run
    assert len(releases) == 2  # it left, found the row, served it, left again
    assert len(matches_of(api, "n-race")) == K
    assert queue_rows(conn) == []
    assert presence_rows(conn) == []


def test_while_a_run_lingers_the_api_sends_no_wake_and_that_run_serves_the_join(
    api: Api, conn: Conn, wake_queue: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """Given a woken run lingering on an empty queue (its presence lease valid), when a
    newcomer joins, then no wake is sent (the queue stays empty, WakesSkipped counted), the
    same run serves the newcomer at its next poll, and it leaves afterwards (lease gone);
    then the next join sends a wake."""
    event_with_crowd(conn, CODE, 20, seed=22)
    drain_everything(conn)
    linger(monkeypatch, 0.3)
    seen: dict[str, Any] = {}

    def join_while_present() -> None:
        [(_, worker_id, _)] = presence_rows(conn)
        seen["worker_id"] = worker_id
        seen["status"] = put(api, "n-during", seed=220)
        seen["wakes"] = received(wake_queue)

    handlers.matchmaker._matchmaker_for().pause = pausing(join_while_present)
    capsys.readouterr()

    summary = handlers.matchmaker.lambda_handler(wake_batch(), FakeContext())

    assert seen["status"] == 200
    assert seen["wakes"] == []
    assert seen["worker_id"] == handlers.matchmaker._matchmaker_for().worker_id
    assert emitted(capsys.readouterr().out).get("WakesSkipped") == [1.0]
    assert summary["source"] == "wake"
    assert summary["completed"] == 1
    assert summary["lingered_s"] > 0
    assert summary["woke_successor_for"] is None
    assert len(matches_of(api, "n-during")) == K
    assert presence_rows(conn) == []
    assert received(wake_queue) == []

    assert put(api, "n-after", seed=221) == 200
    assert [json.loads(w["body"])["event_code"] for w in received(wake_queue)] == [CODE]


def test_a_crashed_runs_lease_suppresses_wakes_only_until_it_expires(
    api: Api, conn: Conn, wake_queue: str
) -> None:
    """Given a lease left by a run that died without leaving (0.5 s, the database's clock),
    then a join while it is valid sends no wake, and a join once it has expired does: a
    dead run holds wakes back for at most its lease."""
    event_with_crowd(conn, CODE, 12, seed=23)
    drain_everything(conn)
    repo.hold_presence(conn, uuid.uuid4(), "crashed:1", 0.5)
    [(_, _, lease_until)] = presence_rows(conn)
    row = conn.execute(
        "SELECT extract(epoch FROM %s::timestamptz - clock_timestamp())::float8", (lease_until,)
    ).fetchone()
    assert row is not None
    left_s = float(row[0])
    assert 0 < left_s <= 0.5

    assert put(api, "n-while", seed=230) == 200
    assert received(wake_queue) == []

    time.sleep(left_s + 0.05)  # until the lease's end has passed: no race, a bound
    assert put(api, "n-expired", seed=231) == 200
    assert [json.loads(w["body"])["event_code"] for w in received(wake_queue)] == [CODE]


def test_a_run_out_of_time_with_work_left_wakes_a_successor(
    api: Api, conn: Conn, wake_queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given a woken run lingering until its deadline nears (1 s budget), when a newcomer
    joins as it leaves (its lease still valid: the API sends no wake) and no time is left
    by its last look, then the run sends the wake itself (reason "successor"), and the run
    that wake starts gives the newcomer a full list."""
    event_with_crowd(conn, CODE, 12, seed=24)
    drain_everything(conn)
    linger(monkeypatch, 30)
    statuses: list[int] = []

    def join_then_run_out_of_time() -> None:
        statuses.append(put(api, "n-late", seed=240))
        assert received(wake_queue) == []  # the lease was still valid

    def let_the_deadline_pass() -> None:
        time.sleep(1.1)  # the whole budget: ordering, not a race

    wrap_release(monkeypatch, join_then_run_out_of_time, let_the_deadline_pass)
    budget = FakeContext(remaining_ms=16_000)  # WORKER_SAFETY_MS 15,000: 1 s to work

    summary = handlers.matchmaker.lambda_handler(wake_batch(), budget)

    assert statuses == [200]
    assert summary["stopped"] == "deadline"
    assert summary["woke_successor_for"] == CODE
    assert summary["completed"] == 0
    records = received(wake_queue)
    assert [json.loads(r["body"]) for r in records] == [
        {"type": "matchmaking.wake", "event_code": CODE, "reason": "successor"}
    ]
    assert presence_rows(conn) == []

    linger(monkeypatch, 0)
    successor = handlers.matchmaker.lambda_handler({"Records": records}, FakeContext())
    assert successor["completed"] == 1
    assert len(matches_of(api, "n-late")) == K


def test_linger_zero_and_scheduled_runs_leave_at_once_as_before(
    api: Api, conn: Conn, wake_queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given WAKE_LINGER_SECONDS=0, a woken run never holds a lease nor pauses, and a join
    right after it sends a wake; a scheduled run (whatever the setting) never lingers."""
    event_with_crowd(conn, CODE, 12, seed=25)
    drain_everything(conn)
    held: list[uuid.UUID] = []
    real_hold = repo.hold_presence

    def hold(conn: Conn, run_id: uuid.UUID, worker_id: str, lease_s: float) -> None:
        held.append(run_id)
        real_hold(conn, run_id, worker_id, lease_s)

    monkeypatch.setattr(repo, "hold_presence", hold)
    linger(monkeypatch, 0)
    woken = handlers.matchmaker.lambda_handler(wake_batch(), FakeContext())
    assert (woken["lingered_s"], held) == (0, [])
    assert put(api, "n-zero", seed=250) == 200
    assert len(received(wake_queue)) == 1

    linger(monkeypatch, 5)
    scheduled = handlers.matchmaker.lambda_handler({"source": "schedule"}, FakeContext())
    assert scheduled["completed"] == 1
    assert (scheduled["lingered_s"], held) == (0, [])
    assert len(matches_of(api, "n-zero")) == K


def test_the_worker_role_holds_and_releases_its_lease_and_the_api_role_reads_it(
    conn: Conn, role_url: Any, settings: Settings
) -> None:
    """Logged in as matchmaker_worker, a lingering run holds its lease through
    mm_hold_presence and deletes it through mm_release_presence; matchmaker_api sees it
    while it is held; neither role may write the table directly."""
    add_attendees(conn, "presence-roles", generate_profiles(8, seed=26, id_prefix="pr-"))
    seen: list[bool] = []
    with (
        connect(role_url("matchmaker_worker"), settings) as worker_conn,
        connect(role_url("matchmaker_api"), settings) as api_conn,
    ):
        worker = Matchmaker(settings)
        worker.pause = pausing(lambda: seen.append(repo.matchmaker_present(api_conn)))
        report = worker.run(worker_conn, deadline=time.monotonic() + 60, linger_s=0.2)

        assert report.completed == 8
        assert seen == [True]
        assert repo.matchmaker_present(api_conn) is False
        assert presence_rows(conn) == []
        for role_conn in (worker_conn, api_conn):
            for statement in (
                "DELETE FROM matchmaker_presence",
                "UPDATE matchmaker_presence SET lease_until = now()",
                "INSERT INTO matchmaker_presence (run_id, worker_id, lease_until)"
                " VALUES (gen_random_uuid(), 'x', now())",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    role_conn.execute(statement)


def test_the_exit_protocol_refuses_to_delete_a_lease_inside_a_transaction(conn: Conn) -> None:
    """The lease's deletion must commit before the run's last look: inside an open
    transaction it would not, so release_presence refuses."""
    run_id = uuid.uuid4()
    repo.hold_presence(conn, run_id, "w:1", 3.0)
    with pytest.raises(RuntimeError, match="must commit"), conn.transaction():
        repo.release_presence(conn, run_id)
    assert len(presence_rows(conn)) == 1
    repo.release_presence(conn, run_id)
    assert presence_rows(conn) == []


def test_an_idle_run_leaves_at_once_when_an_older_run_is_present(
    conn: Conn, settings: Settings
) -> None:
    """Given another run present since before this one (its lease valid), when a woken
    run with a 30 s linger drains its rows, then it leaves without a single pause (the
    older run polls for both), its lease deleted and the older one's kept; alone, the
    same run lingers."""
    add_attendees(conn, "presence-older", generate_profiles(6, seed=27, id_prefix="po-"))
    older = uuid.uuid4()
    assert repo.hold_presence(conn, older, "older:1", 30.0) is False  # nobody before it
    pauses: list[float] = []
    worker = Matchmaker(settings)
    worker.pause = pauses.append

    report = worker.run(conn, deadline=time.monotonic() + 60, linger_s=30)

    assert report.completed == 6
    assert (pauses, report.lingered_s) == ([], 0)
    assert [row[0] for row in presence_rows(conn)] == [older]

    repo.release_presence(conn, older)
    alone = Matchmaker(settings)
    alone.pause = pausing(nothing)
    lingered = alone.run(conn, deadline=time.monotonic() + 60, linger_s=0.2)
    assert lingered.lingered_s > 0
    assert presence_rows(conn) == []

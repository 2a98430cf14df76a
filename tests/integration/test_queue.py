"""The matching queue (db/migrations/0002_queue.sql) through the repository wrappers.

Covers claim order, coalescing, reruns, lease recovery, token fencing, backoff and the
dead letter, fairness between events, the claim's query plans and concurrent claims.
"""

from __future__ import annotations

import random
import re
import threading
import time
from typing import Any

import pytest
from psycopg.rows import dict_row

from core.data import repository as repo
from core.data.connections import connect
from core.data.repository import Conn
from tests.conftest import profile
from tests.helpers import add_attendees, queue_rows

CLAIM_INDEX = "matchmaking_queue_claim_idx"


# --- helpers -----------------------------------------------------------------------------


def profile_id(conn: Conn, user_id: str) -> int:
    row = conn.execute("SELECT id FROM profiles WHERE user_id = %s", (user_id,)).fetchone()
    assert row is not None, user_id
    return int(row[0])


def enqueue(conn: Conn, event_id: int, user_ids: list[str], priority: int, reason: str) -> int:
    ids = [profile_id(conn, u) for u in user_ids]
    row = conn.execute(
        "SELECT mm_enqueue(%s, %s::bigint[], %s::smallint, %s)",
        (event_id, ids, priority, reason),
    ).fetchone()
    assert row is not None
    return int(row[0])


def queue_row(conn: Conn, queue_id: int) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT * FROM matchmaking_queue WHERE id = %s", (queue_id,)).fetchone()


def user_of(conn: Conn, pid: int) -> str:
    row = conn.execute("SELECT user_id FROM profiles WHERE id = %s", (pid,)).fetchone()
    assert row is not None
    return str(row[0])


def seconds_until_run(conn: Conn, queue_id: int) -> float:
    row = conn.execute(
        "SELECT extract(epoch FROM run_after - now())::float8 FROM matchmaking_queue WHERE id = %s",
        (queue_id,),
    ).fetchone()
    assert row is not None
    return float(row[0])


def make_ready(conn: Conn, queue_id: int) -> None:
    """Skip a backoff: the row becomes claimable now."""
    conn.execute("UPDATE matchmaking_queue SET run_after = now() WHERE id = %s", (queue_id,))


def queue_stats(conn: Conn, event_id: int) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute("SELECT * FROM mm_queue_stats(%s)", (event_id,)).fetchone()
    assert row is not None
    return row


def claim_function_source(conn: Conn) -> str:
    row = conn.execute("SELECT prosrc FROM pg_proc WHERE proname = 'mm_claim'").fetchone()
    assert row is not None
    return str(row[0])


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan, depth first."""
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(plan_nodes(child))
    return nodes


def explain(
    conn: Conn, statement: str, params: tuple[Any, ...] = (), *, analyze: bool = False
) -> dict[str, Any]:
    options = "ANALYZE, FORMAT JSON" if analyze else "FORMAT JSON"
    row = conn.execute(f"EXPLAIN ({options}) {statement}", params).fetchone()
    assert row is not None
    return row[0][0]["Plan"]


# --- claim order -------------------------------------------------------------------------


def test_claim_takes_highest_priority_first_then_oldest_then_lowest_id(conn):
    """Given pending rows of priorities 0-3 with different ages, when claimed one at a time,
    then they come out 3, 2, 1, 0 and, within a priority, by run_after then queue id;
    a row whose run_after is in the future is not claimed at all.

    Proves the claim honours ORDER BY priority DESC, run_after, id and the run_after gate.
    """
    users = ["p0-new", "p0-old", "p0-tie-a", "p0-tie-b", "p1", "p2", "p3", "p3-later"]
    event = add_attendees(conn, "prio-order", [profile(u) for u in users])
    conn.execute("DELETE FROM matchmaking_queue")
    # Lower priorities first so priority, not age, has to win; tie-b gets the lower
    # queue id although its profile id is higher.
    enqueue(conn, event.id, ["p0-new"], 0, "settings_changed")
    enqueue(conn, event.id, ["p0-tie-b"], 0, "settings_changed")
    enqueue(conn, event.id, ["p0-tie-a"], 0, "settings_changed")
    enqueue(conn, event.id, ["p0-old"], 0, "settings_changed")
    enqueue(conn, event.id, ["p1"], 1, "neighbour_left")
    enqueue(conn, event.id, ["p2"], 2, "profile_update")
    enqueue(conn, event.id, ["p3"], 3, "join")
    enqueue(conn, event.id, ["p3-later"], 3, "join")
    conn.execute(
        "UPDATE matchmaking_queue SET run_after = CASE profile_id"
        " WHEN %(old)s THEN timestamptz '2020-01-01 00:00Z'"
        " WHEN %(tie_a)s THEN timestamptz '2021-01-01 00:00Z'"
        " WHEN %(tie_b)s THEN timestamptz '2021-01-01 00:00Z'"
        " WHEN %(later)s THEN now() + interval '1 hour' END"
        " WHERE profile_id IN (%(old)s, %(tie_a)s, %(tie_b)s, %(later)s)",
        {
            "old": profile_id(conn, "p0-old"),
            "tie_a": profile_id(conn, "p0-tie-a"),
            "tie_b": profile_id(conn, "p0-tie-b"),
            "later": profile_id(conn, "p3-later"),
        },
    )

    order = []
    while claimed := repo.claim(conn, 1, 60):
        [row] = claimed
        assert row.attempts == 1
        order.append((user_of(conn, row.profile_id), row.priority, row.reason))

    assert order == [
        ("p3", 3, "join"),
        ("p2", 2, "profile_update"),
        ("p1", 1, "neighbour_left"),
        ("p0-old", 0, "settings_changed"),
        ("p0-tie-b", 0, "settings_changed"),
        ("p0-tie-a", 0, "settings_changed"),
        ("p0-new", 0, "settings_changed"),
    ]
    later = [r for r in queue_rows(conn, event.id) if r["user_id"] == "p3-later"]
    assert [r["status"] for r in later] == ["pending"]


# --- coalescing --------------------------------------------------------------------------


def test_enqueueing_the_same_user_twice_coalesces_into_one_row_with_the_max_priority(conn):
    """Given a pending row of (event, user), when the same pair is enqueued again at higher,
    lower and equal priorities (and twice within one call), then there is still exactly one
    live row, with the highest priority and that request's reason; a new request also
    cancels a pending backoff.

    Proves the ON CONFLICT coalescing in mm_enqueue.
    """
    event = add_attendees(conn, "coalesce", [profile("u"), profile("other")])
    conn.execute("DELETE FROM matchmaking_queue")

    assert enqueue(conn, event.id, ["u"], 1, "neighbour_left") == 1
    [first] = queue_rows(conn, event.id)
    conn.execute(
        "UPDATE matchmaking_queue SET run_after = now() + interval '1 hour' WHERE id = %s",
        (first["id"],),
    )
    assert enqueue(conn, event.id, ["u", "u"], 2, "profile_update") == 1
    assert enqueue(conn, event.id, ["u"], 0, "settings_changed") == 1
    assert enqueue(conn, event.id, ["u"], 2, "dismissal") == 1

    rows = queue_rows(conn, event.id)
    assert len(rows) == 1
    [row] = rows
    assert row["id"] == first["id"]
    assert (row["priority"], row["reason"], row["status"]) == (2, "profile_update", "pending")
    assert seconds_until_run(conn, row["id"]) <= 0

    # The join trigger's priority-3 row absorbs a lower-priority request the same way.
    add_attendees(conn, event, [profile("late")])
    enqueue(conn, event.id, ["late"], 1, "neighbour_left")
    late = [r for r in queue_rows(conn, event.id) if r["user_id"] == "late"]
    assert [(r["priority"], r["reason"]) for r in late] == [(3, "join")]


# --- reruns ------------------------------------------------------------------------------


def test_an_edit_during_processing_requeues_the_row_instead_of_losing_it(conn):
    """Given users a and b claimed by a worker, when a's interests change before the worker
    completes, then completing with the lease token puts a's row back to pending (reason
    'rerun', fresh attempts, no lease) and claimable again, while b's row is deleted.

    Proves a change arriving mid-batch is not swallowed by mm_complete.
    """
    event = add_attendees(
        conn, "rerun", [profile("a", interests=["x"]), profile("b", interests=["x"])]
    )
    claimed = repo.claim(conn, 20, 60)
    assert {user_of(conn, r.profile_id) for r in claimed} == {"a", "b"}
    token = claimed[0].lease_token

    conn.execute("UPDATE profiles SET interests = ARRAY['y'] WHERE user_id = 'a'")
    [a_running] = [r for r in queue_rows(conn, event.id) if r["user_id"] == "a"]
    assert a_running["status"] == "running"
    assert a_running["rerun_requested"] is True
    assert a_running["rerun_priority"] == 2

    assert repo.complete(conn, [r.queue_id for r in claimed], token) == 2

    rows = queue_rows(conn, event.id)
    assert [r["user_id"] for r in rows] == ["a"]
    [a_row] = rows
    assert a_row["id"] == a_running["id"]
    assert a_row["status"] == "pending"
    assert a_row["reason"] == "rerun"
    assert a_row["attempts"] == 0
    assert a_row["lease_token"] is None
    assert a_row["rerun_requested"] is False
    [again] = repo.claim(conn, 20, 60)
    assert again.queue_id == a_row["id"]
    assert again.lease_token != token


def test_a_rerun_is_queued_at_the_priority_of_the_request_that_arrived_while_running(conn):
    """Given a newcomer (priority 3 'join') claimed by a worker, when their profile is edited
    (a priority-2 request) before completion, then the rerun row has priority 2: the join
    request itself was served, only the edit is left to do.

    Proves a served newcomer does not keep jumping ahead of real newcomers.
    """
    event = add_attendees(conn, "rerun-prio", [profile("a", bio="before")])
    [claimed] = repo.claim(conn, 20, 60)
    assert claimed.priority == 3
    conn.execute("UPDATE profiles SET bio = 'after' WHERE user_id = 'a'")

    assert repo.complete(conn, [claimed.queue_id], claimed.lease_token) == 1

    [row] = queue_rows(conn, event.id)
    assert (row["status"], row["reason"], row["priority"]) == ("pending", "rerun", 2)


# --- leases ------------------------------------------------------------------------------


def test_an_expired_lease_is_recovered_keeping_attempts_and_dies_when_they_are_used_up(conn):
    """Given two claimed rows, one with a 60 s lease and one with a 0.05 s lease, when the
    short lease expires and leases are recovered, then only that row goes back to pending
    (attempts kept, lease cleared) and can be claimed again; once its attempts reach
    max_attempts (3), the next expiry makes it dead with a last_error about the lease.

    Proves mm_recover_leases brings back crashed work without retrying it forever.
    """
    event = add_attendees(conn, "lease", [profile("kept"), profile("lost")])
    [kept] = repo.claim(conn, 1, 60)
    [lost] = repo.claim(conn, 1, 0.05)
    assert user_of(conn, kept.profile_id) == "kept"
    time.sleep(0.15)

    recovered = repo.recover_leases(conn, 3)

    assert [(o.queue_id, o.status, o.attempts) for o in recovered] == [
        (lost.queue_id, "pending", 1)
    ]
    row = queue_row(conn, lost.queue_id)
    assert row is not None
    assert (row["status"], row["attempts"], row["lease_token"]) == ("pending", 1, None)
    assert "lease" in row["last_error"]
    kept_row = queue_row(conn, kept.queue_id)
    assert kept_row is not None
    assert kept_row["status"] == "running"

    [second] = repo.claim(conn, 20, 0.05)
    assert (second.queue_id, second.attempts) == (lost.queue_id, 2)
    time.sleep(0.15)
    assert [o.status for o in repo.recover_leases(conn, 3)] == ["pending"]
    [third] = repo.claim(conn, 20, 0.05)
    assert third.attempts == 3
    time.sleep(0.15)

    [outcome] = repo.recover_leases(conn, 3)

    assert (outcome.queue_id, outcome.status, outcome.attempts) == (lost.queue_id, "dead", 3)
    dead = queue_row(conn, lost.queue_id)
    assert dead is not None
    assert dead["status"] == "dead"
    assert dead["dead_at"] is not None
    assert "lease" in dead["last_error"]
    assert repo.claim(conn, 20, 60) == []
    assert queue_stats(conn, event.id)["dead"] == 1


def test_a_worker_whose_lease_was_recovered_can_neither_complete_nor_fail_the_row(conn, settings):
    """Given worker A's lease expired and was recovered and worker B claimed the row again,
    when A completes or fails the row late with its old token, then nothing happens (0 and
    []) and the row is exactly as B left it; B's completion deletes it.

    Proves the lease-token fencing of mm_complete and mm_fail.
    """
    event = add_attendees(conn, "fencing", [profile("u")])
    [a] = repo.claim(conn, 20, 0.05)
    time.sleep(0.15)
    assert len(repo.recover_leases(conn, settings.max_attempts)) == 1
    [b] = repo.claim(conn, 20, 60)
    assert b.queue_id == a.queue_id
    assert b.lease_token != a.lease_token
    before = queue_row(conn, a.queue_id)

    assert repo.complete(conn, [a.queue_id], a.lease_token) == 0
    assert repo.fail(conn, {a.queue_id: "late failure"}, a.lease_token, settings) == []

    after = queue_row(conn, a.queue_id)
    assert after == before
    assert after is not None
    assert (after["status"], after["lease_token"]) == ("running", b.lease_token)

    assert repo.complete(conn, [b.queue_id], b.lease_token) == 1
    assert queue_rows(conn, event.id) == []


# --- failures, backoff, dead letter, redrive ---------------------------------------------


def test_failures_back_off_then_die_and_redrive_brings_the_row_back_once(conn, settings):
    """Given backoff_base_s=30 / backoff_max_s=40 and max_attempts=3, when a row fails:
    then it waits 15-30 s (base, jittered) and is not claimable meanwhile; the second
    failure waits 20-40 s (capped); attempts count claims; the third failure makes it dead
    with its last error kept, counted by mm_queue_stats. mm_redrive then puts it back to
    pending with attempts 0, and a second redrive does nothing.

    Proves the retry policy and the dead-letter round trip.
    """
    backoff = settings.model_copy(update={"backoff_base_s": 30.0, "backoff_max_s": 40.0})
    event = add_attendees(conn, "backoff", [profile("u")])

    [c1] = repo.claim(conn, 20, 60)
    assert c1.attempts == 1
    [o1] = repo.fail(conn, {c1.queue_id: "boom 1"}, c1.lease_token, backoff)
    assert (o1.status, o1.attempts, o1.last_error) == ("pending", 1, "boom 1")
    assert 14.0 <= seconds_until_run(conn, c1.queue_id) <= 30.0
    assert repo.claim(conn, 20, 60) == []
    stats = queue_stats(conn, event.id)
    assert (stats["pending_p3"], stats["ready"], stats["dead"]) == (1, 0, 0)

    make_ready(conn, c1.queue_id)
    [c2] = repo.claim(conn, 20, 60)
    assert (c2.queue_id, c2.attempts) == (c1.queue_id, 2)
    [o2] = repo.fail(conn, {c2.queue_id: "boom 2"}, c2.lease_token, backoff)
    assert o2.status == "pending"
    assert 19.0 <= seconds_until_run(conn, c1.queue_id) <= 40.0

    make_ready(conn, c1.queue_id)
    [c3] = repo.claim(conn, 20, 60)
    assert c3.attempts == 3
    [o3] = repo.fail(conn, {c3.queue_id: "boom 3"}, c3.lease_token, backoff)

    assert (o3.status, o3.attempts) == ("dead", 3)
    dead = queue_row(conn, c1.queue_id)
    assert dead is not None
    assert (dead["status"], dead["last_error"], dead["lease_token"]) == ("dead", "boom 3", None)
    assert dead["dead_at"] is not None
    stats = queue_stats(conn, event.id)
    assert (stats["dead"], stats["pending_p3"], stats["running"]) == (1, 0, 0)
    make_ready(conn, c1.queue_id)
    assert repo.claim(conn, 20, 60) == []

    redriven = conn.execute("SELECT mm_redrive(%s)", (event.id,)).fetchone()
    assert redriven == (1,)

    [row] = queue_rows(conn, event.id)
    assert (row["status"], row["attempts"], row["reason"]) == ("pending", 0, "redrive")
    assert queue_stats(conn, event.id)["dead"] == 0
    assert conn.execute("SELECT mm_redrive(%s)", (event.id,)).fetchone() == (0,)
    assert len(queue_rows(conn, event.id)) == 1
    [again] = repo.claim(conn, 20, 60)
    assert (again.profile_id, again.attempts) == (row["profile_id"], 1)


def test_an_edit_during_the_last_attempt_is_not_buried_in_the_dead_letter(conn, settings):
    """Given a row on its last attempt (attempts == max_attempts), when the user edits their
    profile while it runs and the attempt then fails, then the user is still queued for
    the edit (a live pending row exists), exactly as if the edit had come a moment after
    the failure.

    Proves a new change always gets processed, whatever the timing against a failure.
    """
    event = add_attendees(conn, "dead-rerun", [profile("u", bio="old")])
    conn.execute("UPDATE matchmaking_queue SET attempts = %s", (settings.max_attempts - 1,))
    [claimed] = repo.claim(conn, 20, 60)
    assert claimed.attempts == settings.max_attempts
    conn.execute("UPDATE profiles SET bio = 'new' WHERE user_id = 'u'")

    repo.fail(conn, {claimed.queue_id: "boom"}, claimed.lease_token, settings)

    live = [r for r in queue_rows(conn, event.id) if r["status"] in ("pending", "running")]
    assert len(live) == 1


# --- fairness ----------------------------------------------------------------------------


def test_a_small_event_is_not_starved_by_a_huge_backlog(conn):
    """Given a huge event with 500 pending newcomers and a small event whose 3 newcomers were
    enqueued after them, when a worker claims batches of 20, then the small event's users
    are all claimed within the first two claims; and an event that gets work while the huge
    one is being drained is served on the very next claim.

    Proves the round-robin between events in mm_claim.
    """
    huge = add_attendees(conn, "huge", [profile(f"h{i:03d}") for i in range(500)])
    small = add_attendees(conn, "small", [profile(f"s{i}") for i in range(3)])

    first_two = [repo.claim(conn, 20, 60), repo.claim(conn, 20, 60)]

    for batch in first_two:
        assert len({r.event_id for r in batch}) == 1  # a batch is one event
    small_claimed = {r.profile_id for b in first_two for r in b if r.event_id == small.id}
    assert len(small_claimed) == 3
    assert any(r.event_id == huge.id for b in first_two for r in b)

    repo.claim(conn, 20, 60)  # the huge event again (the small one is empty)
    late = add_attendees(conn, "late", [profile("l1")])
    nxt = repo.claim(conn, 20, 60)
    assert {r.event_id for r in nxt} == {late.id}


def test_a_paused_job_is_never_claimed(conn):
    """Given two events with pending rows, one of them paused, when the queue is claimed
    until nothing is returned, then no row of the paused event was claimed, its rows are
    still pending and its job is still paused (also after more enqueues); resuming it
    makes its rows claimable.

    Proves pausing an event's job stops its processing.
    """
    active = add_attendees(conn, "active", [profile(f"a{i}") for i in range(5)])
    paused = add_attendees(conn, "paused", [profile(f"p{i}") for i in range(5)])
    conn.execute("UPDATE matchmaking_jobs SET status = 'paused' WHERE event_id = %s", (paused.id,))

    claimed = []
    while batch := repo.claim(conn, 2, 60):
        claimed.extend(batch)
    add_attendees(conn, paused, [profile("p-late")])
    claimed.extend(repo.claim(conn, 20, 60))

    assert {r.event_id for r in claimed} == {active.id}
    assert len(claimed) == 5
    assert {r["status"] for r in queue_rows(conn, paused.id)} == {"pending"}
    assert len(queue_rows(conn, paused.id)) == 6
    status = conn.execute(
        "SELECT status FROM matchmaking_jobs WHERE event_id = %s", (paused.id,)
    ).fetchone()
    assert status == ("paused",)

    conn.execute("UPDATE matchmaking_jobs SET status = 'running' WHERE event_id = %s", (paused.id,))
    resumed = repo.claim(conn, 20, 60)
    assert {r.event_id for r in resumed} == {paused.id}
    assert len(resumed) == 6


# --- query plans -------------------------------------------------------------------------


@pytest.fixture
def big_queue(conn: Conn) -> list[int]:
    """2,000 pending rows over 4 events (mixed priorities and ages), analysed."""
    events = []
    for i in range(4):
        row = conn.execute(
            "INSERT INTO events (code) VALUES (%s) RETURNING id", (f"plan-{i}",)
        ).fetchone()
        assert row is not None
        events.append(int(row[0]))
    conn.execute("INSERT INTO profiles (user_id) SELECT 'u' || g FROM generate_series(1, 500) AS g")
    conn.execute(
        "INSERT INTO matchmaking_queue (event_id, profile_id, priority, reason, run_after)"
        " SELECT e.id, p.id, (p.id %% 4)::smallint, 'join',"
        "        now() - make_interval(secs => (p.id * 7 %% 1000))"
        "   FROM unnest(%s::bigint[]) AS e(id), profiles p",
        (events,),
    )
    conn.execute("ANALYZE matchmaking_queue")
    conn.execute("ANALYZE matchmaking_jobs")
    count = conn.execute("SELECT count(*) FROM matchmaking_queue").fetchone()
    assert count == (2000,)
    return events


def inner_claim_query(conn: Conn) -> str:
    """The row-picking query of mm_claim, taken from the installed function."""
    match = re.search(
        r"(SELECT q\.id FROM matchmaking_queue q.*?SKIP LOCKED)",
        claim_function_source(conn),
        re.DOTALL,
    )
    assert match, "mm_claim no longer contains the expected row-picking query"
    return match.group(1).replace("v_event", "%s").replace("p_batch_size", "%s")


def event_scan_query(conn: Conn) -> str:
    """The event-choosing statement of mm_claim (recursive skip scan), without INTO."""
    match = re.search(r"(WITH RECURSIVE.*?LIMIT 1);", claim_function_source(conn), re.DOTALL)
    assert match, "mm_claim no longer contains the expected event skip scan"
    # p_event_id NULL: the scheduled worker's case, every event in turn
    return match.group(1).replace("INTO v_event", "").replace("p_event_id", "NULL::bigint")


def test_the_claim_query_reads_the_claim_index_in_order_without_sorting(conn, big_queue):
    """Given 2,000 pending rows over 4 events, when the claim's row-picking query (copied
    from mm_claim) is explained with a literal event and as a generic prepared plan (what
    PL/pgSQL ends up caching), then it scans matchmaking_queue_claim_idx and has no Sort.

    Proves the claim index matches the claim's WHERE and ORDER BY.
    """
    statement = inner_claim_query(conn)
    assert "ORDER BY q.priority DESC, q.run_after, q.id" in statement

    custom = plan_nodes(explain(conn, statement, (big_queue[1], 20)))
    conn.execute(
        "PREPARE claim_pick(bigint, integer) AS "
        + statement.replace("%s", "$1", 1).replace("%s", "$2", 1)
    )
    conn.execute("SET plan_cache_mode = force_generic_plan")
    generic = plan_nodes(explain(conn, f"EXECUTE claim_pick({int(big_queue[1])}, 20)"))

    for nodes in (custom, generic):
        assert any(n.get("Index Name") == CLAIM_INDEX for n in nodes), nodes
        assert not any(n["Node Type"] in ("Sort", "Incremental Sort") for n in nodes), nodes
        assert any(n["Node Type"] == "LockRows" for n in nodes)


def test_the_event_skip_scan_of_mm_claim_uses_an_index(conn, big_queue):
    """Given 2,000 pending rows over 4 events, when the recursive event-choosing statement
    of mm_claim is run under EXPLAIN ANALYZE, then both arms of the recursive CTE read
    matchmaking_queue through an index, the recursive arm runs about once per event (a
    skip scan, not a walk over every row) and matchmaking_queue is never scanned
    sequentially.

    Proves choosing the next event stays cheap however long the queue is. (ANALYZE: before
    execution PostgreSQL does not list the sub-plan of a WorkTable Scan.)
    """
    nodes = plan_nodes(explain(conn, event_scan_query(conn), analyze=True))

    [recursive] = [n for n in nodes if n["Node Type"] == "Recursive Union"]
    arms = recursive["Plans"]
    assert len(arms) == 2
    for arm in arms:
        scans = [n for n in plan_nodes(arm) if n.get("Relation Name") == "matchmaking_queue"]
        assert scans, arm
        assert all(n["Node Type"] in ("Index Scan", "Index Only Scan") for n in scans), scans
    [step] = [n for n in plan_nodes(arms[1]) if n.get("Relation Name") == "matchmaking_queue"]
    assert step["Actual Loops"] <= len(big_queue) + 1
    queue_scans = [n for n in nodes if n.get("Relation Name") == "matchmaking_queue"]
    assert not any(n["Node Type"] == "Seq Scan" for n in queue_scans), queue_scans


# --- concurrency -------------------------------------------------------------------------


def test_two_workers_claiming_at_once_get_disjoint_batches(conn, db_url, settings):
    """Given one event with 40 pending rows, when two workers (own connections, threads
    released together) claim batches of 20 at the same time, then each gets 20 rows, the
    sets are disjoint and together cover all 40, under two different tokens.

    Proves SKIP LOCKED claiming never hands a row to two workers.
    """
    event = add_attendees(conn, "concurrent", [profile(f"c{i:02d}") for i in range(40)])
    barrier = threading.Barrier(2)
    results: list[list[repo.ClaimedRow]] = [[], []]
    errors: list[BaseException] = []

    def worker(slot: int) -> None:
        try:
            with connect(db_url, settings, application_name=f"claimer-{slot}") as own:
                barrier.wait(timeout=10)
                results[slot] = repo.claim(own, 20, 60)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    assert errors == [], [repr(e) for e in errors]
    first, second = ({r.queue_id for r in batch} for batch in results)
    assert len(first) == 20
    assert len(second) == 20
    assert first.isdisjoint(second)
    all_ids = {r["id"] for r in queue_rows(conn, event.id)}
    assert first | second == all_ids
    assert {r.lease_token for r in results[0]} != {r.lease_token for r in results[1]}
    assert {r["status"] for r in queue_rows(conn, event.id)} == {"running"}


def test_an_edit_while_a_worker_commits_its_batch_neither_deadlocks_nor_is_lost(
    conn, db_url, settings
):
    """Given a worker inside its batch transaction that has bumped the event's lists_version
    (as Matchmaker.process_claimed does before completing), when the user's profile is
    edited concurrently and the worker then completes its rows, then both transactions
    succeed and the user ends up queued again.

    Proves the lock orders of mm_enqueue and of the worker's batch transaction cannot
    deadlock (a deadlock would fail the user's edit or the worker's batch).
    """
    event = add_attendees(conn, "lock-order", [profile("u", interests=["x"])])
    [claimed] = repo.claim(conn, 20, 60)
    errors: list[BaseException] = []
    editor_pid: list[int] = []

    def edit() -> None:
        try:
            with connect(db_url, settings, application_name="editor") as other:
                row = other.execute("SELECT pg_backend_pid()").fetchone()
                assert row is not None
                editor_pid.append(int(row[0]))
                other.execute("UPDATE profiles SET interests = ARRAY['y'] WHERE user_id = 'u'")
        except BaseException as exc:
            errors.append(exc)

    def editor_waits_for_a_lock() -> bool:
        state = conn.execute(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
            (editor_pid[0] if editor_pid else 0,),
        ).fetchone()
        return state == ("Lock",)

    editor = threading.Thread(target=edit)
    with connect(db_url, settings, application_name="worker") as worker:
        try:
            with worker.transaction():
                repo.lock_event(worker, event.id)
                repo.bump_lists_version(worker, event.id)
                editor.start()
                # Let the edit get as far as it can: blocked on us, or done.
                deadline = time.monotonic() + 5
                while editor.is_alive() and not editor_waits_for_a_lock():
                    assert time.monotonic() < deadline, "the edit neither finished nor blocked"
                    time.sleep(0.02)
                repo.complete(worker, [claimed.queue_id], claimed.lease_token)
        except BaseException as exc:
            errors.append(exc)
        finally:
            editor.join(timeout=30)

    assert errors == [], [repr(e) for e in errors]
    rows = queue_rows(conn, event.id)
    assert [(r["user_id"], r["status"]) for r in rows] == [("u", "pending")]


def test_concurrent_enqueues_and_completions_never_deadlock(conn, db_url, settings):
    """Four connections enqueue overlapping sets of users in random orders (as concurrent
    triggers do) while a fifth claims, fails and completes batches: every call returns,
    none is rolled back by a deadlock, and each user ends with at most one live row."""
    event = add_attendees(conn, "lock-order", [profile(f"lo{i:02d}") for i in range(60)])
    ids = [profile_id(conn, f"lo{i:02d}") for i in range(60)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def enqueuer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with connect(db_url, settings, application_name=f"enqueuer-{seed}") as own:
                while not stop.is_set():
                    chosen = rng.sample(ids, rng.randint(2, 40))
                    own.execute(
                        "SELECT mm_enqueue(%s, %s, %s::smallint, 'test')",
                        (event.id, chosen, rng.randint(0, 3)),
                    )
        except BaseException as exc:
            errors.append(exc)

    def completer() -> None:
        try:
            with connect(db_url, settings, application_name="completer") as own:
                while not stop.is_set():
                    claimed = repo.claim(own, 25, 60)
                    if not claimed:
                        continue
                    token = claimed[0].lease_token
                    half = len(claimed) // 2
                    with own.transaction():  # as the worker settles a batch
                        repo.lock_queue_rows(own, [r.queue_id for r in claimed])
                        repo.fail(own, {r.queue_id: "x" for r in claimed[:half]}, token, settings)
                        repo.complete(own, [r.queue_id for r in claimed[half:]], token)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=enqueuer, args=(i,)) for i in range(4)]
    threads.append(threading.Thread(target=completer))
    for t in threads:
        t.start()
    time.sleep(4)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert errors == [], [repr(e) for e in errors]
    live = conn.execute(
        "SELECT profile_id, count(*) FROM matchmaking_queue WHERE event_id = %s"
        " AND status IN ('pending', 'running') GROUP BY profile_id HAVING count(*) > 1",
        (event.id,),
    ).fetchall()
    assert live == []

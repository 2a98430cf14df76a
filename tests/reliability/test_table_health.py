"""Table health: 100,000 enqueue -> claim -> complete cycles through the real queue
functions (mm_enqueue / mm_claim / mm_complete, db/migrations/0002_queue.sql), with a
batch record per claimed batch and mm_recover_leases at the start of every round, as the
worker does. The queue tables must stay bounded by a constant that does not depend on how
much work went through them, and the claim must still read its index afterwards."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from core.data import repository as repo
from core.data.repository import Conn
from tests.integration.test_queue import (
    CLAIM_INDEX,
    event_scan_query,
    explain,
    inner_claim_query,
    plan_nodes,
)

pytestmark = pytest.mark.reliability

USERS = 2_000  # live queue rows at most (one per user of the event)
CLAIM = 40  # rows per claimed batch (the worker's default is 20)
CYCLES = 100_000
CHECKPOINT = 10_000  # autovacuum's job, done by hand: VACUUM every this many cycles
LEASE_S = 60.0
MAX_ATTEMPTS = 5
# "The same size", give or take: on a quiet server the size is flat to the page; with
# other sessions busy (the rest of the suite) a VACUUM may keep a few recent dead rows.
# Rows never reclaimed would instead grow the table by ~1.3 MiB per 10,000 cycles.
SLACK = 512 * 1024
# The batch log's retention (db/migrations/0006_queue_retention.sql)
KEEP = timedelta(days=7)
KEEP_MIN = 1_000
PRUNE_LIMIT = 5_000


def new_event(conn: Conn, code: str) -> int:
    row = conn.execute("INSERT INTO events (code) VALUES (%s) RETURNING id", (code,)).fetchone()
    assert row is not None
    return int(row[0])


def new_profiles(conn: Conn, count: int, prefix: str) -> list[int]:
    rows = conn.execute(
        "INSERT INTO profiles (user_id) SELECT %s || g FROM generate_series(1, %s) AS g"
        " RETURNING id",
        (prefix, count),
    ).fetchall()
    return [int(r[0]) for r in rows]


def scalar(conn: Conn, statement: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(statement, params).fetchone()
    assert row is not None
    return row[0]


def batch_ids(conn: Conn, limit: int | None = None) -> list[int]:
    """Batch record ids, newest first."""
    return [
        int(r[0])
        for r in conn.execute(
            "SELECT id FROM matchmaking_batches ORDER BY finished_at DESC, id DESC LIMIT %s",
            (limit,),
        )
    ]


def log_batches(
    conn: Conn, event_id: int, count: int, newest_age: timedelta, step: timedelta
) -> None:
    """`count` batch records, the newest `newest_age` old, one every `step` before it."""
    conn.execute(
        "INSERT INTO matchmaking_batches (event_id, worker_id, started_at, finished_at,"
        " claimed, completed, failed, lists_written)"
        " SELECT %(event)s, 'w', at - interval '1 second', at, 20, 20, 0, 20"
        "   FROM (SELECT now() - %(newest)s - g * %(step)s AS at"
        "           FROM generate_series(0, %(count)s - 1) AS g) t",
        {"event": event_id, "newest": newest_age, "step": step, "count": count},
    )


def table_figures(conn: Conn, table: str) -> tuple[int, int]:
    """(rows, pg_total_relation_size: heap, indexes and TOAST) after a VACUUM."""
    conn.execute(f"VACUUM (ANALYZE) {table}")
    rows = scalar(conn, f"SELECT count(*) FROM {table}")
    size = scalar(conn, "SELECT pg_total_relation_size(%s::regclass)", (table,))
    return int(rows), int(size)


def run_cycles(conn: Conn, event_id: int, profile_ids: list[int], cycles: int) -> int:
    """Enqueue every user, claim them in batches, complete each batch and record it, as
    many rounds as `cycles` needs. Returns the batches recorded."""
    batches = 0
    assert cycles % len(profile_ids) == 0
    for round_ in range(cycles // len(profile_ids)):
        assert repo.recover_leases(conn, MAX_ATTEMPTS) == []  # every invocation starts so
        enqueued = scalar(
            conn,
            "SELECT mm_enqueue(%s, %s::bigint[], %s::smallint, 'load')",
            (event_id, profile_ids, round_ % 4),
        )
        assert enqueued == len(profile_ids)
        done = 0
        while True:
            claimed = conn.execute(
                "SELECT queue_id, lease_token FROM mm_claim(%s, %s)", (CLAIM, LEASE_S)
            ).fetchall()
            if not claimed:
                break
            started = datetime.now(UTC)
            [token] = {row[1] for row in claimed}
            ids = [row[0] for row in claimed]
            completed = scalar(conn, "SELECT mm_complete(%s::bigint[], %s)", (ids, token))
            assert completed == len(ids)
            repo.finish_batch(
                conn,
                event_id=event_id,
                worker_id="table-health",
                started_at=started,
                claimed=len(ids),
                completed=completed,
                failed=0,
                dead=0,
                lists_written=0,
                error=None,
            )
            done += completed
            batches += 1
        assert done == len(profile_ids)
    return batches


def assert_claim_reads_its_index(conn: Conn, event_id: int) -> None:
    """The claim's row-picking query (copied from mm_claim), custom and generic plans:
    the claim index, no Sort; the event skip scan never scans the queue sequentially."""
    statement = inner_claim_query(conn)
    custom = plan_nodes(explain(conn, statement, (event_id, CLAIM)))
    name = f"claim_{uuid.uuid4().hex[:8]}"
    conn.execute(
        f"PREPARE {name}(bigint, integer) AS "
        + statement.replace("%s", "$1", 1).replace("%s", "$2", 1)
    )
    conn.execute("SET plan_cache_mode = force_generic_plan")
    try:
        generic = plan_nodes(explain(conn, f"EXECUTE {name}({int(event_id)}, {CLAIM})"))
    finally:
        conn.execute("RESET plan_cache_mode")
        conn.execute(f"DEALLOCATE {name}")
    for nodes in (custom, generic):
        assert any(n.get("Index Name") == CLAIM_INDEX for n in nodes), nodes
        assert not any(n["Node Type"] in ("Sort", "Incremental Sort") for n in nodes), nodes
    scan = plan_nodes(explain(conn, event_scan_query(conn), analyze=True))
    queue_scans = [n for n in scan if n.get("Relation Name") == "matchmaking_queue"]
    assert queue_scans
    assert not any(n["Node Type"] == "Seq Scan" for n in queue_scans), queue_scans


def test_100k_queue_cycles_leave_the_queue_tables_bounded(conn: Conn) -> None:
    """Given one event of 2,000 users, when 100,000 enqueue -> claim -> complete cycles
    run (50 rounds: mm_recover_leases, enqueue everyone, claim 40 at a time, complete,
    record the batch, as the worker does; a VACUUM every 10,000 cycles, as autovacuum
    would), then:
    - matchmaking_queue is empty after every 10,000 and, after VACUUM, no larger over
      the last 50,000 cycles than it got over the first 50,000 (finished rows are deleted,
      their space reused; B-tree pages freed by one VACUUM are recycled only after a later
      one, so the size settles after 20,000 to 40,000 cycles: measured 2.0-2.7 MB at
      20,000, then flat at 2.7 MB; a leak grows through the second half and fails);
    - matchmaking_jobs holds one row for the event, with the right counters;
    - matchmaking_batches, one record per batch, is cut to the newest KEEP_MIN by the
      next invocation once those batches are spread over a month (older than KEEP);
    - the claim still reads its index in order (no Sort), the event scan no Seq Scan."""
    started = time.monotonic()
    event_id = new_event(conn, "table-health")
    users = new_profiles(conn, USERS, "th-")

    batches = 0
    sizes: list[int] = []  # matchmaking_queue after each CHECKPOINT cycles and a VACUUM
    for _ in range(0, CYCLES, CHECKPOINT):
        batches += run_cycles(conn, event_id, users, CHECKPOINT)
        rows, size = table_figures(conn, "matchmaking_queue")
        assert rows == 0
        sizes.append(size)
    cycling_s = time.monotonic() - started

    assert batches == CYCLES // CLAIM
    half = len(sizes) // 2
    assert max(sizes[half:]) <= max(sizes[:half]) + SLACK, sizes
    # One job row per event, however many batches it ran.
    assert scalar(conn, "SELECT count(*) FROM matchmaking_jobs") == 1
    job = repo.job_status(conn, event_id)["job"]
    assert (job["processed_count"], job["batches"]) == (CYCLES, batches)

    # The batch log: one record per batch while they are recent...
    log_recent = table_figures(conn, "matchmaking_batches")
    assert log_recent[0] == batches > KEEP_MIN
    # ...spread over the last 30 days (oldest first), the next invocation keeps the
    # newest KEEP_MIN (fewer than KEEP_MIN fall within KEEP).
    conn.execute(
        "UPDATE matchmaking_batches b SET finished_at = now() - r.n * %(step)s,"
        " started_at = now() - r.n * %(step)s - interval '1 second'"
        " FROM (SELECT id, row_number() OVER (ORDER BY id DESC) - 1 AS n"
        "         FROM matchmaking_batches) r WHERE r.id = b.id",
        {"step": timedelta(days=30) / batches},
    )
    within = scalar(
        conn, "SELECT count(*) FROM matchmaking_batches WHERE finished_at >= now() - %s", (KEEP,)
    )
    assert within < KEEP_MIN
    newest = batch_ids(conn, KEEP_MIN)
    assert repo.recover_leases(conn, MAX_ATTEMPTS) == []
    assert batch_ids(conn) == newest
    log_pruned = table_figures(conn, "matchmaking_batches")
    assert log_pruned[0] == KEEP_MIN

    # After all that churn the claim still reads its index, in order.
    assert scalar(
        conn, "SELECT mm_enqueue(%s, %s::bigint[], 3::smallint, 'join')", (event_id, users)
    ) == len(users)
    conn.execute("ANALYZE matchmaking_queue")
    assert_claim_reads_its_index(conn, event_id)
    claimed = conn.execute("SELECT queue_id FROM mm_claim(%s, %s)", (CLAIM, LEASE_S)).fetchall()
    assert len(claimed) == CLAIM

    print(
        f"\n[table health] {CYCLES} cycles in {batches} batches, {cycling_s:.1f} s;"
        " matchmaking_queue after VACUUM every 10,000 cycles (KiB):"
        f" {[size // 1024 for size in sizes]};"
        f" matchmaking_batches: {log_recent[0]} rows after {CYCLES} cycles, {log_pruned[0]}"
        " once spread over 30 days and pruned"
    )


def test_the_batch_log_keeps_a_week_or_at_least_the_newest_records(conn: Conn) -> None:
    """Given 6,000 batch records, one every 7.2 minutes over the last 30 days, when a
    worker invocation starts (mm_recover_leases), then exactly the records of the last 7
    days remain (1,400: more than KEEP_MIN) and a second invocation deletes nothing; when
    the service then stays idle for two months, the next invocation keeps the newest
    KEEP_MIN and no more."""
    event_id = new_event(conn, "busy-event")
    step = timedelta(minutes=7.2)
    log_batches(conn, event_id, 6_000, newest_age=step / 2, step=step)  # off the boundary
    within = scalar(
        conn, "SELECT count(*) FROM matchmaking_batches WHERE finished_at >= now() - %s", (KEEP,)
    )
    assert within == KEEP / step
    expected = batch_ids(conn, int(within))

    assert repo.recover_leases(conn, MAX_ATTEMPTS) == []
    assert batch_ids(conn) == expected
    assert repo.recover_leases(conn, MAX_ATTEMPTS) == []
    assert batch_ids(conn) == expected

    conn.execute(
        "UPDATE matchmaking_batches SET started_at = started_at - interval '60 days',"
        " finished_at = finished_at - interval '60 days'"
    )
    assert repo.recover_leases(conn, MAX_ATTEMPTS) == []
    assert batch_ids(conn) == expected[:KEEP_MIN]


def test_pruning_does_bounded_work_per_invocation(conn: Conn) -> None:
    """Given 12,000 batch records all older than the retention (a log that was never
    pruned), when invocations start one after another, then each deletes at most
    PRUNE_LIMIT records, the oldest first, until only the newest KEEP_MIN remain."""
    event_id = new_event(conn, "backlog-event")
    total = 12_000
    log_batches(conn, event_id, total, newest_age=timedelta(days=30), step=timedelta(seconds=1))
    newest = batch_ids(conn, KEEP_MIN)
    left = [total]
    while left[-1] > KEEP_MIN and len(left) < 10:
        oldest_before = scalar(conn, "SELECT min(finished_at) FROM matchmaking_batches")
        assert repo.recover_leases(conn, MAX_ATTEMPTS) == []
        left.append(scalar(conn, "SELECT count(*) FROM matchmaking_batches"))
        assert scalar(conn, "SELECT min(finished_at) FROM matchmaking_batches") > oldest_before
    assert left == [total, total - PRUNE_LIMIT, total - 2 * PRUNE_LIMIT, KEEP_MIN]
    assert batch_ids(conn) == newest


def test_a_user_that_dies_again_and_again_keeps_one_dead_row(conn: Conn) -> None:
    """Given a user whose processing always fails, when they are queued again after
    dying (an edit, a rematch) and die again, 20 times over, by failure (mm_fail) and by
    lease expiry (mm_recover_leases) in turn, then the queue holds one dead row for them
    (the latest, with its error), mm_queue_stats counts one dead user, and mm_redrive
    puts them back once."""
    event_id = new_event(conn, "dies-again")
    [user] = new_profiles(conn, 1, "again-")
    [bystander] = new_profiles(conn, 1, "bystander-")
    for death in range(20):
        enqueued = scalar(
            conn,
            "SELECT mm_enqueue(%s, %s::bigint[], 2::smallint, 'profile_update')",
            (event_id, [user, bystander] if death == 0 else [user]),
        )
        assert enqueued == (2 if death == 0 else 1)
        for _attempt in range(MAX_ATTEMPTS):
            claimed = conn.execute(
                "SELECT queue_id, profile_id, lease_token FROM mm_claim(10, %s)", (LEASE_S,)
            ).fetchall()
            mine = [row for row in claimed if row[1] == user]
            assert len(mine) == 1
            queue_id, _, token = mine[0]
            if death % 2:  # the worker vanished: the lease expires
                conn.execute(
                    "UPDATE matchmaking_queue SET lease_expires_at = now() - interval '1 second'"
                    " WHERE id = %s",
                    (queue_id,),
                )
                outcomes = repo.recover_leases(conn, MAX_ATTEMPTS)
            else:
                outcomes = conn.execute(
                    "SELECT * FROM mm_fail(%s::bigint[], %s::text[], %s, %s, 0, 0)",
                    ([queue_id], [f"death {death}"], token, MAX_ATTEMPTS),
                ).fetchall()
            assert len(outcomes) == 1
            for row in claimed:
                if row[1] != user:  # the bystander is done at its first claim
                    conn.execute("SELECT mm_complete(%s::bigint[], %s)", ([row[0]], row[2]))
        rows = conn.execute(
            "SELECT status, attempts, last_error FROM matchmaking_queue WHERE profile_id = %s",
            (user,),
        ).fetchall()
        assert len(rows) == 1, (death, rows)
        status, attempts, error = rows[0]
        assert (status, attempts) == ("dead", MAX_ATTEMPTS)
        if death % 2:
            assert error.startswith("lease expired"), error
        else:
            assert error == f"death {death}"
    assert scalar(conn, "SELECT count(*) FROM matchmaking_queue") == 1
    assert scalar(conn, "SELECT dead FROM mm_queue_stats(%s)", (event_id,)) == 1
    assert scalar(conn, "SELECT mm_redrive(%s, %s::bigint[])", (event_id, [user])) == 1
    assert conn.execute("SELECT status, attempts FROM matchmaking_queue").fetchall() == [
        ("pending", 0)
    ]

"""Crash: `matchmaker run` is SIGKILLed in the middle of its batches again and again; the
rows it held are recovered after their lease, every claim is counted as an attempt, and a
final worker matches everyone exactly."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

from core.data.repository import Conn
from core.embedding.selection import embedder_for_event
from core.queue.worker import Matchmaker, run_worker
from core.settings import Settings
from tests.helpers import add_attendees, assert_completed_once_and_exact
from tooling.synthetic import generate_profiles

pytestmark = pytest.mark.reliability

EVENT = "crash-ev"
ATTENDEES = 5000
MID_BATCH_KILLS = 10
MAX_TRIES = 30  # worker starts allowed to reach MID_BATCH_KILLS kills that orphaned rows
LEASE_S = 3
STATEMENT_TIMEOUT_MS = 2000
MAX_ATTEMPTS = 50
KILL_DELAY_MAX_S = 0.6  # kill this long at most after the worker claimed a batch
CLI_APP = "matchmaker-cli"  # application_name of `matchmaker run`'s connection


def _running(conn: Conn, event_id: int) -> list[tuple[int, int, uuid.UUID]]:
    """(queue id, attempts, lease token) of the event's running rows."""
    return [
        (int(qid), int(attempts), token)
        for qid, attempts, token in conn.execute(
            "SELECT id, attempts, lease_token FROM matchmaking_queue"
            " WHERE event_id = %s AND status = 'running' ORDER BY id",
            (event_id,),
        )
    ]


def _claimable(conn: Conn, event_id: int) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM matchmaking_queue WHERE event_id = %s AND ("
        " status = 'pending' AND run_after <= now()"
        " OR status = 'running' AND lease_expires_at < now())",
        (event_id,),
    ).fetchone()
    return row is not None and row[0] > 0


def _queued(conn: Conn, event_id: int) -> int:
    row = conn.execute(
        "SELECT count(*) FROM matchmaking_queue WHERE event_id = %s", (event_id,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def _wait_for_new_lease(
    conn: Conn,
    event_id: int,
    proc: subprocess.Popen[bytes],
    seen_tokens: set[uuid.UUID],
    timeout_s: float = 60.0,
) -> bool:
    """Until the worker holds running rows under a lease token not seen before (True) or
    has exited (False)."""
    deadline = time.monotonic() + timeout_s
    while not any(token not in seen_tokens for _, _, token in _running(conn, event_id)):
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the worker claimed nothing"
        time.sleep(0.01)
    return True


def _wait_for_commit(
    conn: Conn, event_id: int, proc: subprocess.Popen[bytes], queued_before: int
) -> None:
    """Until the worker committed a batch (its completed rows are deleted) or exited."""
    deadline = time.monotonic() + 60
    while proc.poll() is None and _queued(conn, event_id) >= queued_before:
        assert time.monotonic() < deadline, "the worker committed no batch"
        time.sleep(0.01)


def _wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_sigkilled_workers_lose_nothing_and_every_killed_lease_counts_an_attempt(
    conn: Conn, db_url: str, tmp_path: Path
) -> None:
    """Given a 5,000-attendee event and a 3 s lease, when `matchmaker run` is started and
    SIGKILLed a random 0-600 ms after it claims a batch (every fourth one 0-250 ms after
    its next claim once it has committed a batch), until 10 kills left claimed rows
    behind, then: every killed worker died of the SIGKILL without a traceback (one that
    ran out of work exits 0 with nothing failed); at every kill each running row's
    attempts equal the number of distinct leases it has had (all of them killed); after
    the leases expire every remaining row's attempts equal its killed leases, none is dead,
    and some users were matched between kills; a final worker recovers exactly the rows
    still running, fails and buries nothing and drains the queue; every attendee is
    completed exactly once across all committed batches, and every list equals the
    brute-force top-k.

    Proves invariant 4 (nothing lost) under crashes: attempts are counted at claim time,
    expired leases are recovered, and a killed batch leaves no partial state behind.
    """
    t_start = time.perf_counter()
    rng = random.Random(4242)
    event = add_attendees(conn, EVENT, generate_profiles(ATTENDEES, seed=3, id_prefix="cr-"))
    settings = Settings(
        database_url=db_url,
        batch_size=20,
        lease_seconds=LEASE_S,
        statement_timeout_ms=STATEMENT_TIMEOUT_MS,
        max_attempts=MAX_ATTEMPTS,
        backoff_base_s=0.0,
        backoff_max_s=0.0,
    )
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "BATCH_SIZE": "20",
        "LEASE_SECONDS": str(LEASE_S),
        "STATEMENT_TIMEOUT_MS": str(STATEMENT_TIMEOUT_MS),
        "MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "BACKOFF_BASE_S": "0",
        "BACKOFF_MAX_S": "0",
    }

    def cli_sessions() -> int:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = %s",
            (CLI_APP,),
        ).fetchone()
        assert row is not None
        return int(row[0])

    leases_of: defaultdict[int, set[uuid.UUID]] = defaultdict(set)  # killed leases per row
    seen_tokens: set[uuid.UUID] = set()
    starts = kills = mid_batch_kills = finished_alone = 0
    while mid_batch_kills < MID_BATCH_KILLS:
        assert starts < MAX_TRIES, f"only {mid_batch_kills} kills hit a batch in {starts} tries"
        # Start a worker only when it will find work: ready rows, or expired leases (a
        # worker recovers those first). Bulk claims may hold the whole backlog.
        _wait_until(lambda: _claimable(conn, event.id), LEASE_S + 10, "claimable rows")
        queued_before = _queued(conn, event.id)
        # Some workers are let commit a batch first: kills then also land on a worker
        # with warm state, and progress between kills mixes with recovered rows.
        after_commit = starts % 4 == 3
        log = tmp_path / f"worker-{starts}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tooling.cli", "run", "--quiet"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
            )
        starts += 1
        try:
            if _wait_for_new_lease(conn, event.id, proc, seen_tokens) and after_commit:
                _wait_for_commit(conn, event.id, proc, queued_before)
                _wait_for_new_lease(conn, event.id, proc, seen_tokens)
                time.sleep(rng.uniform(0.0, 0.25))
            else:
                time.sleep(rng.uniform(0.0, KILL_DELAY_MAX_S))
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            returncode = proc.wait(timeout=30)
        output = log.read_text()
        if returncode == 0:
            # It ran out of claimable work before the kill: a clean, complete run.
            assert "0 failed, 0 dead" in output, output
            finished_alone += 1
            continue
        assert returncode == -signal.SIGKILL, (returncode, output)
        assert "Traceback" not in output, output
        kills += 1
        # Its backend has gone (any transaction in flight is rolled back or committed).
        _wait_until(lambda: cli_sessions() == 0, 30, "the killed worker's session to end")

        running = _running(conn, event.id)
        tokens_now = {token for _, _, token in running}
        if tokens_now - seen_tokens:
            mid_batch_kills += 1
        seen_tokens |= tokens_now
        for qid, attempts, token in running:
            leases_of[qid].add(token)
            # Every claim of this row so far ended in a kill: each one is an attempt.
            assert attempts == len(leases_of[qid]), (qid, attempts, leases_of[qid])
    kill_phase_s = time.perf_counter() - t_start

    # The killed workers' leases run out; nothing is dead, every kill is one attempt.
    def leases_expired() -> bool:
        row = conn.execute(
            "SELECT count(*) FROM matchmaking_queue"
            " WHERE status = 'running' AND lease_expires_at >= now()"
        ).fetchone()
        return row == (0,)

    _wait_until(leases_expired, LEASE_S + 10, "the killed leases to expire")
    rows = conn.execute(
        "SELECT id, status, attempts FROM matchmaking_queue WHERE event_id = %s", (event.id,)
    ).fetchall()
    assert {status for _, status, _ in rows} <= {"pending", "running"}
    for qid, _, attempts in rows:
        assert attempts == len(leases_of.get(qid, ())), (qid, attempts)
    orphaned = sum(1 for _, status, _ in rows if status == "running")
    lost_claims = sum(len(tokens) for tokens in leases_of.values())
    assert len(seen_tokens) >= MID_BATCH_KILLS
    # Workers let commit a batch made progress between kills.
    assert len(rows) < ATTENDEES

    final = run_worker(
        conn,
        settings,
        deadline=time.monotonic() + 300,
        matchmaker=Matchmaker(settings, worker_id="crash-final"),
    )
    assert final.recovered == orphaned
    assert (final.failed, final.dead, final.stopped) == (0, [], "drained")
    assert final.completed == len(rows)

    leftover = conn.execute(
        "SELECT status, count(*) FROM matchmaking_queue WHERE event_id = %s GROUP BY status",
        (event.id,),
    ).fetchall()
    assert leftover == []
    # Each attendee completed exactly once, in batches that committed whole.
    assert_completed_once_and_exact(conn, event, embedder_for_event(event, settings).key, ATTENDEES)

    max_attempts = max((len(t) for t in leases_of.values()), default=0)
    print(
        f"\n[crash] {starts} worker starts, {kills} SIGKILLs ({mid_batch_kills} mid-batch), "
        f"{finished_alone} finished alone, in {kill_phase_s:.1f}s; {len(seen_tokens)} killed "
        f"leases = {lost_claims} lost row claims on {len(leases_of)} rows (max {max_attempts} "
        f"attempts on one row); {ATTENDEES - len(rows)} users matched between kills; final "
        f"worker recovered {final.recovered} rows and matched {final.completed} in "
        f"{final.elapsed_s:.1f}s; wall {time.perf_counter() - t_start:.1f}s"
    )

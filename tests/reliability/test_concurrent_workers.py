"""Concurrency: four worker processes drain one 5,000-attendee event while attendees keep
joining, editing their profiles, leaving and dismissing suggestions.

Each worker is its own OS process with its own connection (as concurrent Lambda
invocations would be), all claiming from the same event. The test process plays the API:
every edit is one transaction, exactly as core.api.service applies it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from core.data import repository as repo
from core.data.repository import Conn
from core.embedding.selection import embedder_for_event
from core.models import Profile
from core.queue.worker import Matchmaker, run_worker
from core.settings import Settings
from tests.helpers import add_attendees
from tooling.oracle import verify_event
from tooling.synthetic import generate_profiles

pytestmark = pytest.mark.reliability

# (attendees, exposure_correction): under hubness every apply after another worker's
# write derives every list by s' afresh, so that run uses a smaller event, equally strict.
SIZES = [(5000, "none"), (1000, "hubness")]
JOIN_POOL = 400  # generated up front, join during the run
DONORS = 400  # profiles whose matching fields edits copy
WORKERS = 4
EDIT_SECONDS = 30.0
WORKER_EXIT_TIMEOUT_S = 120.0

# One worker process: invocation after invocation (a warm container), sleeping briefly
# when the queue is empty, until the stop file exists and a run then finds nothing to do.
WORKER_SCRIPT = r"""
import json, sys, time
from pathlib import Path
from core.data.connections import connect
from core.settings import Settings
from core.queue.worker import Matchmaker, run_worker

stop, name = Path(sys.argv[1]), sys.argv[2]
settings = Settings()
matchmaker = Matchmaker(settings, worker_id=name)
totals = {"runs": 0, "batches": 0, "claimed": 0, "completed": 0, "failed": 0, "dead": 0,
          "lists_written": 0, "recovered": 0}
with connect(settings.database_url.get_secret_value(), settings, application_name=name) as conn:
    while True:
        stopping = stop.exists()
        report = run_worker(conn, settings, deadline=time.monotonic() + 600,
                            matchmaker=matchmaker)
        totals["runs"] += 1
        for key in ("batches", "claimed", "completed", "failed", "lists_written", "recovered"):
            totals[key] += getattr(report, key)
        totals["dead"] += len(report.dead)
        if report.claimed == 0:
            if stopping:
                break
            time.sleep(0.05)
print("TOTALS " + json.dumps(totals), flush=True)
"""


def _edited(profile: Profile, donor: Profile, rng: random.Random) -> Profile:
    """The profile with matching-relevant fields taken from a donor (always a real change)."""
    fields = rng.sample(["interests", "seeking", "offering", "bio", "title"], k=2)
    update: dict[str, Any] = {name: getattr(donor, name) for name in fields}
    # A tag of its own guarantees the content changes even if the donor's fields are equal.
    update["interests"] = [*update.get("interests", profile.interests)[:49], f"edit {rng.random()}"]
    return profile.model_copy(update=update)


def _db_now(conn: Conn) -> datetime:
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


@pytest.mark.parametrize(("attendees", "correction"), SIZES)
def test_four_worker_processes_drain_a_5000_event_under_live_edits(
    conn: Conn, db_url: str, settings: Settings, tmp_path: Path, attendees: int, correction: str
) -> None:
    """Given a 5,000-attendee event and 4 worker processes draining it, when the test
    process applies joins, profile edits, leaves and dismissals for 30 s meanwhile, then,
    once edits stop and the workers drain the queue: every worker exits 0 without a
    traceback or a failed batch, all 4 committed batches (some during the edits), the queue
    is empty (nothing pending, running or dead), every active attendee's list is the exact
    brute-force top-k, no list belongs to or names a leaver, and re-matching the whole event
    from cold caches writes zero lists.

    Proves invariants 1 (eventual exactness), 3 (stability) and 4 (nothing lost) hold with
    concurrent workers and writers: lock ordering, SKIP LOCKED claiming, reruns of rows
    edited while running and departures racing with batches.
    """
    t_start = time.perf_counter()
    rng = random.Random(20260501)
    everyone = generate_profiles(attendees + JOIN_POOL + DONORS, seed=7, id_prefix="cw-")
    initial = everyone[:attendees]
    pool = everyone[attendees : attendees + JOIN_POOL]
    donors = everyone[attendees + JOIN_POOL :]
    event = add_attendees(conn, f"conc-{attendees}", initial, exposure_correction=correction)
    repo.analyze_matching_tables(conn)

    current: dict[str, Profile] = {p.user_id: p for p in initial}  # latest stored profile
    active: set[str] = set(current)
    left: set[str] = set()

    stop = tmp_path / "stop"
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "BATCH_SIZE": "20",
        "LOG_LEVEL": "INFO",
        "POWERTOOLS_TRACE_DISABLED": "true",
    }
    workers: list[tuple[str, subprocess.Popen[bytes], Path, Path]] = []
    for i in range(WORKERS):
        name = f"cw-worker-{i}"
        out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with out.open("wb") as out_f, err.open("wb") as err_f:
            proc = subprocess.Popen(
                [sys.executable, "-c", WORKER_SCRIPT, str(stop), name],
                env=env,
                stdout=out_f,
                stderr=err_f,
                cwd=tmp_path,
            )
        workers.append((name, proc, out, err))

    applied: Counter[str] = Counter()
    history: defaultdict[str, list[str]] = defaultdict(list)  # what the test did to whom
    edit_errors: list[str] = []
    try:
        edits_started_at = _db_now(conn)
        t_edits = time.perf_counter()
        while time.perf_counter() - t_edits < EDIT_SECONDS:
            roll = rng.random()
            try:
                if roll < 0.25 and (pool or left):
                    # join: a newcomer, or a leaver coming back
                    if pool and (not left or rng.random() < 0.7):
                        newcomer = pool.pop()
                        current[newcomer.user_id] = newcomer
                        kind = "join"
                    else:
                        newcomer = current[rng.choice(sorted(left))]
                        kind = "rejoin"
                    with conn.transaction():
                        outcome = repo.upsert_attendee(conn, event.id, newcomer)
                    assert outcome == "joined", (newcomer.user_id, outcome)
                    active.add(newcomer.user_id)
                    left.discard(newcomer.user_id)
                    history[newcomer.user_id].append(kind)
                    applied[kind] += 1
                elif roll < 0.70:
                    user = rng.choice(sorted(active))
                    edited = _edited(current[user], rng.choice(donors), rng)
                    with conn.transaction():
                        outcome = repo.upsert_attendee(conn, event.id, edited)
                    assert outcome == "updated", (user, outcome)
                    current[user] = edited
                    history[user].append("edit")
                    applied["edit"] += 1
                elif roll < 0.93:
                    user = rng.choice(sorted(active))
                    with conn.transaction():
                        assert repo.leave_event(conn, event.id, user)
                    active.discard(user)
                    left.add(user)
                    history[user].append("leave")
                    applied["leave"] += 1
                else:
                    # dismiss a current suggestion when there is one, else anyone
                    user = rng.choice(sorted(active))
                    matches = repo.attendee_matches(conn, event.id, user) or []
                    others = [m["user_id"] for m in matches if m["user_id"] in active]
                    other = others[0] if others else rng.choice(sorted(active - {user}))
                    with conn.transaction():
                        assert repo.both_attend(conn, event.id, user, other)
                        repo.dismiss(conn, event.id, user, other)
                    history[user].append(f"dismissed {other}")
                    history[other].append(f"dismissed by {user}")
                    applied["dismiss"] += 1
            except psycopg.Error as exc:  # a writer must never see a deadlock either
                edit_errors.append(f"{type(exc).__name__}: {exc}")
            time.sleep(rng.uniform(0.0, 0.02))
        edits_ended_at = _db_now(conn)
        edit_s = time.perf_counter() - t_edits
    finally:
        stop.touch()
        deadline = time.monotonic() + WORKER_EXIT_TIMEOUT_S
        for _, proc, _, _ in workers:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    t_drained = time.perf_counter()

    # Every worker exited 0, said nothing alarming, and never failed a batch.
    totals: dict[str, dict[str, int]] = {}
    for name, proc, out, err in workers:
        stdout, stderr = out.read_text(), err.read_text()
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{stderr[-4000:]}"
        for stream in (stdout, stderr):
            assert "Traceback" not in stream, f"{name}:\n{stream[-4000:]}"
            assert '"level":"ERROR"' not in stream, f"{name}:\n{stream[-4000:]}"
        lines = [ln for ln in stdout.splitlines() if ln.startswith("TOTALS ")]
        assert len(lines) == 1, stdout[-2000:]
        totals[name] = json.loads(lines[0].removeprefix("TOTALS "))
    assert edit_errors == []
    assert all(t["failed"] == 0 and t["dead"] == 0 for t in totals.values()), totals

    # All four really worked on the event, and they were working while the edits ran.
    batch_rows = conn.execute(
        "SELECT worker_id, finished_at FROM matchmaking_batches WHERE event_id = %s",
        (event.id,),
    ).fetchall()
    assert {w for w, _ in batch_rows} == {name for name, _, _, _ in workers}
    during = {w for w, finished in batch_rows if edits_started_at <= finished <= edits_ended_at}
    assert len(during) >= 2, during
    assert sum(t["batches"] for t in totals.values()) == len(batch_rows)

    # The queue is drained: nothing pending, running or dead.
    leftover = conn.execute(
        "SELECT status, count(*) FROM matchmaking_queue WHERE event_id = %s GROUP BY status",
        (event.id,),
    ).fetchall()
    assert leftover == []

    # Membership is what the test applied; every list is exact; leavers are nowhere.
    stored_active = {
        row[0]
        for row in conn.execute(
            "SELECT p.user_id FROM attendees a JOIN profiles p ON p.id = a.profile_id"
            " WHERE a.event_id = %s AND a.active",
            (event.id,),
        )
    }
    assert stored_active == active
    embedder_key = embedder_for_event(event, settings).key
    report = verify_event(conn, event, embedder_key)
    assert report.ok, (
        f"{len(report.mismatches)} lists differ",
        [
            (
                m.user_id,
                history.get(m.user_id, []),
                {u: history.get(u, []) for u, _ in m.expected + m.stored},
            )
            for m in report.mismatches[:3]
        ],
        report.mismatches[:3],
        report.missing_vectors[:3],
        report.stale_vectors[:3],
        report.asymmetric_pairs[:3],
    )
    assert report.checked == len(active)
    ghost_rows = conn.execute(
        "SELECT count(*) FROM user_matches m WHERE m.event_id = %(e)s AND ("
        " NOT EXISTS (SELECT 1 FROM attendees a WHERE a.event_id = m.event_id"
        "   AND a.profile_id = m.profile_id AND a.active)"
        " OR NOT EXISTS (SELECT 1 FROM attendees a WHERE a.event_id = m.event_id"
        "   AND a.profile_id = m.matched_profile_id AND a.active))",
        {"e": event.id},
    ).fetchone()
    assert ghost_rows == (0,)

    # Stability: re-matching everyone from cold caches changes no list.
    queued = repo.enqueue_for_matching(
        conn, event.id, user_ids=None, only_unmatched=False, priority=0, reason="rematch"
    )
    assert queued == len(active)
    t_rerun = time.perf_counter()
    rerun = run_worker(
        conn,
        settings,
        deadline=time.monotonic() + 300,
        batch_size=250,
        matchmaker=Matchmaker(settings, worker_id="cw-rerun"),
    )
    rerun_s = time.perf_counter() - t_rerun
    assert (rerun.completed, rerun.failed, len(rerun.dead)) == (len(active), 0, 0)
    assert rerun.lists_written == 0
    assert repo.live_queue_depth(conn) == 0

    total_s = time.perf_counter() - t_start
    print(
        f"\n[concurrency] edits applied: {sum(applied.values())} {dict(applied)} in "
        f"{edit_s:.1f}s; workers: "
        + ", ".join(
            f"{n} {t['batches']} batches/{t['completed']} users/{t['lists_written']} lists"
            for n, t in totals.items()
        )
        + f"; active {len(active)}, left {len(left)}; drained {t_drained - t_edits:.1f}s "
        f"after edits began; cold re-run {rerun_s:.1f}s wrote 0 lists; wall {total_s:.1f}s"
    )

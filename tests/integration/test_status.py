"""An event's status (core.api.status), the same in the admin API and `matchmaker status`:
each job state reached for real, current counts apart from lifetime totals, the event's
own dead count next to the shared dead-letter queue, coverage and exposure against an
independent computation from the lists, the embedder configured vs effective, and the
CLI (`status`, `status --watch`, `run` and its exit status)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from pydantic import SecretStr

import core.aws
import core.settings
import handlers.api
import tooling.cli
from core.api.schemas import StatusOut
from core.api.status import event_status
from core.data import repository as repo
from core.data.repository import Conn
from core.embedding.local import LocalEmbedder
from core.embedding.openai_provider import OpenAIEmbedder
from core.embedding.selection import effective_embedder, embedder_for_event
from core.models import EventIn, EventRecord, EventSettings, Profile
from core.queue.worker import Matchmaker, WorkerReport
from core.settings import Settings
from tests.helpers import PoisonEmbedder, add_attendees
from tests.integration.api_support import CODE, request
from tooling.local_runs import import_profiles
from tooling.synthetic import generate_profiles

pytestmark = pytest.mark.filterwarnings("ignore:No application metrics to publish:UserWarning")

VOLATILE = ("oldest_pending_age_s",)  # grows between two reads


def status_of(conn: Conn, event: EventRecord, settings: Settings, depth: int | None = None) -> Any:
    return event_status(conn, event, settings, lambda: depth)


def drain(conn: Conn, worker: Matchmaker) -> WorkerReport:
    return worker.run(conn, deadline=time.monotonic() + 60)


def poisoned(settings: Settings, users: set[str], **changes: Any) -> Matchmaker:
    """A worker whose embedding provider rejects `users`, with changed settings."""
    changed = settings.model_copy(update=changes)
    return Matchmaker(changed, embedder_for=lambda _event: PoisonEmbedder(users))


def user_ids_of(conn: Conn, event: EventRecord) -> list[str]:
    return [entry["user_id"] for entry in repo.export_lists(conn, event.id)]


def batch_sums(conn: Conn, event: EventRecord) -> tuple[int, int]:
    row = conn.execute(
        "SELECT coalesce(sum(completed), 0), coalesce(sum(failed), 0) FROM matchmaking_batches"
        " WHERE event_id = %s",
        (event.id,),
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def without_volatile(body: dict[str, Any]) -> dict[str, Any]:
    queue = {k: v for k, v in body["queue"].items() if k not in VOLATILE}
    return body | {"queue": queue}


# --- the job states, each reached for real ------------------------------------------------


def test_every_job_state_is_reached_for_real_and_totals_stay_apart_from_now(conn, settings):
    """Given 12 joined attendees (k=3), the state walks queued -> running (two rows
    claimed) -> needs_attention (their attempt failed; they wait for a retry, also once
    a worker drained everyone else) -> needs_attention (one dies after max attempts)
    -> queued (redriven) -> idle (drained) -> paused (a rematch queued while paused) ->
    queued (resumed) -> idle; lifetime totals equal the batch log, not the counts now."""
    event = add_attendees(conn, "st-walk", generate_profiles(12, seed=3, id_prefix="sw-"), k=3)

    queued = status_of(conn, event, settings)
    assert queued.state == "queued"
    assert queued.queue.pending_by_priority == {"0": 0, "1": 0, "2": 0, "3": 12}
    assert (queued.queue.pending, queued.queue.running, queued.queue.waiting_retry) == (12, 0, 0)
    assert queued.totals.processed == queued.totals.failed == 0
    assert queued.coverage.without_list == queued.coverage.missing_matches == 12

    claimed = repo.claim(conn, 2, 60, event.id)
    running = status_of(conn, event, settings)
    assert running.state == "running"
    assert (running.queue.pending, running.queue.running) == (10, 2)

    backoff = settings.model_copy(update={"backoff_base_s": 600.0, "backoff_max_s": 600.0})
    failed = repo.fail(
        conn, {row.queue_id: "provider said no" for row in claimed}, claimed[0].lease_token, backoff
    )
    assert [row.status for row in failed] == ["pending", "pending"]
    waiting = status_of(conn, event, settings)
    assert waiting.state == "needs_attention"
    assert (waiting.queue.waiting_retry, waiting.queue.running, waiting.queue.pending) == (2, 0, 10)
    assert waiting.queue.next_retry_at is not None
    assert waiting.queue.next_retry_at > datetime.now(UTC) + timedelta(seconds=250)
    assert "2 users waiting for a retry" in waiting.state_reason

    report = drain(conn, Matchmaker(settings))
    assert (report.completed, report.stopped) == (10, "drained")  # the worker's view
    still = status_of(conn, event, settings)
    assert still.state == "needs_attention"  # not done: two users wait for their retry
    assert (still.queue.pending, still.queue.running, still.queue.waiting_retry) == (0, 0, 2)
    assert still.totals.processed == 10

    # Their backoff is over (as if 10 minutes passed); one of them is rejected again and,
    # with 2 attempts allowed, dies; the other is matched.
    conn.execute("UPDATE matchmaking_queue SET run_after = now() WHERE event_id = %s", (event.id,))
    waiting_ids = {
        row[0]
        for row in conn.execute(
            "SELECT p.user_id FROM matchmaking_queue q JOIN profiles p ON p.id = q.profile_id"
            " WHERE q.event_id = %s AND q.status = 'pending'",
            (event.id,),
        )
    }
    victim = min(waiting_ids)
    drain(conn, poisoned(settings, {victim}, max_attempts=2))
    dead = status_of(conn, event, settings)
    assert dead.state == "needs_attention"
    assert (dead.queue.dead, dead.queue.waiting_retry, dead.queue.pending) == (1, 0, 0)
    assert "1 user dead" in dead.state_reason
    assert [row["user_id"] for row in repo.dead_rows(conn, event.id)] == [victim]

    assert repo.redrive_dead(conn, event.id, None) == 1
    redriven = status_of(conn, event, settings)
    assert redriven.state == "queued"
    assert (redriven.queue.dead, redriven.queue.pending) == (0, 1)

    drain(conn, Matchmaker(settings))
    idle = status_of(conn, event, settings)
    assert idle.state == "idle"
    assert idle.coverage.missing_matches == 0
    assert idle.coverage.full_lists + idle.coverage.short_lists_few_candidates == 12
    completed, failures = batch_sums(conn, event)
    assert (idle.totals.processed, idle.totals.failed, idle.totals.died) == (
        completed,
        failures,
        1,
    )
    assert (completed, failures) == (12, 1)

    repo.set_job_paused(conn, event.id, True)
    repo.enqueue_for_matching(
        conn, event.id, user_ids=None, only_unmatched=False, priority=0, reason="rematch"
    )
    paused = status_of(conn, event, settings)
    assert paused.state == "paused"
    assert paused.queue.pending_by_priority["0"] == paused.queue.pending == 12
    assert drain(conn, Matchmaker(settings)).claimed == 0

    repo.set_job_paused(conn, event.id, False)
    assert status_of(conn, event, settings).state == "queued"
    drain(conn, Matchmaker(settings))
    again = status_of(conn, event, settings)
    assert again.state == "idle"
    # Lifetime totals: 24 completed attempts for 12 attendees; nothing is pending now.
    assert again.totals.processed == batch_sums(conn, event)[0] == 24
    assert again.totals.processed > again.coverage.active == 12
    assert again.queue.pending == again.queue.running == again.queue.dead == 0


def test_users_of_a_vanished_worker_wait_for_a_retry_not_running(conn, settings):
    """Given 3 users claimed by a worker that vanished (its lease ran out), the status
    counts them as waiting for a retry (due since the lease ended), not running; the
    next worker recovers and matches them and the event is idle."""
    event = add_attendees(conn, "st-lease", generate_profiles(5, seed=14, id_prefix="lv-"), k=2)
    claimed = repo.claim(conn, 3, 0.05, event.id)
    assert len(claimed) == 3
    time.sleep(0.2)

    vanished = status_of(conn, event, settings)

    assert (vanished.queue.running, vanished.queue.waiting_retry, vanished.queue.pending) == (
        0,
        3,
        2,
    )
    assert vanished.state == "needs_attention"
    assert vanished.queue.next_retry_at is not None
    assert vanished.queue.next_retry_at <= datetime.now(UTC)
    report = drain(conn, Matchmaker(settings))
    assert (report.recovered, report.completed) == (3, 5)
    assert status_of(conn, event, settings).state == "idle"


def test_an_attendee_without_the_list_they_could_have_and_nothing_queued_needs_attention(
    conn, settings
):
    """Given a matched event, when one attendee's list is lost while nothing is queued,
    then the state is needs_attention (not idle) and coverage counts them as missing."""
    event = add_attendees(conn, "st-lost", generate_profiles(8, seed=5, id_prefix="sl-"), k=3)
    drain(conn, Matchmaker(settings))
    assert status_of(conn, event, settings).state == "idle"

    conn.execute(
        "DELETE FROM user_matches WHERE event_id = %s AND profile_id ="
        " (SELECT id FROM profiles WHERE user_id = 'sl-000001')",
        (event.id,),
    )

    lost = status_of(conn, event, settings)
    assert lost.state == "needs_attention"
    assert (lost.coverage.missing_matches, lost.coverage.without_list) == (1, 1)
    assert "nothing queued" in lost.state_reason


def test_a_dead_user_matched_after_a_profile_edit_is_no_longer_dead(conn, settings):
    """Given a user dead after max attempts, a profile edit re-queues them (status: not
    dead, pending) and a healthy worker matches them; then they are not dead."""
    people = generate_profiles(6, seed=12, id_prefix="de-")
    event = add_attendees(conn, "st-edit", people, k=2)
    drain(conn, poisoned(settings, {"de-000002"}, max_attempts=1))
    assert status_of(conn, event, settings).queue.dead == 1

    edited = people[2].model_copy(update={"bio": "Now works on stream processing."})
    assert edited.user_id == "de-000002"
    add_attendees(conn, event, [edited], k=2)
    requeued = status_of(conn, event, settings)
    assert (requeued.queue.dead, requeued.queue.pending) == (0, 1)
    drain(conn, Matchmaker(settings))
    matched = status_of(conn, event, settings)
    assert matched.coverage.without_list == 0
    assert (matched.queue.dead, matched.state) == (0, "idle")


# --- coverage and exposure against an independent computation --------------------------


def expected_coverage(conn: Conn, event: EventRecord) -> dict[str, Any]:
    """Coverage and exposure from the exported lists, profiles and dismissals, in Python."""
    k, exclude = event.settings.k, event.settings.exclude_same_company
    company = {
        user_id: (name.strip().casefold() or None)
        for user_id, name in conn.execute(
            "SELECT p.user_id, p.company FROM attendees a JOIN profiles p ON p.id = a.profile_id"
            " WHERE a.event_id = %s AND a.active",
            (event.id,),
        )
    }
    dismissed = {
        frozenset(pair)
        for pair in conn.execute(
            "SELECT a.user_id, b.user_id FROM dismissals d"
            " JOIN profiles a ON a.id = d.profile_id"
            " JOIN profiles b ON b.id = d.dismissed_profile_id"
            " WHERE d.event_id = %s",
            (event.id,),
        )
    }
    lists = {
        e["user_id"]: [m["user_id"] for m in e["matches"]]
        for e in repo.export_lists(conn, event.id)
    }
    assert set(lists) == set(company)

    def candidates(me: str) -> int:
        return sum(
            1
            for other in company
            if other != me
            and not (exclude and company[me] is not None and company[me] == company[other])
            and frozenset((me, other)) not in dismissed
        )

    full = short = missing = empty = 0
    for me, entries in lists.items():
        possible = min(k, candidates(me))
        full += len(entries) >= k
        short += possible <= len(entries) < k
        missing += len(entries) < possible
        empty += not entries
    times = Counter(other for entries in lists.values() for other in entries)
    x = [times.get(user, 0) for user in company]
    n, total = len(x), sum(x)
    # Gini as the mean absolute difference over twice the mean (not the sorted formula).
    gini = sum(abs(a - b) for a in x for b in x) / (2 * n * total) if total else None
    return {
        "full": full,
        "short": short,
        "missing": missing,
        "empty": empty,
        "active": n,
        "max": max(x, default=0),
        "mean": total / n if n else None,
        "gini": gini,
    }


def assert_matches_python(status: StatusOut, expected: dict[str, Any]) -> None:
    c, x = status.coverage, status.exposure
    assert (c.active, c.full_lists, c.short_lists_few_candidates) == (
        expected["active"],
        expected["full"],
        expected["short"],
    )
    assert (c.missing_matches, c.without_list) == (expected["missing"], expected["empty"])
    assert c.full_ratio == pytest.approx(expected["full"] / expected["active"], abs=1e-6)
    assert x.max_appearances == expected["max"]
    assert x.mean_appearances == pytest.approx(expected["mean"], abs=1e-6)
    if expected["gini"] is None:
        assert x.gini is None
    else:
        assert x.gini == pytest.approx(expected["gini"], abs=1e-6)


def colleagues(n: int, company: str, prefix: str) -> list[Profile]:
    """n attendees of one company (spelled differently), with distinct interests."""
    spellings = [company, f"  {company.upper()} ", company.lower()]
    return [
        Profile(
            user_id=f"{prefix}{i}",
            name=f"Colleague {i}",
            company=spellings[i % len(spellings)],
            title="Engineer",
            bio=f"Works on system {i} of {company}.",
            interests=[f"topic {i}", "postgresql"],
        )
        for i in range(n)
    ]


def test_coverage_and_exposure_equal_a_python_computation_from_the_lists(conn, settings):
    """Given a 40-person event (k=4, same-company rule) with three colleagues spelled
    three ways, a dismissal and a departure, and a 5-person event (k=5) where nobody can
    have a full list, when both are matched, then coverage and exposure (most listed,
    mean, Gini) equal what Python computes from the exported lists; after one list is
    lost, they still do (one missing)."""
    big = add_attendees(
        conn,
        "st-big",
        [*generate_profiles(37, seed=8, id_prefix="sb-"), *colleagues(3, "Acme", "acme-")],
        k=4,
    )
    small = add_attendees(
        conn,
        "st-small",
        [*colleagues(2, "Initech", "ini-"), *generate_profiles(3, seed=9, id_prefix="ss-")],
        k=5,
    )
    for event, (a, b) in ((big, ("sb-000001", "sb-000002")), (small, ("ini-0", "ss-000001"))):
        repo.dismiss(conn, event.id, a, b)
    repo.leave_event(conn, big.id, "sb-000003")
    drain(conn, Matchmaker(settings))

    for event in (big, small):
        status = status_of(conn, event, settings)
        expected = expected_coverage(conn, event)
        assert_matches_python(status, expected)
        assert status.state == "idle"
    small_status = status_of(conn, small, settings)
    assert small_status.coverage.full_lists == 0
    assert small_status.coverage.short_lists_few_candidates == 5
    big_status = status_of(conn, big, settings)
    assert big_status.coverage.active == 39
    assert big_status.exposure.gini is not None and 0 < big_status.exposure.gini < 1

    conn.execute(
        "DELETE FROM user_matches WHERE event_id = %s AND profile_id ="
        " (SELECT id FROM profiles WHERE user_id = 'acme-1')",
        (big.id,),
    )
    expected = expected_coverage(conn, big)
    assert expected["missing"] == 1
    assert_matches_python(status_of(conn, big, settings), expected)


def test_exposure_of_an_event_nobody_is_listed_in_has_no_gini(conn, settings, make_event):
    """Given an event with no attendees, coverage and exposure are zeros and nulls."""
    event = make_event("st-empty")
    status = status_of(conn, event, settings)
    assert status.state == "idle"
    assert (status.coverage.active, status.coverage.full_ratio) == (0, None)
    assert (status.exposure.max_appearances, status.exposure.gini) == (0, None)


# --- the embedder serving the event --------------------------------------------------------


def test_the_embedder_configured_vs_effective_with_and_without_an_openai_key(conn, settings, fakes):
    """An 'openai' event is served by the local embedder without a key (and says why),
    by OpenAI with OPENAI_API_KEY or a secret holding a key, and reports no effective
    embedder when the secret cannot be read; each verdict is what embedder_for_event
    builds; vectors_from names the key of the stored vectors."""
    local = add_attendees(conn, "st-local", generate_profiles(4, seed=1, id_prefix="el-"), k=2)
    wants_openai = add_attendees(
        conn, "st-oai", generate_profiles(4, seed=2, id_prefix="eo-"), k=2, embedder="openai"
    )
    drain(conn, Matchmaker(settings))  # no key: the local embedder serves both
    # Secrets through moto: no client (nor secret) cached from before the mock.
    core.aws.reset_clients()
    secret_arn = boto3.client("secretsmanager").create_secret(
        Name="st-openai-key", SecretString=json.dumps({"api_key": "sk-from-secret"})
    )["ARN"]
    cases = [
        (local, settings, "local", "local embedder", LocalEmbedder),
        (wants_openai, settings, "local", "no OpenAI key is configured", LocalEmbedder),
        (
            wants_openai,
            settings.model_copy(update={"openai_api_key": SecretStr("sk-test")}),
            "openai",
            "OPENAI_API_KEY holds a key",
            OpenAIEmbedder,
        ),
        (
            wants_openai,
            settings.model_copy(update={"openai_secret_arn": secret_arn}),
            "openai",
            "OPENAI_SECRET_ARN holds a key",
            OpenAIEmbedder,
        ),
    ]
    for event, configured_settings, effective, why, built in cases:
        embedder = status_of(conn, event, configured_settings).embedder
        assert embedder.configured == event.settings.embedder
        assert (embedder.effective, embedder.vectors_from) == (effective, LocalEmbedder().key)
        assert why in embedder.reason
        assert isinstance(embedder_for_event(event, configured_settings), built)

    unreadable = settings.model_copy(
        update={"openai_secret_arn": secret_arn.replace("st-openai-key", "st-gone")}
    )
    choice = effective_embedder(wants_openai, unreadable)
    assert (choice.configured, choice.effective) == ("openai", None)
    assert "cannot be read" in choice.reason


# --- the API: the same status, its dead count and the shared dead-letter queue ------------


def seed_api_event(conn: Conn) -> EventRecord:
    people = generate_profiles(6, seed=21, id_prefix="sa-")
    return import_profiles(conn, EventIn(code=CODE, settings=EventSettings(k=3)), people)


def test_the_api_answers_the_core_status_and_a_redrive_clears_the_events_dead_count(
    api, conn, settings, monkeypatch
):
    """Given one dead user here, one in another event and 2 messages on the shared
    dead-letter queue, the API's status equals core event_status, counts this event's
    dead user only and labels the queue depth as all events'; after a redrive the event's
    dead count is 0 while the shared depth still says 2 (it is not this event's); with
    OPENAI_API_KEY set an 'openai' event is served by OpenAI."""
    event = seed_api_event(conn)
    other = add_attendees(conn, "st-other", generate_profiles(3, seed=22, id_prefix="so-"), k=2)
    drain(conn, poisoned(settings, {"sa-000002", "so-000001"}, max_attempts=1))
    api.put_dead_letters(2)

    reply = api(request("admin_status"))

    assert reply.status == 200
    body = reply.json
    assert body["state"] == "needs_attention"
    assert body["queue"]["dead"] == 1
    assert body["dead_letter_queue"] == {"scope": "all events", "depth": 2}
    assert status_of(conn, other, settings).queue.dead == 1
    core_body = event_status(conn, event, core.settings.get_settings(), lambda: 2)
    assert without_volatile(body) == without_volatile(core_body.model_dump(mode="json"))
    assert set(body) == set(StatusOut.model_fields)

    assert api(request("admin_redrive")).json["requeued"] == 1
    after = api(request("admin_status")).json
    assert (after["queue"]["dead"], after["queue"]["pending"], after["state"]) == (
        0,
        1,
        "queued",
    )
    assert after["dead_letter_queue"] == {"scope": "all events", "depth": 2}

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    core.settings.get_settings.cache_clear()
    handlers.api.connections.discard()
    repo.update_event_settings(conn, event.id, EventSettings(k=3, embedder="openai"))
    embedder = api(request("admin_status")).json["embedder"]
    assert (embedder["configured"], embedder["effective"]) == ("openai", "openai")


# --- the CLI -------------------------------------------------------------------------------


def cli_env(db_url: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "DATABASE_URL": db_url, **extra}
    env.pop("DEAD_LETTER_QUEUE_URL", None)
    return env


def cli(db_url: str, *args: str, cwd: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tooling.cli", *args],
        env=cli_env(db_url, **extra),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_status_renders_the_same_status_as_the_api(db_url, conn, settings, tmp_path):
    """Given a matched event with one user waiting for a retry, `status` prints the state,
    the counts now, coverage, exposure, the embedder and the totals, and `status --json`
    is the API's status body (core event_status)."""
    event = add_attendees(conn, "st-cli", generate_profiles(10, seed=31, id_prefix="sc-"), k=3)
    drain(conn, poisoned(settings, {"sc-000004"}, backoff_base_s=900.0, backoff_max_s=900.0))
    expected = status_of(conn, event, settings)
    assert expected.state == "needs_attention" and expected.queue.waiting_retry == 1

    text = cli(db_url, "status", "st-cli", cwd=tmp_path)
    as_json = cli(db_url, "status", "st-cli", "--json", cwd=tmp_path)

    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert f"state: needs_attention - {expected.state_reason}" in out
    assert "now: pending 0 (p3=0 p2=0 p1=0 p0=0), running 0, waiting for a retry 1" in out
    c = expected.coverage
    assert f"coverage: {c.full_lists}/10 active attendees with a full list" in out
    assert f"most-listed attendee on {expected.exposure.max_appearances} lists" in out
    assert f"Gini {expected.exposure.gini:.3f}" in out
    assert "embedder: local (configured local): the event asks for the local embedder" in out
    assert f"totals: processed {expected.totals.processed}, failed 1, died 0" in out
    assert "dead-letter queue (all events): not readable or not configured" in out
    assert as_json.returncode == 0, as_json.stderr
    body = json.loads(as_json.stdout)
    assert without_volatile(body) == without_volatile(expected.model_dump(mode="json"))


def test_cli_status_watch_prints_snapshots_until_ctrl_c_and_exits_0(db_url, conn, tmp_path):
    """Given an event, `status --watch 0.2` with stdout not a terminal prints successive
    timestamped snapshots; the state changes between them when a user joins; Ctrl-C
    (SIGINT) ends it with exit status 0."""
    add_attendees(conn, "st-watch", [], k=3)
    watcher = subprocess.Popen(
        [sys.executable, "-m", "tooling.cli", "status", "st-watch", "--watch", "0.2"],
        env=cli_env(db_url),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None
        seen: list[str] = []
        joined = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = watcher.stdout.readline()
            assert line, watcher.stderr.read() if watcher.stderr else "no output"
            seen.append(line)
            if line.startswith("  state: idle") and not joined:
                add_attendees(conn, "st-watch", generate_profiles(2, seed=4, id_prefix="sw-"))
                joined = True
            if line.startswith("  state: queued"):
                break
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(timeout=30) == 0
    finally:
        if watcher.poll() is None:
            watcher.kill()
    headers = [line for line in seen if line.startswith("--- ")]
    assert len(headers) >= 2
    assert "\x1b[" not in "".join(seen)  # no terminal codes when not a terminal
    assert any(line.startswith("  state: idle") for line in seen)


def test_cli_status_watch_json_prints_one_status_body_per_line(db_url, conn, tmp_path):
    """`status --json --watch` piped prints one status body per line (no headers), each
    a valid StatusOut; Ctrl-C ends it with exit status 0."""
    add_attendees(conn, "st-jwatch", generate_profiles(3, seed=6, id_prefix="jw-"), k=2)
    watcher = subprocess.Popen(
        [sys.executable, "-m", "tooling.cli", "status", "st-jwatch", "--json", "--watch", "0.1"],
        env=cli_env(db_url),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None
        lines = [watcher.stdout.readline() for _ in range(2)]
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(timeout=30) == 0
    finally:
        if watcher.poll() is None:
            watcher.kill()
    bodies = [StatusOut.model_validate_json(line) for line in lines]
    assert [(b.event, b.state, b.queue.pending) for b in bodies] == [("st-jwatch", "queued", 3)] * 2


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_watch_redraws_in_place_on_a_terminal_and_ctrl_c_exits_0(monkeypatch):
    """On a terminal each snapshot is drawn after clearing the screen; Ctrl-C during the
    wait ends the watch with 0 and a final newline."""
    shots = iter(["first\n", "second\n"])
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(tooling.cli.time, "sleep", sleep)
    out = Terminal()

    assert tooling.cli._watch(lambda: next(shots), 0.5, out) == 0
    clear = tooling.cli.CLEAR_SCREEN
    assert out.getvalue() == f"{clear}first\n{clear}second\n\n"
    assert waits == [0.5, 0.5]


def test_cli_run_exits_1_leaving_a_user_dead_and_names_who_waits_for_a_retry(
    db_url, conn, settings, tmp_path
):
    """Given a user dead in one event, `run` says drained (nothing waits) but exits 1 and
    names the event; given a user waiting for a retry in another, `run` exits 1 (the dead
    user) and says it is not drained, with how many wait and until when; once the dead
    user is redriven and the retry is due, `run` matches both, exits 0 and says drained."""
    dead_event = add_attendees(conn, "st-dead", generate_profiles(4, seed=41, id_prefix="sd-"))
    drain(conn, poisoned(settings, {"sd-000001"}, max_attempts=1))

    ran = cli(db_url, "run", "--quiet", cwd=tmp_path)

    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert "stopped: drained (nothing pending, running or waiting for a retry)" in ran.stdout
    assert "1 user dead: st-dead (1)" in ran.stdout

    add_attendees(conn, "st-wait", generate_profiles(4, seed=42, id_prefix="sw-"))
    drain(conn, poisoned(settings, {"sw-000002"}, backoff_base_s=900.0, backoff_max_s=900.0))
    retry_at = conn.execute(
        "SELECT run_after FROM matchmaking_queue WHERE status = 'pending'"
    ).fetchone()
    assert retry_at is not None

    waiting = cli(db_url, "run", "--quiet", cwd=tmp_path)

    assert waiting.returncode == 1, waiting.stdout + waiting.stderr
    assert "stopped: drained" not in waiting.stdout
    when = retry_at[0].astimezone().isoformat(timespec="seconds")
    assert f"stopped: not drained: 1 user waiting for a retry (next at {when}" in waiting.stdout

    assert repo.redrive_dead(conn, dead_event.id, None) == 1
    conn.execute(  # as if the backoff were over
        "UPDATE matchmaking_queue SET run_after = now() WHERE status = 'pending'"
    )
    clean = cli(db_url, "run", "--quiet", cwd=tmp_path)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "processed 2 users" in clean.stdout
    assert "stopped: drained" in clean.stdout
    assert "dead" not in clean.stdout.split("\n", 1)[1]


# --- cost at 10,000 attendees ----------------------------------------------------------------

BIG_EVENT = 10_000
STATUS_BUDGET_S = 2.0  # generous for a shared machine; measured 59 ms (docs/api.md)


@pytest.mark.slow
def test_status_of_a_10000_attendee_event_is_cheap_and_exact(conn, settings, capsys):
    """Given 10,000 synthetic attendees matched (k=5), when the status is read three
    times, then the fastest read is within STATUS_BUDGET_S, every attendee has the list
    they can have, and exposure equals a Python computation from the exported lists."""
    people = generate_profiles(BIG_EVENT, seed=77, id_prefix="big-")
    event = add_attendees(conn, "st-10k", people, k=5)
    drain(conn, Matchmaker(settings.model_copy(update={"batch_size": 2000})))

    timings = []
    for _ in range(3):
        started = time.perf_counter()
        status = status_of(conn, event, settings)
        timings.append(time.perf_counter() - started)
    with capsys.disabled():
        print(f"\nstatus of a {BIG_EVENT}-attendee event: {min(timings) * 1000:.0f} ms (best of 3)")

    assert min(timings) < STATUS_BUDGET_S
    assert status.state == "idle"
    c = status.coverage
    assert c.active == BIG_EVENT
    assert (c.missing_matches, c.without_list) == (0, 0)
    assert c.full_lists + c.short_lists_few_candidates == BIG_EVENT
    times = Counter(m["user_id"] for e in repo.export_lists(conn, event.id) for m in e["matches"])
    x = sorted(times.get(p.user_id, 0) for p in people)
    # Gini from the Lorenz curve: 1 - 2 * (area under it), by the trapezoid rule.
    cumulative, area = 0, 0.0
    for value in x:
        area += (2 * cumulative + value) / 2
        cumulative += value
    gini = 1 - 2 * area / (len(x) * cumulative)
    assert status.exposure.max_appearances == x[-1]
    assert status.exposure.gini == pytest.approx(gini, abs=1e-6)

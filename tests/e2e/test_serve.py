"""`matchmaker serve` as a real process, driven over real HTTP on the loopback interface.

One server per module (embedded PostgreSQL in a temporary MATCHMAKER_PGDATA, or a fresh
database on the DATABASE_URL server when the session has one); the tokens come from its
own output and from `matchmaker token`, exactly as a developer would get them. Covers the
smoke run (tooling.smoke), every route, authentication and authorisation, a malformed body
writing nothing, and a clean shutdown on Ctrl-C (SIGINT). The shutdown test runs last.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from core.models import Profile
from tests.conftest import database_uri
from tooling.smoke import SmokeReport, _check_lists, _Settings, run_smoke
from tooling.synthetic import generate_profiles

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 30.0
URL_LINE = re.compile(r"Matchmaker API on (http://127\.0\.0\.1:\d+) ")
STATUS_KEYS = {
    "event",
    "state",
    "state_reason",
    "queue",
    "totals",
    "coverage",
    "exposure",
    "embedder",
    "icebreakers",
    "dead_letter_queue",
    "throughput_per_min_5m",
    "throughput_per_min_60m",
    "last_run_at",
    "last_error",
    "last_error_at",
}
QUEUE_KEYS = {
    "pending_by_priority",
    "pending",
    "running",
    "waiting_retry",
    "next_retry_at",
    "last_retry_at",
    "dead",
    "oldest_pending_age_s",
}
EVENT_KEYS = {"code", "name", "settings", "attendees", "created"}
SETTINGS_KEYS = {
    "k",
    "exclude_same_company",
    "weights",
    "embedder",
    "icebreakers",
    "exposure_correction",
    "hubness_m",
}
MATCH_KEYS = {"user_id", "rank", "score", "reasons", "icebreaker"}


# --- the server ------------------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen[str]
    url: str
    admin: str
    service: str
    env: dict[str, str]
    workdir: Path
    output: list[str] = field(default_factory=list)  # stdout lines, drained by a thread

    @property
    def pgdata(self) -> Path:
        return Path(self.env["MATCHMAKER_PGDATA"])

    def stderr(self) -> str:
        return (self.workdir / "stderr.log").read_text(errors="replace")

    def diagnostics(self) -> str:
        return f"stdout:\n{''.join(self.output)[-3000:]}\nstderr:\n{self.stderr()[-3000:]}"


def _drain(stream: Any, lines: queue.Queue[str | None], sink: list[str]) -> None:
    """Reads the server's stdout to the end so it can never block on a full pipe."""
    for line in stream:
        sink.append(line)
        lines.put(line)
    lines.put(None)


def _fresh_database(server_url: str) -> str:
    name = f"mm_e2e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name


def _drop_database(server_url: str, name: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def _stop_orphaned_postgres(pgdata: Path) -> None:
    """Only after a SIGKILL: the embedded PostgreSQL the server started would outlive it."""
    pid_file = pgdata / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().splitlines()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return
    if str(pgdata).encode() in cmdline:
        os.kill(pid, signal.SIGINT)  # fast shutdown of that one postmaster


def stop(server: Server) -> int:
    """SIGINT, as Ctrl-C; the exit status (SIGKILL and -9 after STOP_TIMEOUT_S)."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
    try:
        return server.proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(timeout=STOP_TIMEOUT_S)
        return -9


def launch(env: dict[str, str], workdir: Path, *options: str) -> Server:
    """Start `matchmaker serve --port 0` with this environment (and these serve options);
    fail the test unless it prints its URL and both tokens within START_TIMEOUT_S."""
    env = {
        **env,
        "MATCHMAKER_PGDATA": str(workdir / "pgdata"),
        # the dev-token secret goes to the user's state directory: a private one per server
        "XDG_STATE_HOME": str(workdir / "state"),
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [sys.executable, "-m", "tooling.cli", "serve", "--port", "0", "--schedule-seconds", "1"]
    cmd += options
    with (workdir / "stderr.log").open("w") as stderr:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
    lines: queue.Queue[str | None] = queue.Queue()
    output: list[str] = []
    threading.Thread(target=_drain, args=(proc.stdout, lines, output), daemon=True).start()
    found: dict[str, str] = {}
    deadline = time.monotonic() + START_TIMEOUT_S
    while "service" not in found and time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:  # the server exited
            break
        if match := URL_LINE.search(line):
            found["url"] = match.group(1)
        elif line.startswith("admin token:"):
            found["admin"] = line.split(":", 1)[1].strip()
        elif line.startswith("service token:"):
            found["service"] = line.split(":", 1)[1].strip()
    srv = Server(
        proc,
        found.get("url", ""),
        found.get("admin", ""),
        found.get("service", ""),
        env,
        workdir,
        output,
    )
    if {"url", "admin", "service"} - found.keys():
        stop(srv)
        pytest.fail(
            f"`matchmaker serve` did not come up in {START_TIMEOUT_S:.0f}s\n{srv.diagnostics()}"
        )
    return srv


@contextlib.contextmanager
def own_server(prefix: str) -> Iterator[Server]:
    """`matchmaker serve` on data of its own (a temporary MATCHMAKER_PGDATA, or a fresh
    database on the session's DATABASE_URL server), stopped and cleaned up after."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    session_url = os.environ.get("DATABASE_URL")
    database = None
    if session_url:  # the session's server, but a database of our own (CREATEDB needed)
        database = _fresh_database(session_url)
        env["DATABASE_URL"] = database_uri(session_url, database)
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    srv = launch(env, workdir)
    try:
        yield srv
    finally:
        if stop(srv) == -9:
            _stop_orphaned_postgres(srv.pgdata)
        if database is not None and session_url:
            _drop_database(session_url, database)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with own_server("matchmaker-e2e-") as srv:
        yield srv


# --- HTTP --------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: Any
    text: str
    content_type: str

    def is_error(self, status: int, error: str) -> bool:
        """Our JSON error shape: {"error": <code>, "message": <non-empty text>}."""
        return (
            self.status == status
            and self.content_type.startswith("application/json")
            and isinstance(self.body, dict)
            and self.body.get("error") == error
            and isinstance(self.body.get("message"), str)
            and bool(self.body["message"])
        )


def call(
    server: Server,
    method: str,
    path: str,
    token: str | None = None,
    body: Any = None,
    *,
    raw: bytes | None = None,
) -> Reply:
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    headers = {"Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(server.url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            status, text = response.status, response.read().decode()
            content_type = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
        content_type = exc.headers.get("Content-Type", "")
    return Reply(status, json.loads(text) if text.strip() else None, text, content_type)


def wait_drained(server: Server, code: str) -> dict[str, Any]:
    """Polls the admin status until nothing of the event is pending, running or waiting
    for a retry."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        reply = call(server, "GET", f"/admin/events/{code}/status", server.admin)
        assert reply.status == 200, reply.text
        status: dict[str, Any] = reply.body
        queue = status["queue"]
        if queue["pending"] == queue["running"] == queue["waiting_retry"] == 0:
            return status
        assert time.monotonic() < deadline, f"{code} still busy: {status}"
        time.sleep(0.2)


def matches_of(server: Server, code: str, user_id: str) -> list[str]:
    reply = call(server, "GET", f"/events/{code}/attendees/{user_id}/matches", server.service)
    assert reply.status == 200, reply.text
    return [m["user_id"] for m in reply.body["matches"]]


def mint_attendee_token(server: Server, user_id: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "tooling.cli", "token", "--role", "attendee", "--sub", user_id],
        cwd=ROOT,
        env=server.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def make_event(server: Server, code: str, n: int, *, prefix: str) -> list[str]:
    """An event with n synthetic attendees; returns their user_ids."""
    reply = call(server, "POST", "/events", server.service, {"code": code, "name": code})
    assert reply.status == 201, reply.text
    ids = []
    for profile in generate_profiles(n, seed=5, id_prefix=prefix):
        body = profile.model_dump(exclude={"user_id"})
        reply = call(
            server, "PUT", f"/events/{code}/attendees/{profile.user_id}", server.service, body
        )
        assert reply.status == 200, reply.text
        ids.append(profile.user_id)
    return ids


# --- the smoke run -----------------------------------------------------------------------


def test_smoke_run_passes(server: Server) -> None:
    out = io.StringIO()
    report = run_smoke(
        server.url,
        "e2e-smoke",
        users=25,
        service_token=server.service,
        admin_token=server.admin,
        out=out,
        timeout_s=45,
    )
    text = out.getvalue()
    assert report.ok, f"{report.problems}\n{text}\n{server.diagnostics()}"
    assert (report.users, report.matched) == (25, 25)
    assert report.dismissed_pairs, text
    assert report.elapsed_s < 45
    assert "smoke: OK" in text and "idle: pending 0, running 0, waiting for a retry 0" in text
    # A second run reuses the event (200, not 201) with fresh attendee ids.
    out = io.StringIO()
    again = run_smoke(
        server.url,
        "e2e-smoke",
        users=4,
        service_token=server.service,
        admin_token=server.admin,
        out=out,
        timeout_s=45,
    )
    assert again.ok, again.problems
    assert "event e2e-smoke: reusing; k=3" in out.getvalue()
    assert "25 attendees before this run" in out.getvalue()


def test_smoke_checks_catch_wrong_lists() -> None:
    """The list rules themselves, on hand-made lists (no server needed)."""
    profiles = [
        Profile(user_id=f"chk-{i}", company=company)
        for i, company in enumerate(["A", "B", "C", "D", "a "])
    ]

    def entry(user_id: str, rank: int, score: float) -> dict[str, Any]:
        return {"user_id": user_id, "rank": rank, "score": score, "reasons": []}

    good = {
        "chk-0": [entry("chk-1", 1, 0.9), entry("chk-2", 2, 0.8), entry("chk-3", 3, 0.7)],
        "chk-1": [entry("chk-0", 1, 0.9), entry("chk-2", 2, 0.5), entry("chk-3", 3, 0.4)],
        "chk-2": [entry("chk-0", 1, 0.8), entry("chk-1", 2, 0.5), entry("chk-3", 3, 0.3)],
        "chk-3": [entry("chk-0", 1, 0.7), entry("chk-1", 2, 0.4), entry("chk-2", 3, 0.3)],
        "chk-4": [entry("chk-1", 1, 0.6), entry("chk-2", 2, 0.5), entry("chk-3", 3, 0.2)],
    }
    settings = _Settings(k=3, exclude_same_company=True)
    report = SmokeReport(users=5)
    _check_lists(report, profiles, good, settings, only_ours=True)
    assert report.problems == [] and report.matched == 5 and report.ok
    assert report.symmetric_pairs == 6

    bad = {
        **good,
        "chk-0": [entry("chk-0", 1, 0.9), entry("chk-4", 2, 0.8)],  # self, colleague, 2 of 3
        "chk-1": [entry("chk-0", 1, 0.9), entry("chk-3", 2, 0.4), entry("chk-2", 3, 0.5)],
        "chk-3": [entry("chk-0", 1, 0.7), entry("chk-1", 2, 0.45), entry("chk-2", 3, 0.3)],
    }
    report = SmokeReport(users=5, dismissed_pairs=[("chk-3", "chk-2")])
    _check_lists(report, profiles, bad, settings, only_ours=True)
    text = "\n".join(report.problems)
    assert "chk-0: matched with themselves" in text
    assert "chk-0: matched with chk-4 of the same company" in text
    assert "chk-0: 2 matches, expected 3" in text
    assert "chk-1: score 0.5 at rank 3 is above 0.4" in text
    assert "chk-2: matched with dismissed chk-3" in text
    assert "chk-3: matched with dismissed chk-2" in text
    assert "chk-1 and chk-3 list each other with different scores: 0.4 and 0.45" in text
    assert not report.ok and report.matched == 1  # only chk-4's list is right


def test_smoke_failures_are_reported_not_raised(server: Server) -> None:
    out = io.StringIO()
    wrong_admin = run_smoke(
        server.url,
        "e2e-smoke-403",
        users=3,
        service_token=server.service,
        admin_token=server.service,  # not an admin token
        out=out,
        timeout_s=20,
    )
    assert not wrong_admin.ok
    assert any("HTTP 403" in p and "forbidden" in p for p in wrong_admin.problems)
    assert "smoke: FAILED" in out.getvalue() and "Traceback" not in out.getvalue()

    paused_code = "e2e-smoke-paused"
    assert call(server, "POST", "/events", server.service, {"code": paused_code}).status == 201
    assert call(server, "POST", f"/admin/events/{paused_code}/pause", server.admin).status == 204
    paused = run_smoke(
        server.url,
        paused_code,
        users=3,
        service_token=server.service,
        admin_token=server.admin,
        out=io.StringIO(),
        timeout_s=20,
    )
    assert not paused.ok
    assert any("paused" in p for p in paused.problems), paused.problems

    nobody = run_smoke(
        "http://127.0.0.1:9",  # discard port: nothing listens
        "e2e-smoke-down",
        users=2,
        service_token=server.service,
        admin_token=server.admin,
        out=io.StringIO(),
        timeout_s=5,
    )
    assert not nobody.ok
    assert any("cannot reach" in p for p in nobody.problems), nobody.problems


# --- every route -------------------------------------------------------------------------


def test_event_and_attendee_routes(server: Server) -> None:
    code = "e2e-routes"
    created = call(server, "POST", "/events", server.service, {"code": code, "name": "Routes"})
    assert created.status == 201, created.text
    assert set(created.body) == EVENT_KEYS and set(created.body["settings"]) == SETTINGS_KEYS
    assert created.body["created"] is True and created.body["attendees"] == 0
    assert created.body["settings"]["k"] == 3

    again = call(server, "POST", "/events", server.service, {"code": code, "name": "Routes"})
    assert again.status == 200 and again.body["created"] is False
    conflict = call(server, "POST", "/events", server.service, {"code": code, "settings": {"k": 5}})
    assert conflict.is_error(409, "conflict"), conflict.text
    assert call(server, "GET", "/events/e2e-nope", server.service).is_error(404, "not_found")

    profiles = generate_profiles(8, seed=3, id_prefix="rt-")
    for profile in profiles:
        path = f"/events/{code}/attendees/{profile.user_id}"
        reply = call(server, "PUT", path, server.service, profile.model_dump(exclude={"user_id"}))
        assert reply.status == 200, reply.text
        assert reply.body == {"event": code, "user_id": profile.user_id, "status": "joined"}
    first = profiles[0]
    path = f"/events/{code}/attendees/{first.user_id}"
    same = call(server, "PUT", path, server.service, first.model_dump(exclude={"user_id"}))
    assert same.body["status"] == "unchanged"
    edited = first.model_dump(exclude={"user_id"}) | {"bio": first.bio + " Also into sailing."}
    assert call(server, "PUT", path, server.service, edited).body["status"] == "updated"

    event = call(server, "GET", f"/events/{code}", server.service)
    assert event.status == 200 and set(event.body) == EVENT_KEYS
    assert event.body["attendees"] == 8 and event.body["name"] == "Routes"

    queued = call(server, "POST", f"/events/{code}/matchmaking", server.service, {})
    assert queued.status == 202, queued.text
    assert queued.body["mode"] == "queue" and queued.body["invoked"] is True
    assert isinstance(queued.body["queued"], int) and queued.body["matched"] is None

    sync = call(server, "POST", f"/events/{code}/matchmaking", server.service, {"useQueue": False})
    assert sync.status == 200, sync.text
    assert sync.body["mode"] == "sync" and sync.body["invoked"] is False
    assert isinstance(sync.body["matched"], int)
    wait_drained(server, code)

    ids = [p.user_id for p in profiles]
    reply = call(server, "GET", f"/events/{code}/attendees/{ids[0]}/matches", server.service)
    assert reply.status == 200 and reply.body["user_id"] == ids[0]
    matches = reply.body["matches"]
    assert 1 <= len(matches) <= 3
    assert all(set(m) == MATCH_KEYS for m in matches)
    assert [m["rank"] for m in matches] == list(range(1, len(matches) + 1))
    assert all(isinstance(r, str) for m in matches for r in m["reasons"])
    missing = call(server, "GET", f"/events/{code}/attendees/rt-ghost/matches", server.service)
    assert missing.is_error(404, "not_found")

    # Dismissal: hidden from both lists at once, then replaced by the re-match.
    target = matches[0]["user_id"]
    dismissal = f"/events/{code}/attendees/{ids[0]}/dismissals"
    reply = call(server, "POST", dismissal, server.service, {"dismissed_user_id": target})
    assert reply.status == 204 and reply.body is None
    assert target not in matches_of(server, code, ids[0])
    assert ids[0] not in matches_of(server, code, target)
    selfish = call(server, "POST", dismissal, server.service, {"dismissed_user_id": ids[0]})
    assert selfish.is_error(400, "bad_request")
    stranger = call(server, "POST", dismissal, server.service, {"dismissed_user_id": "rt-ghost"})
    assert stranger.is_error(404, "not_found")
    wait_drained(server, code)
    assert target not in matches_of(server, code, ids[0])

    # Leaving: gone from every list at once; a second leave and their matches are 404.
    leaver = ids[-1]
    gone = call(server, "DELETE", f"/events/{code}/attendees/{leaver}", server.service)
    assert gone.status == 204 and gone.body is None
    assert all(leaver not in matches_of(server, code, other) for other in ids[:-1])
    twice = call(server, "DELETE", f"/events/{code}/attendees/{leaver}", server.service)
    assert twice.is_error(404, "not_found")
    leaver_matches = f"/events/{code}/attendees/{leaver}/matches"
    assert call(server, "GET", leaver_matches, server.service).is_error(404, "not_found")
    assert call(server, "GET", f"/events/{code}", server.service).body["attendees"] == 7
    assert call(server, "GET", "/no/such/route", server.service).is_error(404, "not_found")


def test_admin_routes(server: Server) -> None:
    code = "e2e-admin"
    ids = make_event(server, code, 6, prefix="adm-")
    start = call(
        server,
        "POST",
        f"/admin/events/{code}/matching",
        server.admin,
        {"mode": "everyone", "priority": 1},
    )
    assert start.status == 202, start.text
    assert start.body["event"] == code and start.body["mode"] == "queue"
    assert start.body["invoked"] is True and start.body["queued"] >= 1

    status = wait_drained(server, code)
    assert set(status) == STATUS_KEYS
    assert set(status["queue"]) == QUEUE_KEYS
    assert set(status["queue"]["pending_by_priority"]) == {"0", "1", "2", "3"}
    assert status["event"] == code and status["coverage"]["active"] == 6
    coverage = status["coverage"]
    assert coverage["without_list"] == coverage["missing_matches"] == 0
    assert coverage["full_lists"] + coverage["short_lists_few_candidates"] == 6
    assert status["queue"]["dead"] == 0
    assert status["state"] == "idle" and status["totals"]["processed"] >= 6
    assert status["dead_letter_queue"]["scope"] == "all events"

    assert call(server, "POST", f"/admin/events/{code}/pause", server.admin).status == 204
    paused = call(server, "GET", f"/admin/events/{code}/status", server.admin)
    assert paused.body["state"] == "paused"
    refused = call(
        server, "POST", f"/events/{code}/matchmaking", server.service, {"useQueue": False}
    )
    assert refused.is_error(409, "conflict"), refused.text
    assert call(server, "POST", f"/admin/events/{code}/resume", server.admin).status == 204
    resumed = call(server, "GET", f"/admin/events/{code}/status", server.admin)
    assert resumed.body["state"] in ("idle", "queued", "running")

    patched = call(server, "PATCH", f"/admin/events/{code}/settings", server.admin, {"k": 2})
    assert patched.status == 200, patched.text
    assert set(patched.body) == EVENT_KEYS and patched.body["settings"]["k"] == 2
    wait_drained(server, code)
    assert all(len(matches_of(server, code, user_id)) <= 2 for user_id in ids)
    too_big = call(server, "PATCH", f"/admin/events/{code}/settings", server.admin, {"k": 11})
    assert too_big.is_error(422, "validation_error")

    dead = call(server, "GET", f"/admin/events/{code}/dead-letters", server.admin)
    assert dead.status == 200 and dead.body == []
    redrive = call(server, "POST", f"/admin/events/{code}/dead-letters/redrive", server.admin)
    assert redrive.status == 200
    assert redrive.body == {"event": code, "requeued": 0, "invoked": False}

    for method, path in [
        ("GET", "/admin/events/e2e-nope/status"),
        ("POST", "/admin/events/e2e-nope/pause"),
        ("GET", "/admin/events/e2e-nope/dead-letters"),
    ]:
        assert call(server, method, path, server.admin).is_error(404, "not_found"), path


# --- authentication and authorisation ----------------------------------------------------


ADMIN_ROUTES: list[tuple[str, str, Any]] = [
    ("POST", "/admin/events/{code}/matching", {}),
    ("GET", "/admin/events/{code}/status", None),
    ("POST", "/admin/events/{code}/pause", None),
    ("POST", "/admin/events/{code}/resume", None),
    ("PATCH", "/admin/events/{code}/settings", {"k": 4}),
    ("GET", "/admin/events/{code}/dead-letters", None),
    ("POST", "/admin/events/{code}/dead-letters/redrive", None),
]


def _tampered(token: str) -> str:
    """The service token with its payload swapped for an admin scope, signature kept."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["scope"] = "matchmaker/admin"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


def test_tokens_are_checked(server: Server) -> None:
    code = "e2e-auth"
    ids = make_event(server, code, 5, prefix="auth-")
    call(server, "POST", f"/events/{code}/matchmaking", server.service, {})
    wait_drained(server, code)

    for token in (None, _tampered(server.service), "not-a-jwt", server.service + "x"):
        for method, path in [("GET", f"/events/{code}"), ("GET", f"/admin/events/{code}/status")]:
            reply = call(server, method, path, token)
            assert reply.status == 401, (token, path, reply.text)
    # Nothing was written by an unauthenticated write either.
    reply = call(server, "PUT", f"/events/{code}/attendees/mallory", None, {"name": "Mallory"})
    assert reply.is_error(401, "unauthorized")
    assert call(server, "GET", f"/events/{code}", server.service).body["attendees"] == 5

    for method, path, payload in ADMIN_ROUTES:
        reply = call(server, method, path.format(code=code), server.service, payload)
        assert reply.is_error(403, "forbidden"), (path, reply.text)
    assert call(server, "GET", f"/admin/events/{code}/status", server.admin).status == 200

    me, other = ids[0], ids[1]
    attendee = mint_attendee_token(server, me)
    own = call(server, "GET", f"/events/{code}/attendees/{me}/matches", attendee)
    assert own.status == 200 and own.body["user_id"] == me and own.body["matches"]
    theirs = call(server, "GET", f"/events/{code}/attendees/{other}/matches", attendee)
    assert theirs.is_error(403, "forbidden")
    forbidden: list[tuple[str, str, Any]] = [
        ("GET", f"/events/{code}", None),
        ("PUT", f"/events/{code}/attendees/{me}", {"name": "Me"}),
        ("DELETE", f"/events/{code}/attendees/{other}", None),
        ("POST", f"/events/{code}/matchmaking", {}),
        ("POST", f"/events/{code}/attendees/{other}/dismissals", {"dismissed_user_id": me}),
        ("GET", f"/admin/events/{code}/status", None),
    ]
    for method, path, payload in forbidden:
        assert call(server, method, path, attendee, payload).is_error(403, "forbidden"), path
    # ...but may dismiss from their own list.
    top = own.body["matches"][0]["user_id"]
    dismiss = f"/events/{code}/attendees/{me}/dismissals"
    assert call(server, "POST", dismiss, attendee, {"dismissed_user_id": top}).status == 204
    assert top not in matches_of(server, code, me)


# --- bad input writes nothing ------------------------------------------------------------


def test_malformed_json_is_422_and_writes_nothing(server: Server) -> None:
    code = "e2e-bad-json"
    broken = b'{"name": "Ada", "interests": ["AI",'
    reply = call(server, "POST", "/events", server.service, raw=b'{"code": "' + code.encode())
    assert reply.is_error(422, "validation_error"), reply.text
    assert reply.body["details"] == [{"field": "body", "message": "malformed JSON"}]
    assert call(server, "GET", f"/events/{code}", server.service).is_error(404, "not_found")

    ids = make_event(server, code, 3, prefix="bad-")
    put = call(server, "PUT", f"/events/{code}/attendees/bad-new", server.service, raw=broken)
    assert put.is_error(422, "validation_error"), put.text
    assert put.body["details"] == [{"field": "body", "message": "malformed JSON"}]
    new_matches = f"/events/{code}/attendees/bad-new/matches"
    assert call(server, "GET", new_matches, server.service).is_error(404, "not_found")
    assert call(server, "GET", f"/events/{code}", server.service).body["attendees"] == 3

    # An existing profile is left as it was: the same body still comes back "unchanged".
    profile = generate_profiles(3, seed=5, id_prefix="bad-")[0]
    path = f"/events/{code}/attendees/{ids[0]}"
    assert call(server, "PUT", path, server.service, raw=broken).status == 422
    same = call(server, "PUT", path, server.service, profile.model_dump(exclude={"user_id"}))
    assert same.body["status"] == "unchanged", same.text

    # A broken dismissal dismisses nobody; unknown fields and wrong types are 422 too.
    wait_drained(server, code)
    before = matches_of(server, code, ids[0])
    dismissal = f"/events/{code}/attendees/{ids[0]}/dismissals"
    assert (
        call(server, "POST", dismissal, server.service, raw=b'{"dismissed_user_id": ').status == 422
    )
    assert matches_of(server, code, ids[0]) == before
    for body in ({"name": "Ada", "favourite_colour": "teal"}, {"interests": "AI"}):
        reply = call(server, "PUT", f"/events/{code}/attendees/bad-new", server.service, body)
        assert reply.is_error(422, "validation_error"), reply.text
    assert call(server, "GET", new_matches, server.service).is_error(404, "not_found")


# --- shutdown (keep last: it stops the module's server) -----------------------------------


def test_sigint_stops_cleanly(server: Server) -> None:
    assert server.proc.poll() is None, server.diagnostics()
    started = time.monotonic()
    server.proc.send_signal(signal.SIGINT)
    try:
        code = server.proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {STOP_TIMEOUT_S:.0f}s after SIGINT\n{server.diagnostics()}")
    assert code == 0, server.diagnostics()
    assert time.monotonic() - started < STOP_TIMEOUT_S
    assert "Traceback" not in server.stderr(), server.diagnostics()
    assert "stopping..." in server.stderr()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url + "/events/e2e-routes", timeout=5)
    if "DATABASE_URL" not in server.env:  # the embedded PostgreSQL went down with it
        assert not (server.pgdata / "postmaster.pid").exists()

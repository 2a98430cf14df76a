"""`matchmaker serve` under load: many concurrent clients over real HTTP on the loopback.

The server runs as a real process (tests.e2e.test_serve.launch, matchmaker every second)
on a fresh database of the session's PostgreSQL. MATCHMAKER_LOAD_CLIENTS threads (default
100) each loop until MATCHMAKER_LOAD_SECONDS (default 60) have passed: join a new attendee,
poll that attendee's own matches with their own attendee token until the list is non-empty
(join -> matched), and in between edit profiles, read other lists, read the event, try to
read someone else's list with an attendee token (403), read the admin status and
trigger matchmaking. Every request has a timeout;
nothing leaves 127.0.0.1.

Then: zero 5xx, zero connection errors, no unexpected status (an attendee's token reading
their own list gets 200, someone else's 403: requests never see each other's caller), the
queue drains within DRAIN_TIMEOUT_S, every attendee that joined has a full list, and
`matchmaker verify` agrees with the brute-force oracle. The figures are printed (pytest
-s) and written as JSON to MATCHMAKER_LOAD_REPORT when it is set.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from core.data import repository as repo
from core.models import Profile
from tests.e2e.test_serve import ROOT, Server, call, launch, stop
from tooling import dev_tokens as devauth
from tooling.synthetic import generate_profiles

LOAD_SECONDS = float(os.environ.get("MATCHMAKER_LOAD_SECONDS", "60"))
CLIENTS = int(os.environ.get("MATCHMAKER_LOAD_CLIENTS", "100"))
REPORT_PATH = os.environ.get("MATCHMAKER_LOAD_REPORT")
REQUEST_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 120.0
VERIFY_TIMEOUT_S = 300.0
CODE = "load-test"
PROFILES_PER_BATCH = 32

# Concurrent POST .../matchmaking (each queues every attendee without a list) used to
# deadlock with each other and with a worker's batch (queue rows locked in different
# orders; fixed by 0007_lock_order.sql). On by default; MATCHMAKER_LOAD_TRIGGERS=0 leaves
# them out.
TRIGGERS = os.environ.get("MATCHMAKER_LOAD_TRIGGERS", "1") == "1"

# What a client does besides joining and polling its newest attendee, one per loop turn.
ACTIONS = (
    ["edit"] * 5 + ["read_other"] * 5 + ["event"] * 3 + ["forbidden"] * 3 + ["status"] * 3
) + (["trigger"] if TRIGGERS else [])


@dataclass
class Tally:
    """One client's figures; merged after the clients stop (no lock on the hot path)."""

    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    connection_errors: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    join_to_matched_s: list[float] = field(default_factory=list)
    joined: list[Profile] = field(default_factory=list)
    edits: int = 0
    unmatched_at_stop: int = 0


class Client:
    def __init__(
        self, index: int, server: Server, secret: bytes, deadline: float, start: threading.Event
    ) -> None:
        self.index = index
        parts = urlsplit(server.url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        assert self.host == "127.0.0.1"
        self.service, self.admin = server.service, server.admin
        self.secret = secret
        self.deadline = deadline
        self.start = start
        self.rng = random.Random(index)
        self.tally = Tally()
        self._profiles: list[Profile] = []
        self._batches = 0

    # --- HTTP --------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        token: str,
        body: Any = None,
        *,
        expect: int,
    ) -> tuple[int, Any] | None:
        """One request on a fresh connection; None after a connection error."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        started = time.perf_counter()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=REQUEST_TIMEOUT_S)
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            text = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.tally.connection_errors.append(f"{method} {path}: {exc!r}")
            return None
        finally:
            conn.close()
        self.tally.latencies_s.append(time.perf_counter() - started)
        self.tally.statuses[response.status] += 1
        if response.status != expect:
            self.tally.unexpected.append(
                f"{method} {path}: {response.status} (expected {expect}) {text[:200]!r}"
            )
        return response.status, json.loads(text) if text.strip() else None

    # --- the loop ----------------------------------------------------------------------

    def _next_profile(self) -> Profile:
        if not self._profiles:
            self._profiles = generate_profiles(
                PROFILES_PER_BATCH,
                seed=self.index * 10_007 + self._batches,
                id_prefix=f"c{self.index:03d}-{self._batches}-",
            )
            self._batches += 1
        return self._profiles.pop()

    def run(self) -> None:
        self.start.wait()
        pending: tuple[str, float, str] | None = None  # user_id, joined at, their token
        turn = 0
        while time.monotonic() < self.deadline:
            if pending is None:
                pending = self.join()
            else:
                user_id, joined_at, token = pending
                reply = self.request(
                    "GET", f"/events/{CODE}/attendees/{user_id}/matches", token, expect=200
                )
                if reply is not None and reply[0] == 200 and reply[1]["matches"]:
                    self.tally.join_to_matched_s.append(time.monotonic() - joined_at)
                    pending = None
            if time.monotonic() >= self.deadline:
                break
            self.other(ACTIONS[(self.index + turn) % len(ACTIONS)], pending)
            turn += 1
        if pending is not None:
            self.tally.unmatched_at_stop += 1

    def join(self) -> tuple[str, float, str] | None:
        profile = self._next_profile()
        joined_at = time.monotonic()
        body = profile.model_dump(exclude={"user_id"})
        path = f"/events/{CODE}/attendees/{profile.user_id}"
        reply = self.request("PUT", path, self.service, body, expect=200)
        if reply is None or reply[0] != 200:
            return None
        if reply[1] != {"event": CODE, "user_id": profile.user_id, "status": "joined"}:
            self.tally.unexpected.append(f"PUT {path}: {reply[1]!r}")
        self.tally.joined.append(profile)
        return profile.user_id, joined_at, devauth.mint(self.secret, "attendee", profile.user_id)

    def other(self, action: str, pending: tuple[str, float, str] | None) -> None:
        joined = self.tally.joined
        if action == "edit" and joined:
            profile = self.rng.choice(joined)
            self.tally.edits += 1
            body = profile.model_dump(exclude={"user_id"})
            body["bio"] = f"{profile.bio} Edit {self.tally.edits}."
            path = f"/events/{CODE}/attendees/{profile.user_id}"
            reply = self.request("PUT", path, self.service, body, expect=200)
            if reply is not None and reply[0] == 200 and reply[1]["status"] != "updated":
                self.tally.unexpected.append(f"PUT {path}: {reply[1]!r}")
        elif action == "read_other" and joined:
            user_id = self.rng.choice(joined).user_id
            path = f"/events/{CODE}/attendees/{user_id}/matches"
            reply = self.request("GET", path, self.service, expect=200)
            if reply is not None and reply[0] == 200 and reply[1]["user_id"] != user_id:
                self.tally.unexpected.append(f"GET {path}: the list of {reply[1]['user_id']}")
        elif action == "forbidden" and pending is not None and len(joined) > 1:
            # The newest attendee's token on an older attendee's list: never theirs.
            other = self.rng.choice(joined[:-1]).user_id
            path = f"/events/{CODE}/attendees/{other}/matches"
            self.request("GET", path, pending[2], expect=403)
        elif action == "status":
            self.request("GET", f"/admin/events/{CODE}/status", self.admin, expect=200)
        elif action == "trigger":
            self.request("POST", f"/events/{CODE}/matchmaking", self.service, {}, expect=202)
        else:
            self.request("GET", f"/events/{CODE}", self.service, expect=200)


# --- figures -----------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile; None without samples."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def rounded(value: float | None, scale: float = 1.0, digits: int = 1) -> float | None:
    return None if value is None else round(value * scale, digits)


def wait_for_full_lists(
    server: Server, db_url: str, joined: list[Profile]
) -> tuple[dict[str, Any], dict[str, int], list[str]]:
    """Polls the admin status until nothing is pending, running or waiting for a retry and
    every attendee that joined has a full list; returns the status, the list lengths and
    what is still short."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    keys = {p.user_id: p.company.strip().casefold() for p in joined}
    by_company = Counter(keys.values())
    while True:
        reply = call(server, "GET", f"/admin/events/{CODE}/status", server.admin)
        assert reply.status == 200, reply.text
        status: dict[str, Any] = reply.body
        queue = status["queue"]
        drained = queue["pending"] == queue["running"] == queue["waiting_retry"] == 0
        with psycopg.connect(db_url, autocommit=True) as conn:
            event = repo.fetch_event(conn, CODE)
            assert event is not None
            lengths = {e["user_id"]: len(e["matches"]) for e in repo.export_lists(conn, event.id)}
        k = event.settings.k
        short = []
        for user_id, company in keys.items():
            # Everyone else, less colleagues when the event keeps colleagues apart.
            others = len(keys) - 1
            if company and event.settings.exclude_same_company:
                others = len(keys) - by_company[company]
            if lengths.get(user_id, -1) != min(k, others):
                short.append(f"{user_id}: {lengths.get(user_id)} of {min(k, others)}")
        if drained and not short:
            return status, lengths, short
        if time.monotonic() > deadline:
            return status, lengths, short
        time.sleep(0.5)


# --- the test ----------------------------------------------------------------------------


@pytest.mark.reliability
def test_serve_under_concurrent_load(db_url: str) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="matchmaker-load-"))
    server = launch({**os.environ, "DATABASE_URL": db_url}, workdir)
    try:
        created = call(server, "POST", "/events", server.service, {"code": CODE, "name": "Load"})
        assert created.status == 201, created.text
        secret = devauth.load_secret(devauth.default_secret_path(server.env))

        start = threading.Event()
        load_started = time.monotonic()
        deadline = load_started + LOAD_SECONDS
        clients = [Client(i, server, secret, deadline, start) for i in range(CLIENTS)]
        threads = [
            threading.Thread(target=c.run, name=f"load-client-{c.index}", daemon=True)
            for c in clients
        ]
        for thread in threads:
            thread.start()
        start.set()
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()) + REQUEST_TIMEOUT_S + 10)
        load_s = time.monotonic() - load_started
        stuck = [t.name for t in threads if t.is_alive()]

        tallies = [c.tally for c in clients]
        latencies = [x for t in tallies for x in t.latencies_s]
        join_to_matched = [x for t in tallies for x in t.join_to_matched_s]
        statuses: Counter[int] = sum((t.statuses for t in tallies), Counter())
        connection_errors = [e for t in tallies for e in t.connection_errors]
        unexpected = [u for t in tallies for u in t.unexpected]
        joined = [p for t in tallies for p in t.joined]
        server_errors = sum(n for status, n in statuses.items() if status >= 500)

        drain_started = time.monotonic()
        status, lengths, short = wait_for_full_lists(server, db_url, joined)
        drain_s = time.monotonic() - drain_started

        verify_started = time.monotonic()
        verified = subprocess.run(
            [sys.executable, "-m", "tooling.cli", "verify", CODE],
            cwd=ROOT,
            env={**os.environ, "DATABASE_URL": db_url},
            capture_output=True,
            text=True,
            timeout=VERIFY_TIMEOUT_S,
            check=False,
        )
        verify_s = time.monotonic() - verify_started
        logged_errors = [line[:1000] for line in server.output if '"level":"ERROR"' in line]

        figures: dict[str, Any] = {
            "clients": CLIENTS,
            "triggers": TRIGGERS,
            "load_seconds": round(load_s, 1),
            "requests": len(latencies),
            "throughput_rps": round(len(latencies) / load_s, 1),
            "latency_ms": {
                "p50": rounded(percentile(latencies, 50), 1000),
                "p95": rounded(percentile(latencies, 95), 1000),
                "p99": rounded(percentile(latencies, 99), 1000),
                "max": rounded(max(latencies, default=None), 1000),
            },
            "join_to_matched_s": {
                "samples": len(join_to_matched),
                "p50": rounded(percentile(join_to_matched, 50), digits=2),
                "p95": rounded(percentile(join_to_matched, 95), digits=2),
                "max": rounded(max(join_to_matched, default=None), digits=2),
                "unmatched_at_stop": sum(t.unmatched_at_stop for t in tallies),
            },
            "joined": len(joined),
            "edits": sum(t.edits for t in tallies),
            "statuses": {str(s): n for s, n in sorted(statuses.items())},
            "server_errors_5xx": server_errors,
            "connection_errors": len(connection_errors),
            "unexpected_statuses": len(unexpected),
            "unexpected_samples": unexpected[:5],
            "server_errors_logged": len(logged_errors),
            "drain_s": round(drain_s, 1),
            "lists_checked": len(lengths),
            "verify_s": round(verify_s, 1),
            "verify": verified.stdout.strip().splitlines()[-1:] or [verified.stderr[-300:]],
        }
        print("\nload figures:", json.dumps(figures, indent=2))
        if REPORT_PATH:
            Path(REPORT_PATH).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")

        assert not stuck, f"clients still running after the deadline: {stuck[:5]}"
        assert server.proc.poll() is None, server.diagnostics()
        problems = f"{unexpected[:10]}\n{logged_errors[:5]}\n{server.diagnostics()}"
        assert server_errors == 0, f"{statuses}\n{problems}"
        assert connection_errors == [], f"{connection_errors[:10]}\n{problems}"
        assert unexpected == [], problems
        assert joined and join_to_matched, figures
        assert not short, f"not full after {DRAIN_TIMEOUT_S:.0f}s: {short[:10]}; {status}"
        queue = status["queue"]
        assert sum(queue["pending_by_priority"].values()) == 0 and queue["running"] == 0
        assert queue["waiting_retry"] == 0, status
        assert queue["dead"] == 0 and status["totals"]["failed"] == 0, status
        assert set(lengths) == {p.user_id for p in joined}
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert "verify: OK" in verified.stdout
    finally:
        stop(server)
        shutil.rmtree(workdir, ignore_errors=True)

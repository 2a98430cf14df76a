"""`matchmaker bench --latency`: join-to-match latency through real HTTP against the local
stack (`matchmaker serve`, started in this process so its matchmaker runs can be counted).

An event of `attendees` synthetic people is imported (one transaction, then one wake, as
`matchmaker import` does) and drained. Then, each timed from the 200 of the PUT:

- **steady**: newcomers joining at `rate_per_s`, until `GET …/matches` returns k entries;
- **burst**: `burst` newcomers sent at once (16 connections), each until its full list
  (bounded by the moment the event's queue is idle, see _burst); and the whole burst,
  from the first PUT to the last full list;
- **edit**: existing attendees replacing their profile, until their list changes;
- **bump**: a sample of newcomers joining alone, until every list they enter (the bump
  rule, computed from the stored vectors with the oracle's scoring) shows them.

For each: p50, p95, max and the matchmaker runs started by wakes per 100 writes (every
invocation of the handler, counted as it starts; a woken run lingers, WAKE_LINGER_SECONDS,
and the next phase begins once it has left). The schedule runs every `schedule_s` (60 s,
as on AWS) and is counted apart.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core import aws
from core.data.named_sql import query
from core.data.repository import Conn
from core.matching.scoring import Coefficients, block_dim, combine
from core.models import EventIn, EventRecord, EventSettings, Profile
from core.queue.worker import default_embedder
from core.settings import Settings, get_settings
from tooling import dev_tokens as devauth
from tooling.bench import percentile
from tooling.local_runs import (
    delete_event,
    delete_profiles_with_prefix,
    import_profiles,
    open_database,
)
from tooling.local_stack import LocalStack
from tooling.synthetic import generate_profiles

PREFIX = "lat-"
BURST_CONNECTIONS = 16
RUN_TIMEOUT_S = 90.0  # a local matchmaker run ends within its 60 s context


@dataclass
class LatencyOptions:
    attendees: int = 10_000
    steady: int = 60
    rate_per_s: float = 4.0
    burst: int = 200
    edits: int = 30
    bump_sample: int = 5
    seed: int = 11
    poll_s: float = 0.1
    timeout_s: float = 60.0
    schedule_s: float = 60.0


@dataclass
class Phase:
    name: str
    writes: int
    latencies_s: list[float] = field(default_factory=list)
    timed_out: int = 0
    wake_runs: int = 0
    schedule_runs: int = 0
    note: str = ""

    def p(self, q: float) -> float | None:
        return percentile(self.latencies_s, q) if self.latencies_s else None

    @property
    def runs_per_100(self) -> float:
        return 100.0 * self.wake_runs / self.writes if self.writes else 0.0


@dataclass
class LatencyReport:
    attendees: int
    k: int
    load_s: float
    phases: list[Phase]


class Client:
    """JSON over HTTP with a bearer token (urllib: one connection per request)."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        # the local stack's http:// URL, built here: never a caller's scheme
        request = urllib.request.Request(self.url + path, data, headers, method=method)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                text = response.read().decode()
                return response.status, json.loads(text) if text else None
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def put(self, code: str, profile: Profile) -> float:
        """PUT the attendee; the monotonic time its 200 arrived."""
        body = profile.model_dump(exclude={"user_id"}, exclude_none=True)
        status, reply = self.call("PUT", f"/events/{code}/attendees/{profile.user_id}", body)
        if status != 200:
            raise RuntimeError(f"PUT {profile.user_id}: {status} {reply}")
        return time.monotonic()

    def matches(self, code: str, user_id: str) -> list[str]:
        status, reply = self.call("GET", f"/events/{code}/attendees/{user_id}/matches")
        if status != 200:
            raise RuntimeError(f"GET matches of {user_id}: {status} {reply}")
        return [m["user_id"] for m in reply["matches"]]


def wait_until(check: Callable[[], bool], poll_s: float, timeout_s: float) -> float | None:
    """Poll `check` until it holds: the monotonic time it first did, or None."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(poll_s)
    return None


def run_latency_bench(settings: Settings, options: LatencyOptions) -> LatencyReport:
    stack = LocalStack(settings, port=0, schedule_s=options.schedule_s)
    stack.start()
    try:
        return _measure(stack, options)
    finally:
        stack.stop()


def _runs(stack: LocalStack) -> tuple[int, int]:
    assert stack.scheduler is not None
    runs = dict(stack.scheduler.runs)
    return runs.get("wake", 0), runs.get("schedule", 0) + runs.get("trigger", 0)


def _measure(stack: LocalStack, options: LatencyOptions) -> LatencyReport:
    settings = get_settings()  # the stack's: WAKE_QUEUE_URL, the database
    client = Client(stack.url, devauth.mint(stack.secret, "service", "bench-latency"))
    admin = Client(stack.url, devauth.mint(stack.secret, "admin", "bench-latency"))
    code = f"latency-{options.attendees}"
    event_in = EventIn(code=code, name=code, settings=EventSettings())
    k = event_in.settings.k
    with open_database(settings) as conn:
        delete_event(conn, code)
        # Only this size's people, whose event is gone: deleting another size's attendees
        # would queue work in that event (a departure re-queues its neighbours), and the
        # runs draining it would delay the newcomers measured here.
        delete_profiles_with_prefix(conn, _prefix(options))
        started = time.monotonic()
        crowd = generate_profiles(
            options.attendees, seed=options.seed, id_prefix=_prefix(options) + "a"
        )
        event = import_profiles(conn, event_in, crowd)
        aws.send_wake(settings.wake_queue_url, code, "import")
        _wait_drained(admin, code, options.timeout_s * 10)
        load_s = time.monotonic() - started
        phases = [
            _steady(stack, client, code, k, options),
            _burst(stack, client, code, k, options),
            _edits(stack, client, code, crowd, options),
            _bumps(stack, client, conn, event, options),
        ]
    return LatencyReport(options.attendees, k, load_s, phases)


def _wait_drained(admin: Client, code: str, timeout_s: float) -> None:
    if wait_until(lambda: _event_idle(admin, code), 0.5, timeout_s) is None:
        raise RuntimeError(f"{code} did not drain within {timeout_s:.0f}s")


def _newcomers(options: LatencyOptions, n: int, tag: str, seed: int) -> list[Profile]:
    return generate_profiles(n, seed=options.seed * 1000 + seed, id_prefix=_prefix(options) + tag)


def _prefix(options: LatencyOptions) -> str:
    return f"{PREFIX}{options.attendees}-"


def _phase(stack: LocalStack, name: str, writes: int, run: Callable[[Phase], None]) -> Phase:
    phase = Phase(name, writes)
    # A woken run lingers after the last write it served: a phase starts once the run
    # before it has left and ends once its own last run has, so each phase pays for the
    # runs it needed, the first included (runs are counted as they start).
    assert stack.scheduler is not None
    scheduler = stack.scheduler
    wait_until(lambda: not scheduler.busy, 0.05, RUN_TIMEOUT_S)
    wake0, schedule0 = _runs(stack)
    run(phase)
    wait_until(lambda: not scheduler.busy, 0.05, RUN_TIMEOUT_S)
    wake1, schedule1 = _runs(stack)
    phase.wake_runs, phase.schedule_runs = wake1 - wake0, schedule1 - schedule0
    return phase


def _steady(stack: LocalStack, client: Client, code: str, k: int, options: LatencyOptions) -> Phase:
    people = _newcomers(options, options.steady, "s", 1)

    def join(profile: Profile) -> float | None:
        t0 = client.put(code, profile)
        done = wait_until(
            lambda: len(client.matches(code, profile.user_id)) >= k,
            options.poll_s,
            options.timeout_s,
        )
        return None if done is None else done - t0

    def run(phase: Phase) -> None:
        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=32) as pool:
            futures = []
            for i, profile in enumerate(people):
                time.sleep(max(0.0, start + i / options.rate_per_s - time.monotonic()))
                futures.append(pool.submit(join, profile))
            _collect(phase, [f.result() for f in futures])
        phase.note = f"{options.rate_per_s:g} joins/s"

    return _phase(stack, "steady", len(people), run)


def _burst(stack: LocalStack, client: Client, code: str, k: int, options: LatencyOptions) -> Phase:
    """All PUTs at once; then the event's queue is watched through the admin status (one
    request per poll: polling 200 lists would load the machine the run needs). A
    newcomer's row completes in the commit that writes their list, so the moment the
    event has nothing pending or running bounds every newcomer's latency from above;
    each list is then read once to confirm it is full."""
    people = _newcomers(options, options.burst, "b", 2)
    admin = Client(client.url, devauth.mint(stack.secret, "admin", "bench-latency"))

    def run(phase: Phase) -> None:
        first = time.monotonic()
        with ThreadPoolExecutor(max_workers=BURST_CONNECTIONS) as pool:
            put_at = dict(
                zip(
                    [p.user_id for p in people],
                    pool.map(lambda p: client.put(code, p), people),
                    strict=True,
                )
            )
        drained = wait_until(lambda: _event_idle(admin, code), options.poll_s, options.timeout_s)
        if drained is None:
            phase.timed_out = len(people)
            return
        short = [u for u in put_at if len(client.matches(code, u)) < k]
        _collect(phase, [None if u in short else drained - put_at[u] for u in put_at])
        phase.note = (
            f"first PUT to last full list: {drained - first:.2f} s; "
            f"last PUT answered after {max(put_at.values()) - first:.2f} s"
        )

    return _phase(stack, "burst", len(people), run)


def _event_idle(admin: Client, code: str) -> bool:
    status, body = admin.call("GET", f"/admin/events/{code}/status")
    if status != 200:
        raise RuntimeError(f"status of {code}: {status} {body}")
    queue = body["queue"]
    return bool(queue["pending"] == queue["running"] == 0)


def _edits(
    stack: LocalStack, client: Client, code: str, crowd: list[Profile], options: LatencyOptions
) -> Phase:
    replacements = _newcomers(options, options.edits, "e", 3)
    edited = crowd[: options.edits]

    def edit(pair: tuple[Profile, Profile]) -> float | None:
        person, other = pair
        before = client.matches(code, person.user_id)
        t0 = client.put(code, other.model_copy(update={"user_id": person.user_id}))
        done = wait_until(
            lambda: client.matches(code, person.user_id) != before,
            options.poll_s,
            min(options.timeout_s, 10.0),
        )
        return None if done is None else done - t0

    def run(phase: Phase) -> None:
        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=32) as pool:
            futures = []
            for i, pair in enumerate(zip(edited, replacements, strict=True)):
                time.sleep(max(0.0, start + i / options.rate_per_s - time.monotonic()))
                futures.append(pool.submit(edit, pair))
            _collect(phase, [f.result() for f in futures])
        phase.note = "until the list changed (timed out: an edit that left it as it was)"

    return _phase(stack, "edit", len(edited), run)


def _bumps(
    stack: LocalStack, client: Client, conn: Conn, event: EventRecord, options: LatencyOptions
) -> Phase:
    people = _newcomers(options, options.bump_sample, "p", 4)
    entered_sizes: list[int] = []
    together = 0

    def run(phase: Phase) -> None:
        nonlocal together
        for profile in people:
            kth = _kth_entries(conn, event)
            t0 = client.put(event.code, profile)
            user = profile.user_id

            def own_list_full(user: str = user) -> bool:
                return len(client.matches(event.code, user)) >= event.settings.k

            own = wait_until(own_list_full, options.poll_s, options.timeout_s)
            if own is None:
                phase.timed_out += 1
                continue
            entered = _entered_lists(conn, event, user, kth)
            entered_sizes.append(len(entered))

            def in_every_list(user: str = user, entered: list[str] = entered) -> bool:
                return all(user in client.matches(event.code, u) for u in entered)

            # Working out the lists takes a moment (10,000 vectors): when they all show
            # the newcomer at the first look, they were there when the own list was.
            if in_every_list():
                together += 1
                _collect(phase, [own - t0])
                continue
            done = wait_until(in_every_list, options.poll_s, options.timeout_s)
            _collect(phase, [None if done is None else done - t0])
        mean = sum(entered_sizes) / len(entered_sizes) if entered_sizes else 0.0
        phase.note = (
            f"lists entered per newcomer: mean {mean:.1f}, max {max(entered_sizes or [0])}; "
            f"{together} of {len(entered_sizes)} updated by the time their own list was"
        )

    return _phase(stack, "bump", len(people), run)


def _collect(phase: Phase, latencies: list[float | None]) -> None:
    for latency in latencies:
        if latency is None:
            phase.timed_out += 1
        else:
            phase.latencies_s.append(latency)


def _kth_entries(conn: Conn, event: EventRecord) -> dict[int, tuple[int, float, int]]:
    """profile id -> (list length, score of the last entry, its profile id), before a join."""
    last: dict[int, tuple[int, float, int]] = {}
    for owner, rank, matched, score in conn.execute(query("oracle_lists"), {"event_id": event.id}):
        last[owner] = (int(rank), float(score), int(matched))
    return last


def _entered_lists(
    conn: Conn, event: EventRecord, user_id: str, kth: dict[int, tuple[int, float, int]]
) -> list[str]:
    """The attendees whose list the newcomer enters (the bump rule) against the lists as
    they were before the join: a better score than their k-th entry, or a list not full;
    scored as tooling.oracle scores (the stored quantised vectors, float64)."""
    rows = conn.execute(
        query("oracle_members"),
        {"event_id": event.id, "embedder": default_embedder(event).key},
    ).fetchall()
    members = [(r[0], r[1], (r[2] or "").strip().casefold(), r[8]) for r in rows if r[8]]
    users = {pid: uid for pid, uid, _, _ in members}
    [me] = [m for m in members if m[1] == user_id]
    others = [m for m in members if m[1] != user_id]
    vectors = np.stack([np.frombuffer(m[3], dtype="<i2") for m in others]).astype(np.float64)
    q = np.frombuffer(me[3], dtype="<i2").astype(np.float64)[None, :]
    d = block_dim(vectors.shape[1])
    interests = q[:, :d] @ vectors[:, :d].T
    complement = q[:, d : 2 * d] @ vectors[:, 2 * d : 3 * d].T
    complement = complement + q[:, 2 * d : 3 * d] @ vectors[:, d : 2 * d].T
    bio = q[:, 3 * d :] @ vectors[:, 3 * d :].T
    scores = combine(interests, complement, bio, Coefficients.from_weights(event.settings.weights))[
        0
    ]
    entered = []
    for (pid, uid, company, _), score in zip(others, scores, strict=True):
        if event.settings.exclude_same_company and company and company == me[2]:
            continue
        length, last_score, last_pid = kth.get(pid, (0, float("-inf"), 0))
        better = round(float(score), 6) > round(last_score, 6) or (
            round(float(score), 6) == round(last_score, 6) and user_id < users.get(last_pid, "")
        )
        if length < event.settings.k or better:
            entered.append(uid)
    return entered


COLUMNS = ("phase", "writes", "p50 s", "p95 s", "max s", "timed out", "runs/100", "note")


def format_latency(report: LatencyReport) -> str:
    lines = [
        f"latency: {report.attendees} attendees (k = {report.k}), imported and drained in "
        f"{report.load_s:.1f} s",
        " | ".join(COLUMNS),
    ]
    for phase in report.phases:
        cells = [
            phase.name,
            str(phase.writes),
            *("-" if v is None else f"{v:.2f}" for v in (phase.p(50), phase.p(95), phase.p(100))),
            str(phase.timed_out),
            f"{phase.runs_per_100:.0f}",
            phase.note + (f"; {phase.schedule_runs} schedule runs" if phase.schedule_runs else ""),
        ]
        lines.append(" | ".join(cells))
    return "\n".join(lines)

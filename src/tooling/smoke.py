"""`matchmaker smoke`: an end-to-end check of a running API (the successor of the original
test-matchmaking.js).

Over plain HTTP (standard library only) it creates or reuses an event, adds synthetic
attendees with ids unique to this run, lets the matchmaker match them, dismisses pairs
that were actually matched, lets it re-match, and checks every list it can see: k
entries (fewer only when the event has fewer eligible people), never the attendee
themselves, never a dismissed person in either direction, never a colleague when the
event excludes the same company, scores non-increasing by rank and equal both ways.
Works against `matchmaker serve` and against the deployed API alike.
"""

from __future__ import annotations

import http.client
import json
import re
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from core.models import EVENT_CODE_PATTERN, Profile
from tooling.synthetic import generate_profiles

REQUEST_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.5
HEARTBEAT_S = 5.0  # a progress line at least this often, even when nothing changed
SHOWN_PROBLEMS = 20
BODY_EXCERPT = 500


class SmokeUsageError(ValueError):
    """run_smoke was called with arguments it cannot work with (a usage error)."""


class SmokeError(Exception):
    """An expected failure of the smoke run: unreachable API, an HTTP error, a bad reply."""


class HttpStatusError(SmokeError):
    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        excerpt = body.strip()[:BODY_EXCERPT] or "(empty body)"
        super().__init__(f"{method} {path} -> HTTP {status}: {excerpt}")
        self.status = status
        self.body = body


@dataclass
class SmokeReport:
    users: int
    matched: int = 0
    problems: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    event: str = ""
    dismissed_pairs: list[tuple[str, str]] = field(default_factory=list)
    symmetric_pairs: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and self.matched == self.users


@dataclass(frozen=True)
class _Settings:
    k: int
    exclude_same_company: bool


class _Api:
    """JSON over HTTP with bearer tokens; every failure becomes a SmokeError."""

    def __init__(self, base_url: str, *, deadline: float) -> None:
        self.base_url = base_url
        self.deadline = deadline

    def call(
        self,
        method: str,
        path: str,
        token: str,
        body: Any = None,
        *,
        expect: Iterable[int] = (200,),
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        # The scheme was checked in run_smoke: only http and https reach urlopen.
        request = urllib.request.Request(  # noqa: S310
            self.base_url + path, data=data, headers=headers, method=method
        )
        timeout = max(1.0, min(REQUEST_TIMEOUT_S, self.deadline - time.monotonic()))
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                status, text = response.status, response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read().decode("utf-8", "replace")
        except urllib.error.URLError as exc:
            raise SmokeError(
                f"{method} {path}: cannot reach {self.base_url}: {exc.reason}"
            ) from exc
        except TimeoutError as exc:
            raise SmokeError(f"{method} {path}: no answer within {timeout:.0f}s") from exc
        except (OSError, http.client.HTTPException) as exc:  # reset, cut short, not HTTP
            raise SmokeError(f"{method} {path}: connection failed: {exc}") from exc
        if status not in set(expect):
            raise HttpStatusError(method, path, status, text)
        if not text.strip():
            return status, None
        try:
            return status, json.loads(text)
        except json.JSONDecodeError as exc:
            raise SmokeError(
                f"{method} {path} -> HTTP {status} but the body is not JSON: "
                f"{text[:BODY_EXCERPT]!r}"
            ) from exc


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SmokeError(f"{what}: expected a JSON object, got {json.dumps(value)[:200]}")
    return value


def _field(value: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    item = value.get(key)
    if not isinstance(item, kind) or (kind is int and isinstance(item, bool)):
        raise SmokeError(f"{what}: field {key!r} missing or of the wrong type: {item!r}")
    return item


def _quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")


class _Smoke:
    def __init__(
        self,
        api: _Api,
        event: str,
        *,
        service_token: str,
        admin_token: str,
        out: TextIO,
        report: SmokeReport,
        started: float,
    ) -> None:
        self.api = api
        self.event = event
        self.code = _quote(event)
        self.service = service_token
        self.admin = admin_token
        self.out = out
        self.report = report
        self.started = started

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # --- steps ---------------------------------------------------------------------------

    def ensure_event(self) -> _Settings:
        status, body = self.api.call(
            "POST", "/events", self.service, {"code": self.event}, expect=(200, 201, 409)
        )
        if status == 409:  # exists with other settings: reuse it as it is
            _, body = self.api.call("GET", f"/events/{self.code}", self.service)
            verb = "reusing (its own settings)"
        else:
            verb = "created" if status == 201 else "reusing"
        event = _obj(body, "event")
        settings = _obj(event.get("settings"), "event settings")
        parsed = _Settings(
            k=_field(settings, "k", int, "event settings"),
            exclude_same_company=_field(settings, "exclude_same_company", bool, "event settings"),
        )
        attendees = _field(event, "attendees", int, "event")
        self.say(
            f"event {self.event}: {verb}; k={parsed.k}, exclude_same_company="
            f"{parsed.exclude_same_company}, {attendees} attendees before this run"
        )
        return parsed

    def add_attendees(self, profiles: list[Profile]) -> None:
        t0 = time.monotonic()
        for i, profile in enumerate(profiles, 1):
            path = f"/events/{self.code}/attendees/{_quote(profile.user_id)}"
            body = profile.model_dump(exclude={"user_id"})
            _, reply = self.api.call("PUT", path, self.service, body)
            outcome = _obj(reply, f"PUT {path}").get("status")
            if outcome != "joined":
                self.report.problems.append(
                    f"{profile.user_id}: a new attendee came back {outcome!r}, not 'joined'"
                )
            if i % 50 == 0 and i < len(profiles):
                self.say(f"  added {i}/{len(profiles)}")
        self.say(f"added {len(profiles)} attendees in {time.monotonic() - t0:.1f}s")

    def dismiss(self, user_id: str, dismissed: str) -> None:
        path = f"/events/{self.code}/attendees/{_quote(user_id)}/dismissals"
        self.api.call("POST", path, self.service, {"dismissed_user_id": dismissed}, expect=(204,))
        self.report.dismissed_pairs.append((user_id, dismissed))
        self.say(f"{user_id} dismissed {dismissed}")

    def trigger(self) -> None:
        _, body = self.api.call(
            "POST", f"/events/{self.code}/matchmaking", self.service, {}, expect=(202,)
        )
        reply = _obj(body, "trigger")
        queued = _field(reply, "queued", int, "trigger")
        invoked = reply.get("invoked")
        self.say(f"matchmaking triggered: {queued} queued, matchmaker invoked: {invoked}")

    def wait_until_drained(self, deadline: float) -> bool:
        """Polls the admin status until nothing of the event is pending, running or
        waiting for a retry."""
        last_line, last_shown = "", 0.0
        while True:
            _, body = self.api.call("GET", f"/admin/events/{self.code}/status", self.admin)
            status = _obj(body, "status")
            queue = _obj(status.get("queue"), "status queue")
            pending = _field(queue, "pending", int, "status queue")
            running = _field(queue, "running", int, "status queue")
            waiting = _field(queue, "waiting_retry", int, "status queue")
            coverage = _obj(status.get("coverage"), "status coverage")
            job = status.get("state")
            line = (
                f"  {job}: pending {pending}, running {running}, waiting for a retry "
                f"{waiting}, full lists {coverage.get('full_lists')}/"
                f"{coverage.get('active')}, dead {queue.get('dead')}"
            )
            now = time.monotonic()
            if line != last_line or now - last_shown >= HEARTBEAT_S:
                self.say(f"[{now - self.started:5.1f}s]{line}")
                last_line, last_shown = line, now
            if pending == 0 and running == 0 and waiting == 0:
                return True
            if job == "paused":
                self.report.problems.append(
                    f"event {self.event} is paused: resume it (POST /admin/events/"
                    f"{self.event}/resume) before running the smoke test"
                )
                return False
            if now + POLL_INTERVAL_S >= deadline:
                self.report.problems.append(
                    f"timed out: still {pending} pending, {running} running and {waiting} "
                    f"waiting for a retry after "
                    f"{now - self.started:.0f}s"
                )
                return False
            time.sleep(POLL_INTERVAL_S)

    def lists(self, user_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
        lists: dict[str, list[dict[str, Any]]] = {}
        for user_id in user_ids:
            path = f"/events/{self.code}/attendees/{_quote(user_id)}/matches"
            _, body = self.api.call("GET", path, self.service)
            reply = _obj(body, f"GET {path}")
            if reply.get("user_id") != user_id:
                self.report.problems.append(
                    f"{user_id}: the matches reply names {reply.get('user_id')!r}"
                )
            matches = _field(reply, "matches", list, f"GET {path}")
            lists[user_id] = [_obj(m, f"a match of {user_id}") for m in matches]
        return lists

    def dead_letters(self, ours: set[str]) -> None:
        _, body = self.api.call("GET", f"/admin/events/{self.code}/dead-letters", self.admin)
        rows = body if isinstance(body, list) else []
        for row in rows:
            entry = _obj(row, "dead letter")
            if entry.get("user_id") in ours:
                self.report.problems.append(
                    f"{entry.get('user_id')}: dead after {entry.get('attempts')} attempts: "
                    f"{entry.get('last_error')}"
                )


def _pick_dismissals(
    lists: Mapping[str, list[dict[str, Any]]], ours: list[str]
) -> list[tuple[str, str]]:
    """Up to two (dismisser, dismissed) pairs that are matched right now, both ours, so the
    re-match has something to replace: the first attendee drops their top match, and in
    another pair the listed person dismisses the one listing them (the other direction).
    When none of ours matched each other (a large reused event), one unmatched pair."""
    mine = set(ours)
    pairs: list[tuple[str, str]] = []
    used: set[str] = set()
    for user_id in ours:
        others = [str(m.get("user_id")) for m in lists.get(user_id, [])]
        partner = next((o for o in others if o in mine and o not in used), None)
        if user_id in used or partner is None:
            continue
        pairs.append((user_id, partner) if not pairs else (partner, user_id))
        used.update((user_id, partner))
        if len(pairs) == 2:
            break
    if not pairs and len(ours) >= 2:  # nobody of this run matched another: still exercise it
        pairs.append((ours[0], ours[1]))
    return pairs


def _company_key(profile: Profile) -> str:
    return profile.company.strip().casefold()


def _check_lists(
    report: SmokeReport,
    profiles: list[Profile],
    lists: Mapping[str, list[dict[str, Any]]],
    settings: _Settings,
    *,
    only_ours: bool,
) -> None:
    """Every list of ours against the rules; `only_ours`: nobody else attends the event,
    so the number of eligible people is known exactly."""
    by_id = {p.user_id: p for p in profiles}
    dismissed: dict[str, set[str]] = {p.user_id: set() for p in profiles}
    for a, b in report.dismissed_pairs:
        dismissed[a].add(b)
        dismissed[b].add(a)
    scores: dict[tuple[str, str], float] = {}
    for profile in profiles:
        user_id = profile.user_id
        entries = lists.get(user_id, [])
        problems_before = len(report.problems)
        eligible = sum(
            1
            for other in profiles
            if other.user_id != user_id
            and other.user_id not in dismissed[user_id]
            and not (
                settings.exclude_same_company
                and _company_key(profile)
                and _company_key(other) == _company_key(profile)
            )
        )
        # Others attending (earlier runs, real people) can only add candidates.
        least = min(settings.k, eligible)
        most = least if only_ours else settings.k
        if not least <= len(entries) <= most:
            wanted = str(least) if least == most else f"{least}..{most}"
            report.problems.append(
                f"{user_id}: {len(entries)} matches, expected {wanted} (k={settings.k}, "
                f"{eligible} eligible attendees of this run)"
            )
        seen: set[str] = set()
        previous_rank, previous_score = 0, float("inf")
        for entry in entries:
            other = str(entry.get("user_id"))
            rank, score = entry.get("rank"), entry.get("score")
            if not isinstance(rank, int) or not isinstance(score, int | float):
                report.problems.append(f"{user_id}: malformed match entry {entry!r}")
                continue
            if other == user_id:
                report.problems.append(f"{user_id}: matched with themselves")
            if other in dismissed[user_id]:
                report.problems.append(f"{user_id}: matched with dismissed {other}")
            if other in seen:
                report.problems.append(f"{user_id}: {other} listed twice")
            seen.add(other)
            partner = by_id.get(other)
            if (
                settings.exclude_same_company
                and partner is not None
                and _company_key(profile)
                and _company_key(partner) == _company_key(profile)
            ):
                report.problems.append(
                    f"{user_id}: matched with {other} of the same company ({profile.company})"
                )
            if rank <= previous_rank:
                report.problems.append(f"{user_id}: rank {rank} after rank {previous_rank}")
            if score > previous_score:
                report.problems.append(
                    f"{user_id}: score {score} at rank {rank} is above {previous_score} "
                    f"at rank {previous_rank}"
                )
            previous_rank, previous_score = rank, float(score)
            scores[(user_id, other)] = float(score)
        if len(report.problems) == problems_before and len(entries) >= least:
            report.matched += 1
    for (a, b), score in scores.items():
        if a < b and (b, a) in scores:
            report.symmetric_pairs += 1
            if round(score, 6) != round(scores[(b, a)], 6):
                report.problems.append(
                    f"{a} and {b} list each other with different scores: "
                    f"{score} and {scores[(b, a)]}"
                )


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _summary(report: SmokeReport, out: TextIO) -> None:
    if report.ok:
        print(
            f"smoke: OK - {report.users} attendees of {report.event}, all {report.matched} "
            f"lists correct, {_plural(len(report.dismissed_pairs), 'dismissal')} respected, "
            f"{_plural(report.symmetric_pairs, 'mutual pair')} with equal scores, "
            f"in {report.elapsed_s:.1f}s",
            file=out,
            flush=True,
        )
        return
    print(
        f"smoke: FAILED - {_plural(len(report.problems), 'problem')}; {report.matched} of "
        f"{report.users} attendees with correct lists, in {report.elapsed_s:.1f}s",
        file=out,
    )
    for problem in report.problems[:SHOWN_PROBLEMS]:
        print(f"  {problem}", file=out)
    if len(report.problems) > SHOWN_PROBLEMS:
        print(f"  ... and {len(report.problems) - SHOWN_PROBLEMS} more", file=out)
    out.flush()


def _check_arguments(api_url: str, event: str, users: int, timeout_s: float) -> str:
    parts = urllib.parse.urlsplit(api_url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SmokeUsageError(f"--api-url must be an http(s) URL, got {api_url!r}")
    if not re.fullmatch(EVENT_CODE_PATTERN, event):
        raise SmokeUsageError(
            f"event code {event!r} must be 3-64 letters, digits or hyphens ({EVENT_CODE_PATTERN})"
        )
    if users < 1:
        raise SmokeUsageError(f"--users must be at least 1, got {users}")
    if timeout_s <= 0:
        raise SmokeUsageError(f"the timeout must be positive, got {timeout_s}")
    return api_url.strip().rstrip("/")


def run_smoke(
    api_url: str,
    event: str,
    *,
    users: int,
    service_token: str,
    admin_token: str,
    out: TextIO,
    timeout_s: float = 120,
) -> SmokeReport:
    """Add `users` synthetic attendees to `event` through the API, match, dismiss, re-match
    and check every list. Expected failures (HTTP errors, timeouts, wrong lists) end up in
    the report's problems and the printed summary; SmokeUsageError for bad arguments."""
    base_url = _check_arguments(api_url, event, users, timeout_s)
    started = time.monotonic()
    deadline = started + timeout_s
    report = SmokeReport(users=users, event=event)
    tag = secrets.token_hex(3)
    smoke = _Smoke(
        _Api(base_url, deadline=deadline),
        event,
        service_token=service_token,
        admin_token=admin_token,
        out=out,
        report=report,
        started=started,
    )
    smoke.say(f"smoke test of {base_url}: {users} attendees into {event} (run {tag})")
    profiles = generate_profiles(users, seed=int(tag, 16), id_prefix=f"{event}-{tag}-")
    ours = [p.user_id for p in profiles]
    try:
        settings = smoke.ensure_event()
        smoke.add_attendees(profiles)
        smoke.trigger()
        if smoke.wait_until_drained(deadline):
            for dismisser, dismissed in _pick_dismissals(smoke.lists(ours), ours):
                smoke.dismiss(dismisser, dismissed)
            if report.dismissed_pairs:
                smoke.trigger()  # the dismissal itself re-queued both people
                smoke.wait_until_drained(deadline)
        if not report.problems:
            _, body = smoke.api.call("GET", f"/events/{smoke.code}", service_token)
            active = _field(_obj(body, "event"), "attendees", int, "event")
            _check_lists(report, profiles, smoke.lists(ours), settings, only_ours=active == users)
            smoke.dead_letters(set(ours))
            if report.matched < users and not report.problems:
                report.problems.append(f"only {report.matched} of {users} lists are correct")
    except SmokeError as exc:
        report.problems.append(str(exc))
    report.elapsed_s = time.monotonic() - started
    _summary(report, out)
    return report

"""Local runs shared by the CLI commands: connect, import files, drain, verify, demo, bench."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from core import aws
from core.data import repository as repo
from core.data.connections import connect, resolve_database_url
from core.data.migrations import migrate
from core.data.named_sql import query
from core.data.repository import Conn
from core.embedding.local import LocalEmbedder
from core.embedding.selection import effective_embedder, embedder_for_event
from core.models import EventIn, EventRecord, EventSettings, Profile
from core.queue.worker import BatchResult, Matchmaker, WorkerReport
from core.settings import Settings
from tooling.attendee_files import ParsedImport, RowError, parse_import_file
from tooling.oracle import VerifyReport, verify_event
from tooling.progress import Progress

FOREVER_S = 10.0 * 365 * 24 * 3600
ANALYZE_AFTER_ROWS = 1000


def open_database(settings: Settings) -> Conn:
    """Connect (starting the embedded server if needed) and bring the schema up to date."""
    conn = connect(resolve_database_url(settings), settings, application_name="matchmaker-cli")
    migrate(conn)
    return conn


def drain(
    conn: Conn,
    matchmaker: Matchmaker,
    *,
    batch_size: int | None = None,
    max_seconds: float | None = None,
    show_progress: bool = True,
) -> WorkerReport:
    """Run the worker until the queue is empty (or max_seconds pass), with a progress bar."""
    deadline = time.monotonic() + (max_seconds if max_seconds is not None else FOREVER_S)
    progress = Progress("matching", repo.live_queue_depth(conn)) if show_progress else None
    done = 0

    def on_batch(batch: BatchResult) -> None:
        nonlocal done
        done += batch.completed + batch.failed
        if progress:
            progress.update(done, done + repo.live_queue_depth(conn))

    report = matchmaker.run(conn, deadline=deadline, batch_size=batch_size, on_batch=on_batch)
    if progress:
        progress.finish(done)
    return report


@dataclass(frozen=True)
class Leftover:
    """What a local run left in the queue, over every event (repo.queue_overview)."""

    pending: int = 0  # first attempts not made, in events that are not paused
    paused_pending: int = 0  # first attempts not made, in paused events
    running: int = 0  # claimed by another worker
    waiting_retry: int = 0
    next_retry_at: datetime | None = None
    last_retry_at: datetime | None = None
    dead_by_event: dict[str, int] = field(default_factory=dict)
    paused_events: list[str] = field(default_factory=list)

    @property
    def dead(self) -> int:
        return sum(self.dead_by_event.values())

    @property
    def drained(self) -> bool:
        """Nothing pending, running or waiting for a retry (dead users are apart)."""
        return not (self.pending or self.paused_pending or self.running or self.waiting_retry)


def leftover(conn: Conn) -> Leftover:
    pending = paused_pending = running = waiting = 0
    retries: list[datetime] = []
    dead: dict[str, int] = {}
    paused: list[str] = []
    for row in repo.queue_overview(conn):
        if row["paused"]:
            paused_pending += row["pending"]
            if row["pending"]:
                paused.append(row["event"])
        else:
            pending += row["pending"]
        running += row["running"]
        waiting += row["waiting_retry"]
        retries += [t for t in (row["next_retry_at"], row["last_retry_at"]) if t]
        if row["dead"]:
            dead[row["event"]] = row["dead"]
    return Leftover(
        pending=pending,
        paused_pending=paused_pending,
        running=running,
        waiting_retry=waiting,
        next_retry_at=min(retries, default=None),
        last_retry_at=max(retries, default=None),
        dead_by_event=dead,
        paused_events=paused,
    )


def describe_leftover(left: Leftover, stopped: str) -> list[str]:
    """Why the run stopped, in words: 'drained' only when nothing waits at all."""
    lines = []
    if left.drained:
        lines.append("stopped: drained (nothing pending, running or waiting for a retry)")
    else:
        waits = []
        if left.waiting_retry:
            waits.append(
                f"{_users(left.waiting_retry)} waiting for a retry (next at "
                f"{_clock(left.next_retry_at)}, last at {_clock(left.last_retry_at)}; "
                "run again then)"
            )
        if left.pending:
            cause = "the time limit was reached" if stopped == "deadline" else "not claimed"
            waits.append(f"{_users(left.pending)} pending ({cause})")
        if left.paused_pending:
            waits.append(
                f"{_users(left.paused_pending)} pending in paused events "
                f"({', '.join(left.paused_events)})"
            )
        if left.running:
            waits.append(f"{_users(left.running)} running in another worker")
        lines.append("stopped: not drained: " + "; ".join(waits))
    if left.dead:
        events = ", ".join(f"{code} ({n})" for code, n in left.dead_by_event.items())
        lines.append(
            f"{_users(left.dead)} dead: {events}; `matchmaker status EVENT` shows why "
            "(redrive them once the cause is fixed)"
        )
    return lines


def _users(n: int) -> str:
    return f"{n} user" if n == 1 else f"{n} users"


def _clock(moment: datetime | None) -> str:
    return moment.astimezone().isoformat(timespec="seconds") if moment else "-"


def verify(conn: Conn, event: EventRecord, settings: Settings) -> VerifyReport:
    """Check the event's lists against the embedder in effect for it - the configured one,
    or the local embedder when there is no key or the provider's breaker is open - as the
    worker decides, and say which one that is and why."""
    choice = effective_embedder(
        event,
        settings,
        lambda key: repo.read_breaker(conn, key, settings.provider_probe_interval_s),
    )
    configured = embedder_for_event(event, settings)
    key = configured.key if choice.effective == "openai" else LocalEmbedder().key
    report = verify_event(conn, event, key)
    report.embedder_reason = choice.reason
    return report


def recreate_event(conn: Conn, event: EventIn) -> EventRecord:
    """Drop the event (lists, queue, membership) and create it afresh."""
    with conn.transaction():
        conn.execute(query("delete_event"), {"code": event.code})
        return repo.ensure_event(conn, event)


def delete_event(conn: Conn, code: str) -> None:
    conn.execute(query("delete_event"), {"code": code})


def delete_profiles_with_prefix(conn: Conn, prefix: str) -> None:
    conn.execute(query("delete_profiles_with_prefix"), {"prefix": prefix})


@dataclass
class TimedRun:
    event: EventRecord
    import_s: float
    match_s: float
    report: WorkerReport


def import_and_match(
    conn: Conn,
    matchmaker: Matchmaker,
    event: EventIn,
    profiles: list[Profile],
    *,
    batch_size: int | None = None,
    show_progress: bool = True,
) -> TimedRun:
    t0 = time.perf_counter()
    record = import_profiles(conn, event, profiles)
    t1 = time.perf_counter()
    report = drain(conn, matchmaker, batch_size=batch_size, show_progress=show_progress)
    t2 = time.perf_counter()
    return TimedRun(record, t1 - t0, t2 - t1, report)


def default_event(code: str, name: str = "") -> EventIn:
    return EventIn(code=code, name=name or code, settings=EventSettings())


# --- import files ----------------------------------------------------------------------


@dataclass
class ImportReport:
    event: EventRecord
    imported: int
    errors: list[RowError] = field(default_factory=list)


def import_profiles(conn: Conn, event: EventIn, profiles: list[Profile]) -> EventRecord:
    """Create the event if missing, upsert the profiles and join them, in one transaction."""
    with conn.transaction():
        record = repo.ensure_event(conn, event)
        if profiles:
            repo.upsert_profiles_and_join(conn, record.id, profiles)
    if len(profiles) >= ANALYZE_AFTER_ROWS:
        # Matching starts right away: don't let it plan against pre-import statistics.
        repo.analyze_matching_tables(conn)
    return record


def import_parsed(
    conn: Conn, event: EventIn, parsed: ParsedImport, wake_queue_url: str | None = None
) -> ImportReport:
    """Import the valid rows; when a wake queue is configured (WAKE_QUEUE_URL: the stack's,
    or `matchmaker serve`'s), wake the matchmaker once the import has committed."""
    # Rows that failed validation never reach this point: a bad row writes nothing.
    record = import_profiles(conn, event, [row.profile for row in parsed.rows])
    if parsed.rows:
        aws.send_wake(wake_queue_url, record.code, "import")
    return ImportReport(record, len(parsed.rows), list(parsed.errors))


def import_file(
    conn: Conn, event: EventIn, path: Path, wake_queue_url: str | None = None
) -> ImportReport:
    return import_parsed(conn, event, parse_import_file(path), wake_queue_url)

"""Local orchestration shared by the CLI commands: connect, drain, demo, benchmark."""

from __future__ import annotations

import time
from dataclasses import dataclass

from core import repository as repo
from core.db import connect, resolve_database_url
from core.embedding import embedder_for_event
from core.importer import import_profiles
from core.migrations import migrate
from core.models import EventIn, EventSettings, Profile
from core.oracle import VerifyReport, verify_event
from core.progress import Progress
from core.repository import Conn, EventRecord
from core.settings import Settings
from core.sql_queries import query
from core.worker import BatchResult, Matchmaker, WorkerReport

FOREVER_S = 10.0 * 365 * 24 * 3600


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


def verify(conn: Conn, event: EventRecord, settings: Settings) -> VerifyReport:
    return verify_event(conn, event, embedder_for_event(event, settings).key)


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

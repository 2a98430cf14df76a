"""The matchmaker worker: recover leases, claim batches, embed, match, commit, repeat.

One Matchmaker object lives as long as its process (a warm Lambda container, a CLI run)
and keeps each event's EventState between batches and invocations.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import psycopg

from core import repository as repo
from core.embedder import LocalEmbedder, content_hash
from core.embedding import Embedder, embedder_for_event, icebreaker_writer
from core.engine import EventState
from core.icebreakers import IcebreakerWriter
from core.observability import logger
from core.openai_embedder import ProviderUnavailableError
from core.repository import ClaimedRow, Conn, EventRecord, QueueOutcome
from core.settings import Settings

# Leave room after the last batch: never start one that may not finish by the deadline.
MIN_HEADROOM_S = 0.5
HEADROOM_FACTOR = 1.5


EmbedderFactory = Callable[[EventRecord], Embedder]


def default_embedder(event: EventRecord) -> LocalEmbedder:
    """The local embedder (what every event uses without an OpenAI key)."""
    del event
    return LocalEmbedder()


@dataclass
class BatchResult:
    event_id: int
    claimed: int
    completed: int
    failed: int
    lists_written: int
    dead: list[QueueOutcome]
    duration_s: float
    error: str | None = None


@dataclass
class WorkerReport:
    batches: int = 0
    claimed: int = 0
    completed: int = 0
    failed: int = 0
    lists_written: int = 0
    recovered: int = 0
    dead: list[QueueOutcome] = field(default_factory=list)
    stopped: str = "drained"
    elapsed_s: float = 0.0

    def add(self, batch: BatchResult) -> None:
        self.batches += 1
        self.claimed += batch.claimed
        self.completed += batch.completed
        self.failed += batch.failed
        self.lists_written += batch.lists_written
        self.dead.extend(batch.dead)


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _short_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


class Matchmaker:
    def __init__(
        self,
        settings: Settings,
        embedder_for: EmbedderFactory | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.embedder_for: EmbedderFactory = embedder_for or (
            lambda event: embedder_for_event(event, settings)
        )
        self.deadline: float | None = None
        self.icebreakers: IcebreakerWriter | None = None
        self.worker_id = worker_id or default_worker_id()
        self.states: dict[int, EventState] = {}

    def run(
        self,
        conn: Conn,
        *,
        deadline: float,
        batch_size: int | None = None,
        event_id: int | None = None,
        on_batch: Callable[[BatchResult], None] | None = None,
        on_dead: Callable[[list[QueueOutcome]], None] | None = None,
    ) -> WorkerReport:
        """Process batches until the queue is drained or `deadline` (time.monotonic()) nears.

        Dead rows (attempts exhausted, by failure or lease expiry) are handed to on_dead,
        which sends them to the dead-letter queue in AWS.
        """
        started = time.monotonic()
        self.deadline = deadline
        report = WorkerReport()
        # Safe to skip the WAL flush wait: a worker transaction lost in a server crash
        # rolls back a whole batch, whose rows are still leased and get processed again.
        conn.execute("SET synchronous_commit = off")
        recovered = repo.recover_leases(conn, self.settings.max_attempts)
        report.recovered = len(recovered)
        newly_dead = [row for row in recovered if row.status == "dead"]
        report.dead.extend(newly_dead)
        if newly_dead and on_dead:
            on_dead(newly_dead)
        slowest = 0.0
        while True:
            remaining = deadline - time.monotonic()
            if remaining < max(MIN_HEADROOM_S, HEADROOM_FACTOR * slowest):
                report.stopped = "deadline"
                break
            claimed = repo.claim(
                conn, batch_size or self.settings.batch_size, self.settings.lease_seconds, event_id
            )
            if not claimed:
                break
            batch = self.process_claimed(conn, claimed)
            slowest = max(slowest, batch.duration_s)
            report.add(batch)
            if batch.dead and on_dead:
                on_dead(batch.dead)
            if on_batch:
                on_batch(batch)
        report.elapsed_s = time.monotonic() - started
        return report

    def process_claimed(self, conn: Conn, claimed: list[ClaimedRow]) -> BatchResult:
        """Embed and match one claimed batch (all rows of one event, one lease token).

        A user whose embedding fails is failed alone (backoff, then dead); the rest of the
        batch completes. If matching itself fails, every row of the batch is failed.
        """
        t0 = time.monotonic()
        started_at = datetime.now(UTC)
        event_id, token = claimed[0].event_id, claimed[0].lease_token
        failures: dict[int, str] = {}
        event = repo.fetch_event_by_id(conn, event_id)
        try:
            if event is None:
                raise LookupError(f"event {event_id} no longer exists")
            embedder = self.embedder_for(event)
            ready = self._embed(conn, embedder, claimed, failures)
            with conn.transaction():
                repo.lock_event(conn, event_id)
                if repo.swap_embedder_key(conn, event_id, embedder.key):
                    # Vectors of the old embedder no longer count: re-embed everyone.
                    repo.enqueue_for_matching(
                        conn,
                        event_id,
                        user_ids=None,
                        only_unmatched=False,
                        priority=0,
                        reason="embedder_changed",
                    )
                state = self._state(event, embedder.key, embedder.dim)
                state.refresh(conn)
                changes = state.process([row.profile_id for row in ready])
                written = repo.write_lists(conn, event_id, changes.lists)
                if written:
                    state.lists_version = repo.bump_lists_version(conn, event_id)
                completed = repo.complete(conn, [row.queue_id for row in ready], token)
                outcomes, dead = self._settle(
                    conn,
                    claimed,
                    failures,
                    started_at,
                    completed=completed,
                    lists_written=written,
                    error=next(iter(failures.values()), None),
                )
        except psycopg.OperationalError:
            # The connection is gone: nothing can be recorded now. The leases expire and
            # the next invocation recovers these rows (their attempts are already counted).
            self.states.pop(event_id, None)
            raise
        except Exception as exc:
            # The in-memory state may hold changes that were rolled back: rebuild it.
            self.states.pop(event_id, None)
            error = _short_error(exc)
            logger.exception("batch failed", extra={"event_id": event_id})
            for row in claimed:
                failures.setdefault(row.queue_id, error)
            with conn.transaction():
                outcomes, dead = self._settle(
                    conn,
                    claimed,
                    failures,
                    started_at,
                    completed=0,
                    lists_written=0,
                    error=error,
                    record_batch=event is not None,
                )
            return BatchResult(
                event_id, len(claimed), 0, len(outcomes), 0, dead, time.monotonic() - t0, error
            )
        if event.settings.icebreakers and changes.lists:
            self._write_icebreakers(conn, event_id, changes.lists)
        return BatchResult(
            event_id, len(claimed), completed, len(outcomes), written, dead, time.monotonic() - t0
        )

    def _write_icebreakers(
        self, conn: Conn, event_id: int, lists: dict[int, list[repo.ListEntry]]
    ) -> None:
        """After the lists are committed: an icebreaker can never hold a list back."""
        if self.icebreakers is None:
            self.icebreakers = icebreaker_writer(self.settings)
        if self.icebreakers is None:
            return
        pairs = [(owner, e.matched_profile_id) for owner, entries in lists.items() for e in entries]
        self.icebreakers.write(conn, event_id, pairs, self.deadline)

    def _settle(
        self,
        conn: Conn,
        claimed: list[ClaimedRow],
        failures: dict[int, str],
        started_at: datetime,
        *,
        completed: int,
        lists_written: int,
        error: str | None,
        record_batch: bool = True,
    ) -> tuple[list[QueueOutcome], list[QueueOutcome]]:
        """Fail the failed rows (backoff, or dead) and record the batch's figures."""
        outcomes = repo.fail(conn, failures, claimed[0].lease_token, self.settings)
        dead = [o for o in outcomes if o.status == "dead"]
        if record_batch:
            repo.finish_batch(
                conn,
                event_id=claimed[0].event_id,
                worker_id=self.worker_id,
                started_at=started_at,
                claimed=len(claimed),
                completed=completed,
                failed=len(outcomes),
                dead=len(dead),
                lists_written=lists_written,
                error=error,
            )
        return outcomes, dead

    def _state(self, event: EventRecord, embedder_key: str, width: int) -> EventState:
        state = self.states.get(event.id)
        if (
            state is None
            or state.event.settings != event.settings
            or state.embedder_key != embedder_key
        ):
            state = EventState(event, embedder_key, width)
            self.states[event.id] = state
        return state

    def _embed(
        self, conn: Conn, embedder: Embedder, claimed: list[ClaimedRow], failures: dict[int, str]
    ) -> list[ClaimedRow]:
        """Make the claimed users' vectors current; return the rows ready to match."""
        by_profile = {row.profile_id: row for row in claimed}
        stale = []
        for profile_id, profile, stored_hash in repo.profiles_for_embedding(
            conn, list(by_profile), embedder.key
        ):
            current_hash = content_hash(profile)
            if current_hash != stored_hash:
                stale.append((profile_id, profile, current_hash))
        vectors: list[tuple[int, str, bytes, int]] = []
        if stale:
            try:
                embedded = embedder.embed([profile for _, profile, _ in stale], self.deadline)
                vectors = [
                    (pid, h, np.asarray(vec, dtype="<i2").tobytes(), embedder.dim)
                    for (pid, _, h), vec in zip(stale, embedded, strict=True)
                ]
            except ProviderUnavailableError as exc:
                # The provider is down: one by one would only multiply the requests.
                for pid, _, _ in stale:
                    failures[by_profile[pid].queue_id] = _short_error(exc)
            except Exception:
                # Find the culprit(s): embed one by one so the others still get matched.
                for pid, profile, h in stale:
                    try:
                        vec = embedder.embed([profile], self.deadline)[0]
                        vectors.append(
                            (pid, h, np.asarray(vec, dtype="<i2").tobytes(), embedder.dim)
                        )
                    except Exception as exc:
                        failures[by_profile[pid].queue_id] = _short_error(exc)
            with conn.transaction():
                repo.store_vectors(conn, embedder.key, vectors)
        return [row for row in claimed if row.queue_id not in failures]


def run_worker(
    conn: Conn,
    settings: Settings,
    *,
    deadline: float,
    batch_size: int | None = None,
    event_id: int | None = None,
    matchmaker: Matchmaker | None = None,
    on_dead: Callable[[list[QueueOutcome]], None] | None = None,
) -> WorkerReport:
    """Recover expired leases, then claim and process batches until the queue is drained
    or `deadline` (a time.monotonic() value) nears. Pass a long-lived `matchmaker` to keep
    event state between invocations (a warm Lambda container)."""
    worker = matchmaker or Matchmaker(settings)
    return worker.run(
        conn, deadline=deadline, batch_size=batch_size, event_id=event_id, on_dead=on_dead
    )

"""The matchmaker worker: recover leases, claim batches, embed, match, commit, repeat.

One Matchmaker object lives as long as its process (a warm Lambda container, a CLI run)
and keeps each event's EventState between batches and invocations.
"""

from __future__ import annotations

import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import psycopg

from core.data import repository as repo
from core.data.conflicts import CONFLICT_ERRORS, retry_conflicts
from core.data.repository import ClaimedRow, Conn, QueueOutcome
from core.embedding.errors import OutOfTimeError, ProviderError
from core.embedding.local import LocalEmbedder
from core.embedding.selection import (
    Embedder,
    configured_breaker_key,
    configured_openai_embedder,
    embedder_for_event,
    openai_embedder_key,
)
from core.embedding.vectors import content_hash
from core.matching.engine import EventState, PreparedBatch
from core.models import EventRecord, ListEntry, Profile
from core.observability import logger
from core.queue import loader
from core.queue.breaker import ProviderBreaker
from core.queue.icebreakers import IcebreakerWriter, icebreaker_writer
from core.settings import Settings

# Leave room after the last batch: never start one that may not finish by the deadline.
MIN_HEADROOM_S = 0.5
HEADROOM_FACTOR = 1.5
# Priors of the cost model that sizes bulk batches (a bulk batch is only claimed once a
# batch has been measured): seconds per user, and per scored pair (numpy on one modern
# core scores ~5e7 pairs/s including top-k; a bigger batch soon measures the real one).
INITIAL_ROW_SECONDS = 1e-3
INITIAL_PAIR_SECONDS = 5e-8
# The queue reason of a row enqueued by a join (db/migrations/0003_triggers.sql): its
# wait until the list is written is the newcomer latency operators watch.
NEWCOMER_REASON = "join"


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
    # for the metrics: each completed newcomer's wait from enqueue to the list's commit
    newcomer_latencies_ms: list[float] = field(default_factory=list)
    # users of an event that asks for OpenAI, embedded locally (no key, breaker open)
    fallback_users: int = 0
    # users put back after a provider fault, their attempt not counted
    deferred: int = 0


@dataclass
class StartedBatch:
    """A claimed batch between Matchmaker.start (no lock) and Matchmaker.finish (lock)."""

    claimed: list[ClaimedRow]
    t0: float
    started_at: datetime
    event: EventRecord | None = None
    embedder: Embedder | None = None
    ready: list[ClaimedRow] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)
    state: EventState | None = None
    prepared: PreparedBatch | None = None
    embed_s: float = 0.0
    match_s: float = 0.0
    error: Exception | None = None
    fallback: bool = False
    # a provider fault (or no time left) before the breaker opened: the whole batch goes
    # back to the queue without counting the attempt
    deferred: str | None = None


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
    newcomer_latencies_ms: list[float] = field(default_factory=list)
    fallback_users: int = 0
    deferred: int = 0
    icebreakers_written: int = 0
    breaker_open: bool = False
    # lingering (a woken run): seconds spent polling an empty queue, and the event this
    # run woke a successor for when its deadline left work behind
    lingered_s: float = 0.0
    woke_for: str | None = None

    def add(self, batch: BatchResult) -> None:
        self.batches += 1
        self.deferred += batch.deferred
        self.newcomer_latencies_ms += batch.newcomer_latencies_ms
        self.fallback_users += batch.fallback_users
        self.claimed += batch.claimed
        self.completed += batch.completed
        self.failed += batch.failed
        self.lists_written += batch.lists_written
        self.dead.extend(batch.dead)


@dataclass
class CostModel:
    """How long a batch of r users takes against m users already matchable:
    r * row_seconds (embedding, writes) + r * (m + r) * pair_seconds (scoring).

    Measured on every batch (a moving average), so bulk batches are sized from what this
    machine, this embedder and this database deliver. The pair cost is only learnt from
    batches big enough for the fixed costs of a batch not to dominate it.
    """

    row_seconds: float = INITIAL_ROW_SECONDS
    pair_seconds: float = INITIAL_PAIR_SECONDS
    samples: int = 0
    MIN_PAIRS = 1_000_000

    def rows_within(self, seconds: float, matchable: int) -> int:
        """The largest r whose estimate fits `seconds` (the positive root of the model)."""
        a = self.pair_seconds
        b = self.row_seconds + matchable * self.pair_seconds
        return int((-b + math.sqrt(b * b + 4 * a * seconds)) / (2 * a))

    def observe(self, rows: int, pairs: int, embed_s: float, match_s: float) -> None:
        if rows <= 0:
            return
        keep = 0.5 if self.samples else 0.0
        self.row_seconds = keep * self.row_seconds + (1 - keep) * embed_s / rows
        self.samples += 1
        if pairs >= self.MIN_PAIRS:
            self.pair_seconds = 0.5 * self.pair_seconds + 0.5 * match_s / pairs


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
        self.breaker = ProviderBreaker(settings)
        # probes and switch-backs for the configured provider (tests that inject their
        # own embedders manage the provider themselves)
        self.provider_checks = embedder_for is None
        # provider configurations that failed in this run (breaker still closed): their
        # batches are deferred without a request until the run ends, so an outage costs
        # one batch's attempts per run, not every batch's
        self.provider_failed: dict[str, str] = {}
        self.deadline: float | None = None
        self.icebreakers: IcebreakerWriter | None = None
        self.worker_id = worker_id or default_worker_id()
        self.states: dict[int, EventState] = {}
        self.cost = CostModel()
        self.session: tuple[Conn, int] | None = None
        # how a lingering run waits between polls (tests drive the polls through it)
        self.pause: Callable[[float], None] = time.sleep

    def run(
        self,
        conn: Conn,
        *,
        deadline: float,
        batch_size: int | None = None,
        event_id: int | None = None,
        on_batch: Callable[[BatchResult], None] | None = None,
        on_dead: Callable[[list[QueueOutcome]], None] | None = None,
        first_event_ids: Sequence[int] = (),
        linger_s: float = 0.0,
        wake: Callable[[str], object] | None = None,
    ) -> WorkerReport:
        """Process batches until the queue is drained or `deadline` (time.monotonic()) nears.

        The events of `first_event_ids` (those that woke this run) are served first, in
        that order, each until it has nothing claimable; then every event in turn.
        Dead rows (attempts exhausted, by failure or lease expiry) are handed to on_dead,
        which sends them to the dead-letter queue in AWS.

        With `linger_s` > 0 (a run the wake queue started) the run is *present*: it holds
        a presence lease from the start, and once the queue is dry it keeps polling every
        WAKE_POLL_SECONDS until it has found nothing for `linger_s`; the API sends no wake
        while the lease is valid; an idle run leaves at once when a run that came before
        it is present (that one polls). It leaves by the exit protocol (`_leave`): lease
        deleted and committed, then one last look; work found then is served, or, when the
        deadline leaves no room, handed to a new run through `wake(event_code)`.
        """
        started = time.monotonic()
        self.deadline = deadline
        report = WorkerReport()
        # Safe to skip the WAL flush wait: a worker transaction lost in a server crash
        # rolls back a whole batch, whose rows are still leased and get processed again.
        conn.execute("SET synchronous_commit = off")
        # The cached states trust transaction ids seen on this server. A crash loses the
        # asynchronous commits above and the server hands their ids out again, so a
        # state built before may skip later changes: a new session starts from scratch.
        session = (conn, conn.info.backend_pid)
        if session != self.session:
            self.states.clear()
            self.session = session
        recovered = repo.recover_leases(conn, self.settings.max_attempts)
        report.recovered = len(recovered)
        newly_dead = [row for row in recovered if row.status == "dead"]
        report.dead.extend(newly_dead)
        if newly_dead and on_dead:
            on_dead(newly_dead)
        self.provider_failed.clear()
        self.icebreakers = None  # ICEBREAKERS_PER_RUN is a budget per run
        if self.provider_checks:
            self._check_provider(conn)
        slowest = 0.0  # of regular batches; bulk batches are sized to the time left
        size = batch_size or self.settings.batch_size
        # A run restricted to one event has nothing else to put first.
        first = list(dict.fromkeys(first_event_ids)) if event_id is None else []
        # Only a run free to serve any event may stand in for a wake.
        run_id = uuid.uuid4() if linger_s > 0 and event_id is None else None
        present = run_id is not None
        # another run that came before this one is present: when idle, leave it the polling
        older_present = run_id is not None and self._hold(conn, run_id)
        idle_since: float | None = None
        while True:
            remaining = deadline - time.monotonic()
            headroom = max(MIN_HEADROOM_S, HEADROOM_FACTOR * slowest)
            if remaining < headroom:
                report.stopped = "deadline"
                break
            claimed: list[ClaimedRow] = []
            while first and not claimed:
                claimed = repo.claim(conn, size, self.settings.lease_seconds, first[0])
                if not claimed:
                    first.pop(0)
            if not claimed:
                claimed = repo.claim(conn, size, self.settings.lease_seconds, event_id)
            if not claimed:
                if not present or run_id is None:
                    break
                now = time.monotonic()
                idle_since = now if idle_since is None else idle_since
                poll_s = self.settings.wake_poll_seconds
                lingering = now - idle_since < linger_s and not older_present
                if lingering and remaining - poll_s >= headroom:
                    self.pause(poll_s)
                    report.lingered_s += time.monotonic() - now
                    older_present = self._hold(conn, run_id)
                    continue
                present = False
                left_behind = self._leave(conn, run_id)
                if left_behind is None:
                    break
                # Queued while we were leaving (the API saw our lease and sent no wake).
                if deadline - time.monotonic() < headroom:
                    report.stopped = "deadline"
                    report.woke_for = self._wake_successor(wake, left_behind)
                    break
                present, older_present = True, self._hold(conn, run_id)
                idle_since = None
                continue
            idle_since = None
            if len(claimed) == size:
                claimed += self._claim_backlog(conn, claimed[0].event_id, size, remaining)
            batch = self.process_claimed(conn, claimed)
            if batch.claimed <= size:
                slowest = max(slowest, batch.duration_s)
            report.add(batch)
            if batch.dead and on_dead:
                on_dead(batch.dead)
            if on_batch:
                on_batch(batch)
            if present and run_id is not None:  # a long batch may have let it lapse
                older_present = self._hold(conn, run_id)
        if present and run_id is not None:  # stopped at the deadline while present
            left_behind = self._leave(conn, run_id)
            if left_behind is not None:
                report.woke_for = self._wake_successor(wake, left_behind)
        report.icebreakers_written = self._catch_up_icebreakers(conn)
        if self.provider_checks:
            report.breaker_open = self._breaker_state(conn)
        report.elapsed_s = time.monotonic() - started
        return report

    def _hold(self, conn: Conn, run_id: uuid.UUID) -> bool:
        """Hold or renew this run's presence lease (WAKE_PRESENCE_LEASE_SECONDS); True
        when a run that came before this one is present too."""
        return repo.hold_presence(
            conn, run_id, self.worker_id, self.settings.wake_presence_lease_seconds
        )

    def _leave(self, conn: Conn, run_id: uuid.UUID) -> str | None:
        """The exit protocol of a present run: delete the lease and commit, THEN look for
        claimable work once more; the code of an event that has some, or None.

        Why no wake is lost: the API reads the lease after the commit that queued its
        row. If it saw the lease (and sent no wake), that read came before the lease's
        deletion committed, so this look, which starts after the deletion, sees the row.
        If it did not see the lease, it sent a wake."""
        repo.release_presence(conn, run_id)
        return repo.claimable_event_code(conn)

    @staticmethod
    def _wake_successor(wake: Callable[[str], object] | None, event_code: str) -> str | None:
        """No time left for work queued while this run was present: start another run
        rather than leave it to the schedule."""
        if wake is None:
            return None
        wake(event_code)
        logger.info("woke a successor run", extra={"event_code": event_code})
        return event_code

    def _check_provider(self, conn: Conn) -> None:
        """At the start of a run: probe the provider if its breaker is open and a probe is
        due; while it is closed, queue the events that fell back to switch back. (The SDK
        is loaded only to probe.)"""
        breaker_key = self._configured_breaker_key()
        if breaker_key is None:
            return
        row = self.breaker.read(conn, breaker_key)
        if row is not None and row.probe_due:
            embedder = configured_openai_embedder(self.settings)
            if embedder is not None:
                self.breaker.probe_if_due(conn, embedder, self.deadline)
                row = self.breaker.read(conn, breaker_key)
        if row is None or row.state != "open":
            self.breaker.switch_back(
                conn,
                openai_embedder_key(
                    self.settings.openai_embedding_model,
                    self.settings.openai_embedding_dimensions,
                ),
            )

    def _configured_breaker_key(self) -> str | None:
        try:
            return configured_breaker_key(self.settings)
        except Exception:  # the key cannot be read: batches say so; nothing to check
            logger.warning("provider check skipped: the OpenAI key cannot be read", exc_info=True)
            return None

    def _breaker_state(self, conn: Conn) -> bool:
        breaker_key = self._configured_breaker_key()
        return breaker_key is not None and self.breaker.report_state(conn, breaker_key)

    def _catch_up_icebreakers(self, conn: Conn) -> int:
        """With what is left of the run's icebreaker budget: list entries that never got an
        icebreaker (never asked, or the call failed), oldest first."""
        if self.icebreakers is None:
            self.icebreakers = icebreaker_writer(self.settings)
        writer = self.icebreakers
        if writer is None or writer.remaining <= 0:
            return writer.written if writer else 0
        try:
            missing = repo.icebreakers_missing(conn, writer.remaining)
        except psycopg.Error:
            logger.exception("icebreaker catch-up skipped: cannot read the pairs")
            return writer.written
        by_event: dict[int, list[tuple[int, int]]] = {}
        for event_id, owner, matched in missing:
            by_event.setdefault(event_id, []).append((owner, matched))
        for event_id, pairs in by_event.items():
            writer.write(conn, event_id, pairs, self.deadline)
        return writer.written

    def _claim_backlog(
        self, conn: Conn, event_id: int, claimed: int, remaining_s: float
    ) -> list[ClaimedRow]:
        """A full batch came back, so more is waiting: claim as much more of the same event
        as fits in one bulk batch (BULK_BATCH_SECONDS, half the time left, a third of the
        lease), so a from-scratch drain or a full rematch is a few matrix passes."""
        budget = min(
            self.settings.bulk_batch_seconds,
            (remaining_s - MIN_HEADROOM_S) / 2,
            self.settings.lease_seconds / 3,
        )
        if budget <= 0 or not self.cost.samples:
            return []  # no measurement yet: this batch is the one that calibrates
        state = self.states.get(event_id)
        matchable = state.matchable_count if state is not None else repo.event_size(conn, event_id)
        rows = min(self.cost.rows_within(budget, matchable), self.settings.bulk_max_rows)
        if rows <= claimed:
            return []
        return repo.claim(conn, rows - claimed, self.settings.lease_seconds, event_id)

    def process_claimed(self, conn: Conn, claimed: list[ClaimedRow]) -> BatchResult:
        """Embed and match one claimed batch (all rows of one event).

        A user whose embedding fails is failed alone (backoff, then dead); the rest of the
        batch completes. If matching itself fails, every row of the batch is failed.
        """
        try:
            return retry_conflicts(
                conn,
                lambda: self.finish(conn, self.start(conn, claimed)),
                what="matching batch",
            )
        except CONFLICT_ERRORS as exc:
            # Conflicts persisted (finish dropped the cached state each time): fail the rows
            # (backoff) rather than strand them until their lease expires.
            if conn.broken:
                raise
            failed = StartedBatch(claimed, time.monotonic(), datetime.now(UTC), error=exc)
            return self.finish(conn, failed)

    def start(self, conn: Conn, claimed: list[ClaimedRow]) -> StartedBatch:
        """The part without the event lock, which parallel workers do at the same time:
        embed the claimed users and score them against this worker's snapshot."""
        started = StartedBatch(claimed, time.monotonic(), datetime.now(UTC))
        event_id = claimed[0].event_id
        try:
            started.event = event = repo.fetch_event_by_id(conn, event_id)
            if event is None:
                raise LookupError(f"event {event_id} no longer exists")
            embedder = self.embedder_for(event)
            breaker_key: str | None = getattr(embedder, "breaker_key", None)
            if breaker_key and self.breaker.is_open(conn, breaker_key):
                embedder = LocalEmbedder()  # the whole event, until a probe succeeds
            elif breaker_key and breaker_key in self.provider_failed:
                started.deferred = self.provider_failed[breaker_key]
                return started
            try:
                started.ready = self._embed(conn, embedder, claimed, started.failures)
            except ProviderError as exc:
                if not (breaker_key and self.breaker.record_fault(conn, breaker_key, exc)):
                    started.deferred = _short_error(exc)
                    if breaker_key:
                        self.provider_failed[breaker_key] = started.deferred
                    return started
                embedder = LocalEmbedder()  # it just opened: this batch falls back too
                started.failures.clear()
                started.ready = self._embed(conn, embedder, claimed, started.failures)
            except OutOfTimeError as exc:
                started.deferred = _short_error(exc)
                return started
            else:
                if breaker_key and embedder.key.startswith("openai:"):
                    self.breaker.record_success(conn, breaker_key)
            started.embedder = embedder
            started.fallback = event.settings.embedder == "openai" and not embedder.key.startswith(
                "openai:"
            )
            started.embed_s = time.monotonic() - started.t0
            t_prepare = time.monotonic()
            ids = [row.profile_id for row in started.ready]
            started.state = state = self._refreshed_state(conn, event, embedder, ids)
            started.prepared = state.prepare(ids)
            started.match_s = time.monotonic() - t_prepare
        except psycopg.OperationalError:
            # The connection is gone: nothing can be recorded now. The leases expire and
            # the next invocation recovers these rows (their attempts are already counted).
            self.states.pop(event_id, None)
            raise
        except Exception as exc:
            started.error = exc
        return started

    def finish(self, conn: Conn, started: StartedBatch) -> BatchResult:
        """Under the event lock: bring the prepared batch up to date with whatever changed
        since it was scored, write the lists that differ, complete the rows."""
        claimed, failures = started.claimed, started.failures
        event_id = claimed[0].event_id
        if started.deferred is not None and started.error is None:
            return self._defer(conn, started, started.deferred)
        event, embedder, prepared = started.event, started.embedder, started.prepared
        if started.error is None and event and embedder and prepared:
            try:
                t_apply = time.monotonic()
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
                    state = self._refreshed_state(conn, event, embedder, prepared.profile_ids)
                    if state is not started.state:  # dropped or replaced meanwhile
                        prepared = state.prepare(prepared.profile_ids)
                    changes = state.apply(prepared)
                    waited_ms = repo.lock_queue_rows(conn, [row.queue_id for row in claimed])
                    t_locked = time.monotonic()
                    written = repo.write_lists(conn, event_id, changes.lists)
                    if written:
                        state.lists_version = repo.bump_lists_version(conn, event_id)
                    completed = sum(
                        repo.complete(conn, [row.queue_id for row in rows], token)
                        for token, rows in by_lease(started.ready).items()
                    )
                    outcomes, dead = self._settle(
                        conn,
                        claimed,
                        failures,
                        started.started_at,
                        completed=completed,
                        lists_written=written,
                        error=next(iter(failures.values()), None),
                    )
            except psycopg.OperationalError:
                self.states.pop(event_id, None)
                raise
            except Exception as exc:
                started.error = exc
            else:
                committed_ms = (time.monotonic() - t_locked) * 1000
                newcomers = [
                    waited_ms[row.queue_id] + committed_ms
                    for row in started.ready
                    if row.reason == NEWCOMER_REASON and row.queue_id in waited_ms
                ]
                match_s = started.match_s + time.monotonic() - t_apply
                pairs = len(claimed) * state.matchable_count
                self.cost.observe(len(claimed), pairs, started.embed_s, match_s)
                if event.settings.icebreakers and changes.lists:
                    self._write_icebreakers(conn, event_id, changes.lists)
                return BatchResult(
                    event_id,
                    len(claimed),
                    completed,
                    len(outcomes),
                    written,
                    dead,
                    time.monotonic() - started.t0,
                    newcomer_latencies_ms=newcomers,
                    fallback_users=len(claimed) if started.fallback else 0,
                )

        # The in-memory state may hold changes that were rolled back: rebuild it.
        self.states.pop(event_id, None)
        error = _short_error(started.error or RuntimeError("batch not prepared"))
        logger.error("batch failed", exc_info=started.error, extra={"event_id": event_id})
        for row in claimed:
            failures.setdefault(row.queue_id, error)
        with conn.transaction():
            outcomes, dead = self._settle(
                conn,
                claimed,
                failures,
                started.started_at,
                completed=0,
                lists_written=0,
                error=error,
                record_batch=event is not None,
            )
        return BatchResult(
            event_id,
            len(claimed),
            0,
            len(outcomes),
            0,
            dead,
            time.monotonic() - started.t0,
            error,
        )

    def _defer(self, conn: Conn, started: StartedBatch, error: str) -> BatchResult:
        """Put the whole batch back without counting the attempt (a provider fault is not
        the users' fault; dead letters are for faults of one user)."""
        claimed = started.claimed
        logger.warning(
            "batch deferred after a provider fault",
            extra={"event_id": claimed[0].event_id, "users": len(claimed), "error": error[:300]},
        )
        # Not before this run ends: it sends the provider nothing more (provider_failed),
        # so claiming the rows again now would only spin on the queue.
        left_s = self.deadline - time.monotonic() if self.deadline is not None else 0.0
        delay_s = max(self.settings.provider_defer_s, left_s)
        with conn.transaction():
            deferred = sum(
                repo.defer(conn, {row.queue_id: error for row in rows}, token, delay_s)
                for token, rows in by_lease(claimed).items()
            )
            repo.finish_batch(
                conn,
                event_id=claimed[0].event_id,
                worker_id=self.worker_id,
                started_at=started.started_at,
                claimed=len(claimed),
                completed=0,
                failed=0,
                dead=0,
                lists_written=0,
                error=error,
            )
        return BatchResult(
            claimed[0].event_id,
            len(claimed),
            0,
            0,
            0,
            [],
            time.monotonic() - started.t0,
            error,
            deferred=deferred,
        )

    def _write_icebreakers(
        self, conn: Conn, event_id: int, lists: dict[int, list[ListEntry]]
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
        """Fail the failed rows (backoff, or dead) and record the batch's figures. (mm_fail
        locks its rows in the queue's lock order; a batch that also completes rows has
        locked them all in that order before.)"""
        outcomes: list[QueueOutcome] = []
        for token, rows in by_lease(claimed).items():
            failed = {r.queue_id: failures[r.queue_id] for r in rows if r.queue_id in failures}
            outcomes += repo.fail(conn, failed, token, self.settings)
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

    def _refreshed_state(
        self, conn: Conn, event: EventRecord, embedder: Embedder, profile_ids: list[int]
    ) -> EventState:
        """The event's cached state, refreshed; rebuilt from scratch if it does not know a
        claimed user (a cache that missed changes must not complete them unmatched)."""
        state = self._state(event, embedder.key, embedder.dim)
        loader.refresh(conn, state)
        if all(pid in state.row_of for pid in profile_ids):
            return state
        logger.warning("event cache missed members; reloading", extra={"event_id": event.id})
        self.states.pop(event.id, None)
        state = self._state(event, embedder.key, embedder.dim)
        loader.refresh(conn, state)
        return state

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

    def _embed_halving(
        self,
        embedder: Embedder,
        stale: list[tuple[int, Profile, str]],
        vectors: list[tuple[int, str, bytes, int]],
        errors: dict[int, str],
    ) -> None:
        """Embed (profile id, profile, content hash) triples into `vectors`; inputs the
        provider rejects go to `errors` by profile id.

        Only a rejected input (InputRejectedError, or an unclassified error of an embedder
        that sends no requests, such as a local one failing on a profile) splits a
        request: in halves until the
        culprits are alone, within a budget of about 2*log2(n) + 4 requests per batch (one
        bad profile among thousands costs ~2*log2(n) extra requests); users not isolated
        within it fail this attempt and are narrowed down further on the next. Any other
        fault (the provider is down, rejects the key, answers garbage; no time left)
        propagates at once: splitting would only multiply the requests.
        """
        budget = 2 * max(1, math.ceil(math.log2(len(stale) + 1))) + 4
        pending = [stale]
        while pending:
            part = pending.pop()
            if budget <= 0:
                for pid, _, _ in part:
                    errors[pid] = (
                        "InputRejectedError: the provider rejected an input of this batch; "
                        "not isolated within this attempt's request budget"
                    )
                continue
            budget -= 1
            try:
                embedded = embedder.embed([profile for _, profile, _ in part], self.deadline)
            except (ProviderError, OutOfTimeError):
                raise
            except Exception as exc:  # InputRejectedError, or an embedder failing on input
                if len(part) == 1:
                    errors[part[0][0]] = _short_error(exc)
                else:
                    middle = len(part) // 2
                    pending += [part[middle:], part[:middle]]
                continue
            vectors.extend(
                (pid, h, np.asarray(vec, dtype="<i2").tobytes(), embedder.dim)
                for (pid, _, h), vec in zip(part, embedded, strict=True)
            )

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
        if stale:
            vectors: list[tuple[int, str, bytes, int]] = []
            errors: dict[int, str] = {}
            try:
                self._embed_halving(embedder, stale, vectors, errors)
            finally:  # what was embedded before a provider fault is kept
                if vectors:
                    with conn.transaction():
                        repo.store_vectors(conn, embedder.key, vectors)
            for pid, error in errors.items():
                failures[by_profile[pid].queue_id] = error
        return [row for row in claimed if row.queue_id not in failures]


def by_lease(rows: list[ClaimedRow]) -> dict[uuid.UUID, list[ClaimedRow]]:
    """Claimed rows grouped by lease token (a bulk batch is claimed in two steps)."""
    groups: dict[uuid.UUID, list[ClaimedRow]] = {}
    for row in rows:
        groups.setdefault(row.lease_token, []).append(row)
    return groups


def run_worker(
    conn: Conn,
    settings: Settings,
    *,
    deadline: float,
    batch_size: int | None = None,
    event_id: int | None = None,
    matchmaker: Matchmaker | None = None,
    on_dead: Callable[[list[QueueOutcome]], None] | None = None,
    first_event_ids: Sequence[int] = (),
    linger_s: float = 0.0,
    wake: Callable[[str], object] | None = None,
) -> WorkerReport:
    """Recover expired leases, then claim and process batches (the events of
    `first_event_ids` first) until the queue is drained or `deadline` (a time.monotonic()
    value) nears; with `linger_s`, keep polling that long after the queue ran dry (see
    Matchmaker.run). Pass a long-lived `matchmaker` to keep event state between
    invocations (a warm Lambda container)."""
    worker = matchmaker or Matchmaker(settings)
    return worker.run(
        conn,
        deadline=deadline,
        batch_size=batch_size,
        event_id=event_id,
        on_dead=on_dead,
        first_event_ids=first_event_ids,
        linger_s=linger_s,
        wake=wake,
    )

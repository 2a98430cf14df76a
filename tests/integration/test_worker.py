"""The worker: per-user failure isolation, dead rows, deadlines, batch-size invariance."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import psycopg
import pytest

from core.data import repository as repo
from core.embedding.local import LocalEmbedder
from core.matching.engine import EventState
from core.models import EventIn, EventRecord, EventSettings, Profile
from core.queue.worker import Matchmaker, default_embedder, run_worker
from tests.helpers import PoisonEmbedder, add_attendees, lists_of, queue_rows
from tooling.oracle import verify_event
from tooling.synthetic import generate_profiles


class SlowEmbedder(LocalEmbedder):
    def embed(
        self, profiles: Sequence[Profile], deadline: float | None = None
    ) -> npt.NDArray[np.int16]:
        time.sleep(0.2)
        return super().embed(profiles, deadline)


def drain(conn, worker: Matchmaker, seconds: float = 120, batch_size: int | None = None):
    return worker.run(conn, deadline=time.monotonic() + seconds, batch_size=batch_size)


def assert_exact(conn, event: EventRecord) -> None:
    report = verify_event(conn, event, default_embedder(event).key)
    assert report.ok, (report.mismatches[:3], report.missing_vectors, report.stale_vectors)


def test_a_poison_user_dies_alone_and_everyone_else_is_matched(conn, settings):
    """Given one profile the embedder always rejects, when the queue drains, then that user
    is dead after max_attempts with its error kept, and everyone else has exact lists."""
    people = generate_profiles(40, seed=5, id_prefix="w-")
    event = add_attendees(conn, "poison-1", people)
    embedder = PoisonEmbedder({"w-000007"})
    worker = Matchmaker(settings, embedder_for=lambda _event: embedder)

    report = drain(conn, worker)

    rows = queue_rows(conn, event.id)
    assert [(r["user_id"], r["status"], r["attempts"]) for r in rows] == [
        ("w-000007", "dead", settings.max_attempts)
    ]
    assert "provider rejected the profile of w-000007" in rows[0]["last_error"]
    assert [d.profile_id for d in report.dead] == [rows[0]["profile_id"]]
    lists = lists_of(conn, event.id)
    assert lists["w-000007"] == []
    assert all(len(v) == 3 for u, v in lists.items() if u != "w-000007")
    assert all(m != "w-000007" for v in lists.values() for m, _ in v)
    verdict = verify_event(conn, event, default_embedder(event).key)
    assert verdict.missing_vectors == ["w-000007"]
    assert verdict.mismatches == []
    status = repo.job_status(conn, event.id)
    assert status["queue"]["dead"] == 1
    assert status["job"]["dead_count"] == 1
    assert status["job"]["failed_count"] == settings.max_attempts
    assert "provider rejected" in status["job"]["last_error"]

    # Redrive after the cause is fixed: the user is matched and the event is exact again.
    embedder.poison.clear()
    conn.execute("SELECT mm_redrive(%s)", (event.id,))
    drain(conn, worker)
    assert queue_rows(conn, event.id) == []
    assert_exact(conn, event)


def test_a_failing_batch_fails_its_rows_and_the_next_run_recovers(conn, settings, monkeypatch):
    """Given matching itself raising once, the batch's rows are failed (not lost), the
    worker's cached state is dropped, and a later drain ends exact."""
    event = add_attendees(conn, "crash-1", generate_profiles(30, seed=6, id_prefix="c-"))
    real_apply = EventState.apply
    calls = {"n": 0}

    def flaky(self, prepared):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated bug")
        return real_apply(self, prepared)

    monkeypatch.setattr(EventState, "apply", flaky)
    worker = Matchmaker(settings.model_copy(update={"bulk_batch_seconds": 0}))
    first = drain(conn, worker, batch_size=10)
    assert first.failed == 10
    assert calls["n"] >= 4  # the failed rows were retried (backoff 0 in tests)
    assert queue_rows(conn, event.id) == []
    job = repo.job_status(conn, event.id)["job"]
    assert job["failed_count"] == 10
    assert "simulated bug" in job["last_error"]
    assert_exact(conn, event)


def test_the_worker_stops_before_its_deadline_and_the_next_run_finishes(conn, settings):
    """Given a slow embedder and a short deadline, the run stops early leaving pending
    work; the next invocation drains the rest and the event is exact."""
    event = add_attendees(conn, "deadline-1", generate_profiles(60, seed=8, id_prefix="d-"))
    worker = Matchmaker(settings, embedder_for=lambda _e: SlowEmbedder())

    nothing = run_worker(conn, settings, deadline=time.monotonic(), batch_size=5, matchmaker=worker)
    assert (nothing.batches, nothing.stopped) == (0, "deadline")

    started = time.monotonic()
    partial = worker.run(conn, deadline=started + 1.5, batch_size=5)
    assert partial.stopped == "deadline"
    assert 0 < partial.completed < 60
    assert time.monotonic() - started < 1.5  # no batch started that could overrun it
    assert all(r["status"] == "pending" for r in queue_rows(conn, event.id))

    rest = drain(conn, worker, batch_size=5)
    assert rest.stopped == "drained"
    assert partial.completed + rest.completed == 60
    assert_exact(conn, event)


def test_an_edit_during_processing_reruns_the_user(conn, settings, db_url):
    """Given a claimed batch, when a profile in it is edited before the batch commits, the
    row is re-queued (not deleted) and the final lists use the new profile."""
    event = add_attendees(conn, "rerun-1", generate_profiles(12, seed=9, id_prefix="r-"))
    worker = Matchmaker(settings)
    claimed = repo.claim(conn, 12, 60)
    with psycopg.connect(db_url, autocommit=True) as other:
        other.execute(
            "UPDATE profiles SET interests = '{quantum computing}' WHERE user_id = 'r-000003'"
        )
    worker.process_claimed(conn, claimed)
    rows = queue_rows(conn, event.id)
    assert [(r["user_id"], r["status"], r["reason"], r["priority"]) for r in rows] == [
        ("r-000003", "pending", "rerun", 2)
    ]
    drain(conn, worker)
    assert_exact(conn, event)


@pytest.mark.parametrize(
    ("exclude_same_company", "correction"),
    [(True, "none"), (False, "none"), (True, "hubness"), (False, "hubness")],
)
def test_lists_do_not_depend_on_batch_size_or_worker(
    conn, settings, exclude_same_company, correction
):
    """The same crowd joined into five events, drained with fixed batch sizes 1, 7, 50 and
    300 and with bulk batches, gives identical, exact lists: the bump rule loses nothing
    between batches (under the exposure correction too)."""
    tag = f"{int(exclude_same_company)}{correction[0]}"
    people = generate_profiles(150, seed=11, id_prefix=f"b{tag}-")
    fixed = settings.model_copy(update={"bulk_batch_seconds": 0})
    events = []
    for size in (1, 7, 50, 300, 0):
        event = repo.ensure_event(
            conn,
            EventIn(
                code=f"batch-{size}-{tag}",
                settings=EventSettings(
                    exclude_same_company=exclude_same_company, exposure_correction=correction
                ),
            ),
        )
        add_attendees(conn, event, people)
        if size:
            assert drain(conn, Matchmaker(fixed), batch_size=size).batches == -(-150 // size)
        else:
            assert drain(conn, Matchmaker(settings), batch_size=1).batches <= 4
        events.append(event)
    reference = lists_of(conn, events[0].id)
    assert len(reference) == 150
    for event in events:
        assert lists_of(conn, event.id) == reference
        assert_exact(conn, event)


def test_a_backlog_is_claimed_in_bulk_and_a_failure_in_it_stays_with_its_user(conn, settings):
    """Given 300 newcomers and batch size 20, the first batch calibrates the cost model and
    the second full claim makes the worker claim the rest of the backlog too (a second
    lease token) and match it in one pass; a user
    the embedder rejects in that second claim is failed under its own token (attempts,
    then dead) while the other 299 complete and the event is exact."""
    event = add_attendees(conn, "bulk-1", generate_profiles(300, seed=12, id_prefix="bulk-"))
    embedder = PoisonEmbedder({"bulk-000250"})
    worker = Matchmaker(settings, embedder_for=lambda _event: embedder)
    batches: list[int] = []

    worker.run(
        conn,
        deadline=time.monotonic() + 120,
        batch_size=20,
        on_batch=lambda batch: batches.append(batch.claimed),
    )

    assert batches[:2] == [20, 280]
    assert batches[2:] == [1] * (settings.max_attempts - 1)  # the poisoned user's retries
    rows = queue_rows(conn, event.id)
    assert [(r["user_id"], r["status"], r["attempts"]) for r in rows] == [
        ("bulk-000250", "dead", settings.max_attempts)
    ]
    assert len([u for u, v in lists_of(conn, event.id).items() if len(v) == 3]) == 299
    verdict = verify_event(conn, event, default_embedder(event).key)
    assert (verdict.mismatches, verdict.missing_vectors) == ([], ["bulk-000250"])


def test_bulk_batches_stay_within_their_time_budget(conn, settings):
    """A bulk batch is sized from the measured cost: with a budget too small for more than
    one regular batch, the worker keeps to batches of the regular size."""
    add_attendees(conn, "bulk-2", generate_profiles(100, seed=13, id_prefix="bb-"))
    worker = Matchmaker(settings.model_copy(update={"bulk_batch_seconds": 1e-6}))
    report = drain(conn, worker, batch_size=20)
    assert (report.batches, report.completed) == (5, 100)


@pytest.mark.parametrize("conflicts", [1, 99])
def test_a_deadlocked_batch_is_retried_then_failed_never_stranded(
    conn, settings, monkeypatch, conflicts
):
    """Given the batch's transaction rolled back by a deadlock once, the worker runs the
    batch again and everyone is matched with no attempt spent; given conflicts that
    persist, the rows are failed with backoff (pending, error kept), never left running
    until their lease expires."""
    event = add_attendees(conn, f"deadlock-{conflicts}", generate_profiles(12, seed=9))
    real_write = repo.write_lists
    calls = {"n": 0}

    def conflicting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= conflicts:
            raise psycopg.errors.DeadlockDetected("deadlock detected (simulated)")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(repo, "write_lists", conflicting)
    worker = Matchmaker(settings)
    claimed = repo.claim(conn, 20, 60)
    batch = worker.process_claimed(conn, claimed)

    rows = queue_rows(conn, event.id)
    if conflicts == 1:
        assert (batch.completed, batch.failed, rows) == (12, 0, [])
        assert_exact(conn, event)
    else:
        assert calls["n"] == 3  # CONFLICT_ATTEMPTS
        assert (batch.completed, batch.failed) == (0, 12)
        assert {(r["status"], r["attempts"]) for r in rows} == {("pending", 1)}
        assert all("DeadlockDetected" in r["last_error"] for r in rows)

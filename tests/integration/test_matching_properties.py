"""The invariants of docs/architecture.md under random histories, against the oracle.

Random sequences of join / profile edit / name-only edit / leave / rejoin / dismiss, with
partial drains by two workers (each with its own in-memory cache) in between; then a full
drain must make every list the exact top-k, and re-running the event must change nothing.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.data import repository as repo
from core.data.repository import Conn
from core.matching import engine, screening
from core.models import EventIn, EventRecord, EventSettings, Profile
from core.queue.worker import Matchmaker, StartedBatch, default_embedder
from tests.helpers import add_attendees, lists_of
from tooling.oracle import verify_event

USERS = 10
VOCAB = [
    "AI",
    "climate tech",
    "fintech",
    "seed funding",
    "funding",
    "engineers",
    "engineering",
    "design",
    "mentorship",
    "jobs",
]

# (exposure_correction, hubness_m). Under "hubness" the engine keeps no spare candidates
# (CERTIFY_SPARE 0) and m is small, so that with 10 users most rows hold fewer partners
# by s than exist and their lists by s' need the region of low-r columns.
Exposure = tuple[Literal["none", "hubness"], int]
NONE: Exposure = ("none", 10)
hubness = st.tuples(st.just("hubness"), st.integers(1, 4))
bump_columns = st.sampled_from([0, 2, engine.BUMP_COLUMNS])

tags = st.lists(st.sampled_from(VOCAB), max_size=3, unique=True)
profile_fields = st.fixed_dictionaries(
    {
        "interests": tags,
        "seeking": tags,
        "offering": tags,
        "company": st.sampled_from(["", "Acme", "Globex"]),
        "bio": st.sampled_from(["", "builds climate software", "invests in fintech founders"]),
    }
)
user = st.integers(0, USERS - 1)
operation = st.one_of(
    st.tuples(st.just("join"), user, profile_fields),
    st.tuples(st.just("edit"), user, profile_fields),
    st.tuples(st.just("edit"), user, profile_fields),
    st.tuples(st.just("rename"), user),
    st.tuples(st.just("leave"), user),
    st.tuples(st.just("dismiss"), user, user),
    st.tuples(st.just("drain"), st.integers(1, 3), st.integers(1, 4), st.integers(0, 1)),
    # A worker scores a batch without the lock (start) and commits it later (finish),
    # with anything else in between: another worker's batches, edits of its own users.
    st.tuples(st.just("start"), st.integers(1, 4), st.integers(0, 1)),
    st.tuples(st.just("finish"), st.integers(0, 1)),
)


def drain_batches(conn: Conn, worker: Matchmaker, batches: int, batch_size: int) -> None:
    for _ in range(batches):
        claimed = repo.claim(conn, batch_size, 60)
        if not claimed:
            return
        worker.process_claimed(conn, claimed)


def full_drain(conn: Conn, worker: Matchmaker) -> int:
    report = worker.run(conn, deadline=time.monotonic() + 120, batch_size=3)
    assert report.failed == 0
    return report.lists_written


def matched_crowd(
    conn: Conn,
    worker: Matchmaker,
    initial: list[dict[str, Any]],
    k: int,
    exclude_same_company: bool,
    exposure: Exposure = NONE,
) -> tuple[EventRecord, str]:
    """A new event with the initial crowd, fully matched; returns it and the id prefix."""
    prefix = f"p{uuid.uuid4().hex[:6]}-"
    correction, m = exposure
    event = repo.ensure_event(
        conn,
        EventIn(
            code=f"prop-{uuid.uuid4().hex[:8]}",
            settings=EventSettings(
                k=k,
                exclude_same_company=exclude_same_company,
                exposure_correction=correction,
                hubness_m=m,
            ),
        ),
    )
    add_attendees(
        conn, event, [Profile(user_id=f"{prefix}{i}", **fields) for i, fields in enumerate(initial)]
    )
    full_drain(conn, worker)
    return event, prefix


def rematch_everyone(conn: Conn, event: EventRecord) -> None:
    conn.execute(
        "SELECT mm_enqueue(%s, ARRAY(SELECT profile_id FROM attendees"
        " WHERE event_id = %s AND active), 0::smallint, 'rematch')",
        (event.id, event.id),
    )


def apply(
    conn: Conn,
    event: EventRecord,
    prefix: str,
    op: tuple[Any, ...],
    workers: list[Matchmaker],
    started: list[tuple[Matchmaker, StartedBatch]],
) -> None:
    kind = op[0]
    if kind == "join":
        add_attendees(conn, event, [Profile(user_id=f"{prefix}{op[1]}", **op[2])])
    elif kind == "edit":
        fields = op[2]
        conn.execute(
            "UPDATE profiles SET interests = %s, seeking = %s, offering = %s, company = %s,"
            " bio = %s WHERE user_id = %s",
            (
                fields["interests"],
                fields["seeking"],
                fields["offering"],
                fields["company"],
                fields["bio"],
                f"{prefix}{op[1]}",
            ),
        )
    elif kind == "rename":
        conn.execute(
            "UPDATE profiles SET name = name || 'x' WHERE user_id = %s", (f"{prefix}{op[1]}",)
        )
    elif kind == "leave":
        repo.leave_event(conn, event.id, f"{prefix}{op[1]}")
    elif kind == "dismiss":
        if op[1] != op[2]:
            repo.dismiss(conn, event.id, f"{prefix}{op[1]}", f"{prefix}{op[2]}")
    elif kind == "start":
        _, batch_size, worker = op
        claimed = repo.claim(conn, batch_size, 60)
        if claimed:
            started.append((workers[worker], workers[worker].start(conn, claimed)))
    elif kind == "finish":
        mine = [item for item in started if item[0] is workers[op[1]]]
        if mine:
            started.remove(mine[0])
            mine[0][0].finish(conn, mine[0][1])
    else:
        _, batches, batch_size, worker = op
        drain_batches(conn, workers[worker], batches, batch_size)


@pytest.mark.slow
@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    initial=st.lists(profile_fields, min_size=3, max_size=USERS),
    ops=st.lists(operation, min_size=1, max_size=20),
    k=st.integers(1, 3),
    exclude_same_company=st.booleans(),
    chunk_elements=st.sampled_from([1, 7, 40, engine.CHUNK_ELEMENTS]),
    screening_limits=st.sampled_from(
        [
            (1, 1, 0),
            (3, 2, 0),
            (screening.SCREEN_SAMPLE, screening.WIDE_TIE, engine.EXACT_CHUNK_ROWS),
        ]
    ),
)
def test_random_histories_end_exact_and_stable(
    conn, settings, initial, ops, k, exclude_same_company, chunk_elements, screening_limits
):
    """An initial crowd is matched, then a random history happens; at the end every list
    equals the oracle's, and re-matching everyone (warm or cold cache) rewrites nothing.
    Small chunk sizes make the engine score batches in many chunks (as it does at scale);
    small screening samples make its first thresholds loose, a small WIDE_TIE sends rows
    to the exact full-row path, and EXACT_CHUNK_ROWS 0 screens even one-row chunks."""
    sample, wide_tie, exact_rows = screening_limits
    with (
        mock.patch.object(engine, "CHUNK_ELEMENTS", chunk_elements),
        mock.patch.object(screening, "SCREEN_SAMPLE", sample),
        mock.patch.object(screening, "WIDE_TIE", wide_tie),
        mock.patch.object(engine, "EXACT_CHUNK_ROWS", exact_rows),
    ):
        check_random_history(conn, settings, initial, ops, k, exclude_same_company)


@pytest.mark.slow
@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    initial=st.lists(profile_fields, min_size=3, max_size=USERS),
    ops=st.lists(operation, min_size=1, max_size=20),
    k=st.integers(1, 3),
    exclude_same_company=st.booleans(),
    chunk_elements=st.sampled_from([1, 40, engine.CHUNK_ELEMENTS]),
    exposure=hubness,
    bump=bump_columns,
)
def test_random_histories_end_exact_and_stable_under_hubness(
    conn, settings, initial, ops, k, exclude_same_company, chunk_elements, exposure, bump
):
    """The same random histories under the exposure correction: every list ends equal
    to the oracle's top k by s' (scores bit-identical) and re-matching rewrites nothing.
    BUMP_COLUMNS 0 derives every row afresh at each apply, 2 mixes derivations and the
    bump rule by s', the default mostly bumps."""
    with (
        mock.patch.object(engine, "CHUNK_ELEMENTS", chunk_elements),
        mock.patch.object(engine, "CERTIFY_SPARE", 0),
        mock.patch.object(engine, "BUMP_COLUMNS", bump),
    ):
        check_random_history(conn, settings, initial, ops, k, exclude_same_company, exposure)


def check_random_history(
    conn: Conn,
    settings: Any,
    initial: list[dict[str, Any]],
    ops: list[tuple[Any, ...]],
    k: int,
    exclude_same_company: bool,
    exposure: Exposure = NONE,
) -> None:
    workers = [Matchmaker(settings), Matchmaker(settings)]
    event, prefix = matched_crowd(conn, workers[0], initial, k, exclude_same_company, exposure)
    started: list[tuple[Matchmaker, StartedBatch]] = []
    for op in ops:
        apply(conn, event, prefix, op, workers, started)
    for worker, batch in started:
        worker.finish(conn, batch)

    full_drain(conn, workers[0])
    report = verify_event(conn, event, default_embedder(event).key)
    assert report.ok, (report.mismatches, report.stale_vectors, report.missing_vectors)

    # Stability: re-matching everyone (warm and cold caches) rewrites no list.
    before = lists_of(conn, event.id)
    rematch_everyone(conn, event)
    assert full_drain(conn, workers[1]) == 0
    rematch_everyone(conn, event)
    assert full_drain(conn, Matchmaker(settings)) == 0
    assert lists_of(conn, event.id) == before


change = st.one_of(
    st.tuples(st.just("join"), user, profile_fields),
    st.tuples(st.just("edit"), user, profile_fields),
    st.tuples(st.just("leave"), user),
    st.tuples(st.just("dismiss"), user, user),
)
# One round: changes, worker A scores a batch without the lock, more changes that worker
# B matches and commits, then A commits its batch on top of B's.
parallel_round = st.tuples(
    st.lists(change, min_size=1, max_size=4),
    st.integers(1, 4),
    st.lists(change, max_size=4),
    st.integers(1, 3),
)


@pytest.mark.slow
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    initial=st.lists(profile_fields, min_size=3, max_size=USERS),
    rounds=st.lists(parallel_round, min_size=1, max_size=4),
    k=st.integers(1, 3),
    exclude_same_company=st.booleans(),
)
def test_batches_scored_in_parallel_end_exact(
    conn, settings, initial, rounds, k, exclude_same_company
):
    """Parallel workers score their batches on snapshots and commit in turn: whatever
    another worker committed in between (joins, edits, leaves, dismissals), every list
    ends equal to the oracle's and re-matching changes nothing."""
    check_parallel_rounds(conn, settings, initial, rounds, k, exclude_same_company)


@pytest.mark.slow
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    initial=st.lists(profile_fields, min_size=3, max_size=USERS),
    rounds=st.lists(parallel_round, min_size=1, max_size=4),
    k=st.integers(1, 3),
    exclude_same_company=st.booleans(),
    exposure=hubness,
    bump=bump_columns,
)
def test_batches_scored_in_parallel_end_exact_under_hubness(
    conn, settings, initial, rounds, k, exclude_same_company, exposure, bump
):
    """The parallel rounds under the exposure correction: each worker keeps its own lists
    by s, and still every list ends equal to the oracle's by s'."""
    with (
        mock.patch.object(engine, "CERTIFY_SPARE", 0),
        mock.patch.object(engine, "BUMP_COLUMNS", bump),
    ):
        check_parallel_rounds(conn, settings, initial, rounds, k, exclude_same_company, exposure)


def check_parallel_rounds(
    conn: Conn,
    settings: Any,
    initial: list[dict[str, Any]],
    rounds: list[tuple[Any, ...]],
    k: int,
    exclude_same_company: bool,
    exposure: Exposure = NONE,
) -> None:
    first, second = Matchmaker(settings), Matchmaker(settings)
    event, prefix = matched_crowd(conn, first, initial, k, exclude_same_company, exposure)
    for before, batch_size, between, batches in rounds:
        for op in before:
            apply(conn, event, prefix, op, [first, second], [])
        claimed = repo.claim(conn, batch_size, 60)
        started = first.start(conn, claimed) if claimed else None
        for op in between:
            apply(conn, event, prefix, op, [first, second], [])
        drain_batches(conn, second, batches, 4)
        if started:
            assert first.finish(conn, started).error is None

    full_drain(conn, first)
    report = verify_event(conn, event, default_embedder(event).key)
    assert report.ok, (report.mismatches, report.stale_vectors, report.missing_vectors)
    before_lists = lists_of(conn, event.id)
    rematch_everyone(conn, event)
    assert full_drain(conn, Matchmaker(settings)) == 0
    assert lists_of(conn, event.id) == before_lists

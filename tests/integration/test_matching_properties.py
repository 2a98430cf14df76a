"""Invariants of DESIGN.md §3 under random histories, checked against the brute-force oracle.

Random sequences of join / profile edit / name-only edit / leave / rejoin / dismiss, with
partial drains by two workers (each with its own in-memory cache) in between; then a full
drain must make every list the exact top-k, and re-running the event must change nothing.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import repository as repo
from core.models import EventIn, EventSettings, Profile
from core.oracle import verify_event
from core.repository import Conn, EventRecord
from core.worker import Matchmaker, default_embedder
from tests.helpers import add_attendees, lists_of

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


def rematch_everyone(conn: Conn, event: EventRecord) -> None:
    conn.execute(
        "SELECT mm_enqueue(%s, ARRAY(SELECT profile_id FROM attendees"
        " WHERE event_id = %s AND active), 0::smallint, 'rematch')",
        (event.id, event.id),
    )


def apply(
    conn: Conn, event: EventRecord, prefix: str, op: tuple[Any, ...], workers: list[Matchmaker]
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
)
def test_random_histories_end_exact_and_stable(
    conn, settings, initial, ops, k, exclude_same_company
):
    """An initial crowd is matched, then a random history happens; at the end every list
    equals the oracle's, and re-matching everyone (warm or cold cache) rewrites nothing."""
    prefix = f"p{uuid.uuid4().hex[:6]}-"
    event = repo.ensure_event(
        conn,
        EventIn(
            code=f"prop-{uuid.uuid4().hex[:8]}",
            settings=EventSettings(k=k, exclude_same_company=exclude_same_company),
        ),
    )
    workers = [Matchmaker(settings), Matchmaker(settings)]
    add_attendees(
        conn, event, [Profile(user_id=f"{prefix}{i}", **fields) for i, fields in enumerate(initial)]
    )
    full_drain(conn, workers[0])
    for op in ops:
        apply(conn, event, prefix, op, workers)

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

"""Small helpers shared by the integration tests."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from psycopg.rows import dict_row

from core.data import repository as repo
from core.data.repository import Conn
from core.embedding.local import LocalEmbedder
from core.models import EventIn, EventRecord, EventSettings, Profile
from tooling.local_runs import import_profiles
from tooling.oracle import verify_event

# The tables of the application's data (the migrations also create the ledger and the
# provider breaker's state).
APP_TABLES = (
    "events",
    "profiles",
    "attendees",
    "profile_vectors",
    "dismissals",
    "user_matches",
    "matchmaking_queue",
    "matchmaking_jobs",
    "matchmaking_batches",
    "icebreakers",
)


def queue_rows(conn: Conn, event_id: int | None = None) -> list[dict[str, Any]]:
    """Every queue row (with user_id), oldest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT q.*, p.user_id FROM matchmaking_queue q JOIN profiles p ON p.id = q.profile_id"
            " WHERE %(event_id)s::bigint IS NULL OR q.event_id = %(event_id)s ORDER BY q.id",
            {"event_id": event_id},
        ).fetchall()


def lists_of(conn: Conn, event_id: int) -> dict[str, list[tuple[str, float]]]:
    """user_id -> [(matched user_id, score)] in rank order."""
    out: dict[str, list[tuple[str, float]]] = {}
    for entry in repo.export_lists(conn, event_id):
        out[entry["user_id"]] = [(m["user_id"], m["score"]) for m in entry["matches"]]
    return out


def add_attendees(
    conn: Conn, event: EventRecord | str, profiles: list[Profile], **settings: Any
) -> EventRecord:
    code = event if isinstance(event, str) else event.code
    return import_profiles(conn, EventIn(code=code, settings=EventSettings(**settings)), profiles)


class PoisonEmbedder(LocalEmbedder):
    """Rejects chosen profiles, like an embedding provider refusing one input."""

    def __init__(self, poison: set[str]) -> None:
        super().__init__()
        self.poison = poison
        self.calls = 0

    def embed(
        self, profiles: Sequence[Profile], deadline: float | None = None
    ) -> npt.NDArray[np.int16]:
        self.calls += 1
        bad = [p.user_id for p in profiles if p.user_id in self.poison]
        if bad:
            raise ValueError(f"provider rejected the profile of {bad[0]}")
        return super().embed(profiles, deadline)


def assert_completed_once_and_exact(
    conn: Conn, event: EventRecord, embedder_key: str, n: int
) -> None:
    """Every attendee completed exactly once, in batches that committed whole, and every
    list equals the oracle's."""
    claimed, completed, failed = conn.execute(
        "SELECT sum(claimed), sum(completed), sum(failed) FROM matchmaking_batches"
        " WHERE event_id = %s",
        (event.id,),
    ).fetchone() or (None, None, None)
    assert (claimed, completed, failed) == (n, n, 0)
    report = verify_event(conn, event, embedder_key)
    assert report.ok, (report.mismatches[:3], report.missing_vectors[:3])
    assert report.checked == n


def wait_until_leases_expire(conn: Conn, lease_s: float) -> None:
    """Wait (bounded) until no queue row holds a live lease."""
    deadline = time.monotonic() + lease_s + 10
    while conn.execute(
        "SELECT count(*) FROM matchmaking_queue"
        " WHERE status = 'running' AND lease_expires_at >= now()"
    ).fetchone() != (0,):
        assert time.monotonic() < deadline
        time.sleep(0.05)

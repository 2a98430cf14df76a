"""Feeds the engine from the database: what changed in an event since the last refresh.

The engine (core.matching.engine.EventState) is pure numpy; this is the one place that
reads members, dismissals and stored lists for it, incrementally by transaction-id
watermark, so a warm worker does not reload 10,000 vectors per batch.
"""

from __future__ import annotations

from core.data import repository as repo
from core.data.repository import Conn
from core.matching.engine import EventState


def refresh(conn: Conn, state: EventState) -> set[int]:
    """Bring the state up to date; return the rows whose data may have changed.

    Without the event lock this gives a snapshot to prepare a batch on; with it, the
    state every list is written from (lists are reloaded when another worker wrote).
    """
    event_id = state.event.id
    # Read the watermark first: the queries below run on later snapshots, so every
    # transaction below this xmin is visible to them, and later ones are re-read next time.
    xmin = repo.snapshot_xmin(conn)
    changed = state.update(
        repo.member_rows(conn, event_id, state.embedder_key, state.watermark),
        repo.dismissal_pairs(conn, event_id, state.watermark or 0),
    )
    state.watermark = xmin
    version = repo.lists_version(conn, event_id)
    if version != state.lists_version:
        state.load_lists(repo.event_lists(conn, event_id))
        state.lists_version = version
    return changed

"""Data layer: every database call of the core goes through here, SQL lives in core/sql."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from core.models import EventIn, EventSettings, MatchWeights, Profile
from core.settings import Settings
from core.sql_queries import query

Conn = psycopg.Connection[Any]


@dataclass(frozen=True)
class EventRecord:
    id: int
    code: str
    name: str
    settings: EventSettings


@dataclass(frozen=True)
class ClaimedRow:
    queue_id: int
    event_id: int
    profile_id: int
    priority: int
    reason: str
    attempts: int
    lease_token: uuid.UUID


@dataclass(frozen=True)
class QueueOutcome:
    """A queue row changed by fail / lease recovery (status pending or dead)."""

    queue_id: int
    event_id: int
    profile_id: int
    status: str
    attempts: int
    last_error: str | None


@dataclass(frozen=True)
class MemberRow:
    profile_id: int
    user_id: str
    active: bool
    company: str
    interests: list[str]
    seeking: list[str]
    offering: list[str]
    vector: bytes | None


@dataclass(frozen=True)
class ListEntry:
    rank: int
    matched_profile_id: int
    score: float
    reasons: list[str]


def _event_from_row(row: dict[str, Any]) -> EventRecord:
    settings = EventSettings(
        k=row["k"],
        exclude_same_company=row["exclude_same_company"],
        weights=MatchWeights(
            interests=row["weight_interests"],
            complementarity=row["weight_complement"],
            bio=row["weight_bio"],
        ),
        embedder=row["embedder"],
    )
    return EventRecord(row["id"], row["code"], row["name"], settings)


def fetch_event(conn: Conn, code: str) -> EventRecord | None:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(query("event_by_code"), {"code": code}).fetchone()
    return _event_from_row(row) if row else None


def fetch_event_by_id(conn: Conn, event_id: int) -> EventRecord | None:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(query("event_by_id"), {"event_id": event_id}).fetchone()
    return _event_from_row(row) if row else None


def ensure_event(conn: Conn, event: EventIn) -> EventRecord:
    """Create the event unless its code exists; return the stored event either way."""
    weights = event.settings.weights
    conn.execute(
        query("insert_event"),
        {
            "code": event.code,
            "name": event.name,
            "k": event.settings.k,
            "exclude_same_company": event.settings.exclude_same_company,
            "weight_interests": weights.interests,
            "weight_complement": weights.complementarity,
            "weight_bio": weights.bio,
            "embedder": event.settings.embedder,
        },
    )
    stored = fetch_event(conn, event.code)
    assert stored is not None  # inserted above or already there
    return stored


def upsert_profiles_and_join(conn: Conn, event_id: int, profiles: Sequence[Profile]) -> None:
    """Upsert profiles and make them active attendees, in the caller's transaction.

    Set-based (COPY into a staging table) so a 10,000-row import is one round trip per
    step; the triggers enqueue joins and relevant edits.
    """
    # A second import in the same outer transaction finds the first one's table.
    conn.execute(query("drop_profile_staging"))
    conn.execute(query("create_profile_staging"))
    with conn.cursor() as cur, cur.copy(query("copy_profile_staging")) as copy:
        for p in profiles:
            copy.write_row(
                (p.user_id, p.name, p.company, p.title, p.bio, p.interests, p.seeking, p.offering)
            )
    conn.execute(query("upsert_staged_profiles"))
    conn.execute(query("join_staged_profiles"), {"event_id": event_id})


def analyze_matching_tables(conn: Conn) -> None:
    conn.execute(query("analyze_matching_tables"))


def leave_event(conn: Conn, event_id: int, user_id: str) -> bool:
    cur = conn.execute(query("leave_event"), {"event_id": event_id, "user_id": user_id})
    return cur.rowcount > 0


def dismiss(conn: Conn, event_id: int, user_id: str, dismissed_user_id: str) -> bool:
    cur = conn.execute(
        query("insert_dismissal"),
        {"event_id": event_id, "user_id": user_id, "dismissed_user_id": dismissed_user_id},
    )
    return cur.rowcount > 0


# --- queue -------------------------------------------------------------------------------


def recover_leases(conn: Conn, max_attempts: int) -> list[QueueOutcome]:
    rows = conn.execute(query("recover_leases"), {"max_attempts": max_attempts}).fetchall()
    return [QueueOutcome(*row) for row in rows]


def claim(conn: Conn, batch_size: int, lease_seconds: float) -> list[ClaimedRow]:
    rows = conn.execute(
        query("claim_batch"), {"batch_size": batch_size, "lease_seconds": lease_seconds}
    ).fetchall()
    return [ClaimedRow(*row) for row in rows]


def complete(conn: Conn, queue_ids: Sequence[int], lease_token: uuid.UUID) -> int:
    row = conn.execute(
        query("complete_rows"), {"queue_ids": list(queue_ids), "lease_token": lease_token}
    ).fetchone()
    return int(row[0]) if row else 0


def fail(
    conn: Conn, failures: dict[int, str], lease_token: uuid.UUID, settings: Settings
) -> list[QueueOutcome]:
    if not failures:
        return []
    rows = conn.execute(
        query("fail_rows"),
        {
            "queue_ids": list(failures),
            "errors": list(failures.values()),
            "lease_token": lease_token,
            "max_attempts": settings.max_attempts,
            "backoff_base_s": settings.backoff_base_s,
            "backoff_max_s": settings.backoff_max_s,
        },
    ).fetchall()
    return [QueueOutcome(*row) for row in rows]


# --- embedding ---------------------------------------------------------------------------


def profiles_for_embedding(
    conn: Conn, profile_ids: Sequence[int], embedder: str
) -> list[tuple[int, Profile, str | None]]:
    """(profile id, profile, content hash of its stored vector or None)."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            query("profiles_to_embed"), {"profile_ids": list(profile_ids), "embedder": embedder}
        ).fetchall()
    result = []
    for row in rows:
        profile = Profile.model_construct(
            user_id=row["user_id"],
            name=row["name"],
            company=row["company"],
            title=row["title"],
            bio=row["bio"],
            interests=row["interests"],
            seeking=row["seeking"],
            offering=row["offering"],
        )
        result.append((row["id"], profile, row["content_hash"]))
    return result


def store_vectors(conn: Conn, embedder: str, rows: Iterable[tuple[int, str, bytes, int]]) -> None:
    """rows: (profile id, content hash, int16 vector bytes, dims)."""
    params = [
        {
            "profile_id": pid,
            "embedder": embedder,
            "content_hash": content_hash,
            "vector": vector,
            "dims": dims,
        }
        for pid, content_hash, vector, dims in rows
    ]
    if params:
        with conn.cursor() as cur:
            cur.executemany(query("upsert_vector"), params)


# --- engine state ------------------------------------------------------------------------


def lock_event(conn: Conn, event_id: int) -> None:
    conn.execute(query("lock_event"), {"event_id": event_id})


def snapshot_xmin(conn: Conn) -> int:
    row = conn.execute(query("snapshot_xmin")).fetchone()
    assert row is not None
    return int(row[0])


def member_rows(conn: Conn, event_id: int, embedder: str, since_xid: int | None) -> list[MemberRow]:
    """All members (since_xid None) or those changed by transactions >= since_xid."""
    if since_xid is None:
        cur = conn.execute(query("event_members_all"), {"event_id": event_id, "embedder": embedder})
    else:
        cur = conn.execute(
            query("event_members_changed"),
            {"event_id": event_id, "embedder": embedder, "since": str(since_xid)},
        )
    return [MemberRow(*row) for row in cur.fetchall()]


def dismissal_pairs(conn: Conn, event_id: int, since_xid: int) -> list[tuple[int, int]]:
    rows = conn.execute(
        query("dismissals_changed"), {"event_id": event_id, "since": str(since_xid)}
    ).fetchall()
    return [(a, b) for a, b in rows]


def lists_version(conn: Conn, event_id: int) -> int:
    row = conn.execute(query("lists_version"), {"event_id": event_id}).fetchone()
    return int(row[0]) if row else 0


def event_lists(conn: Conn, event_id: int) -> list[tuple[int, int, int, float]]:
    """(owner, rank, matched, score) for every stored list entry of the event."""
    return [
        (a, b, c, d)
        for a, b, c, d in conn.execute(query("event_lists"), {"event_id": event_id}).fetchall()
    ]


def write_lists(conn: Conn, event_id: int, lists: dict[int, list[ListEntry]]) -> int:
    """Replace the lists of the given owners (delete + COPY: two round trips)."""
    if not lists:
        return 0
    conn.execute(query("delete_lists"), {"event_id": event_id, "owners": list(lists)})
    with conn.cursor() as cur, cur.copy(query("copy_lists")) as copy:
        for owner, entries in lists.items():
            for entry in entries:
                copy.write_row(
                    (
                        event_id,
                        owner,
                        entry.rank,
                        entry.matched_profile_id,
                        entry.score,
                        json.dumps(entry.reasons),
                    )
                )
    return len(lists)


def bump_lists_version(conn: Conn, event_id: int) -> int:
    row = conn.execute(query("bump_lists_version"), {"event_id": event_id}).fetchone()
    return int(row[0]) if row else 0


def finish_batch(
    conn: Conn,
    *,
    event_id: int,
    worker_id: str,
    started_at: datetime,
    claimed: int,
    completed: int,
    failed: int,
    dead: int,
    lists_written: int,
    error: str | None,
) -> None:
    conn.execute(
        query("finish_batch"),
        {
            "event_id": event_id,
            "worker_id": worker_id,
            "started_at": started_at,
            "claimed": claimed,
            "completed": completed,
            "failed": failed,
            "dead": dead,
            "lists_written": lists_written,
            "error": error,
        },
    )


# --- reads -------------------------------------------------------------------------------


def export_lists(conn: Conn, event_id: int) -> list[dict[str, Any]]:
    """One entry per active attendee, in user_id order, with their ranked matches."""
    out: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for user_id, rank, matched, score, reasons in conn.execute(
        query("export_lists"), {"event_id": event_id}
    ):
        if current is None or current["user_id"] != user_id:
            current = {"user_id": user_id, "matches": []}
            out.append(current)
        if matched is not None:
            current["matches"].append(
                {"user_id": matched, "rank": rank, "score": round(score, 6), "reasons": reasons}
            )
    return out


def job_status(conn: Conn, event_id: int) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        job = cur.execute(query("job_status"), {"event_id": event_id}).fetchone() or {}
        queue = cur.execute(query("queue_stats"), {"event_id": event_id}).fetchone() or {}
        counts = cur.execute(query("attendee_counts"), {"event_id": event_id}).fetchone() or {}
    return {"job": job, "queue": queue, "attendees": counts}


def dead_rows(conn: Conn, event_id: int) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query("dead_rows"), {"event_id": event_id}).fetchall()

"""Data layer: every database call of the core goes through here; the SQL itself lives in
named blocks in core/data/sql (core.data.named_sql)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import pq
from psycopg.rows import dict_row

from core.data.named_sql import query
from core.models import (
    EventIn,
    EventRecord,
    EventSettings,
    ListEntry,
    MatchWeights,
    MemberRow,
    Profile,
)
from core.settings import Settings

Conn = psycopg.Connection[Any]


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
        icebreakers=row["icebreakers"],
        exposure_correction=row["exposure_correction"],
        hubness_m=row["hubness_m"],
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
            "icebreakers": event.settings.icebreakers,
            "exposure_correction": event.settings.exposure_correction,
            "hubness_m": event.settings.hubness_m,
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


def update_event_settings(conn: Conn, event_id: int, settings: EventSettings) -> None:
    conn.execute(
        query("update_event_settings"),
        {
            "event_id": event_id,
            "k": settings.k,
            "exclude_same_company": settings.exclude_same_company,
            "weight_interests": settings.weights.interests,
            "weight_complement": settings.weights.complementarity,
            "weight_bio": settings.weights.bio,
            "embedder": settings.embedder,
            "icebreakers": settings.icebreakers,
            "exposure_correction": settings.exposure_correction,
            "hubness_m": settings.hubness_m,
        },
    )


def upsert_attendee(conn: Conn, event_id: int, profile: Profile) -> str:
    """Upsert one profile and make it an active attendee: 'joined', 'updated' or 'unchanged'."""
    params = {"event_id": event_id, **profile.model_dump()}
    before = conn.execute(query("attendee_state"), params).fetchone()
    upsert_profiles_and_join(conn, event_id, [profile])
    if before is None or not before[2]:
        return "joined"
    return "unchanged" if before[1] else "updated"


def attendee_matches(conn: Conn, event_id: int, user_id: str) -> list[dict[str, Any]] | None:
    """The attendee's ranked matches, or None when they are not an active attendee."""
    rows = conn.execute(
        query("attendee_matches"), {"event_id": event_id, "user_id": user_id}
    ).fetchall()
    if not rows:
        return None
    return [
        {
            "user_id": other,
            "rank": rank,
            "score": round(score, 6),
            "reasons": reasons,
            "icebreaker": icebreaker,
        }
        for other, rank, score, reasons, icebreaker in rows
        if other is not None
    ]


def both_attend(conn: Conn, event_id: int, user_id: str, other_id: str) -> bool:
    row = conn.execute(
        query("active_attendee_count"), {"event_id": event_id, "user_ids": [user_id, other_id]}
    ).fetchone()
    return bool(row and row[0] == 2)


def event_size(conn: Conn, event_id: int) -> int:
    """Active attendees of the event."""
    row = conn.execute(query("event_size"), {"event_id": event_id}).fetchone()
    return int(row[0]) if row else 0


def enqueue_for_matching(
    conn: Conn,
    event_id: int,
    *,
    user_ids: list[str] | None,
    only_unmatched: bool,
    priority: int,
    reason: str,
) -> int:
    """Queue the given active attendees, or every active attendee (optionally only those
    without a list yet). Returns how many rows were queued or coalesced."""
    if user_ids is not None:
        cur = conn.execute(
            query("enqueue_users"),
            {"event_id": event_id, "user_ids": user_ids, "priority": priority, "reason": reason},
        )
    else:
        cur = conn.execute(
            query("enqueue_active"),
            {
                "event_id": event_id,
                "only_unmatched": only_unmatched,
                "priority": priority,
                "reason": reason,
            },
        )
    row = cur.fetchone()
    return int(row[0]) if row else 0


def throughput(conn: Conn, event_id: int) -> dict[str, float]:
    """Users completed per minute over the last 5 and 60 minutes."""
    row = conn.execute(query("throughput"), {"event_id": event_id}).fetchone()
    assert row is not None
    return {"5m": float(row[0]), "60m": float(row[1])}


def job_is_paused(conn: Conn, event_id: int) -> bool:
    row = conn.execute(query("job_is_paused"), {"event_id": event_id}).fetchone()
    return bool(row and row[0])


def swap_embedder_key(conn: Conn, event_id: int, embedder_key: str) -> bool:
    """Record the event's embedder; True when it replaced a different one."""
    row = conn.execute(
        query("swap_embedder_key"), {"event_id": event_id, "embedder_key": embedder_key}
    ).fetchone()
    return row is not None and row[0] is not None


def set_job_paused(conn: Conn, event_id: int, paused: bool) -> None:
    conn.execute(query("pause_job" if paused else "resume_job"), {"event_id": event_id})


def redrive_dead(conn: Conn, event_id: int, profile_ids: list[int] | None) -> int:
    row = conn.execute(
        query("redrive_dead"), {"event_id": event_id, "profile_ids": profile_ids}
    ).fetchone()
    return int(row[0]) if row else 0


def icebreaker_pairs(
    conn: Conn, event_id: int, pairs: list[tuple[int, int]]
) -> list[dict[str, Any]]:
    if not pairs:
        return []
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            query("icebreaker_pairs"),
            {
                "event_id": event_id,
                "owners": [a for a, _ in pairs],
                "matched": [b for _, b in pairs],
            },
        ).fetchall()


def store_icebreaker(
    conn: Conn, event_id: int, *, owner: int, matched: int, pair_hash: str, text: str
) -> None:
    conn.execute(
        query("upsert_icebreaker"),
        {
            "event_id": event_id,
            "profile_id": owner,
            "matched_profile_id": matched,
            "pair_hash": pair_hash,
            "text": text,
        },
    )


# --- queue -------------------------------------------------------------------------------


def recover_leases(conn: Conn, max_attempts: int) -> list[QueueOutcome]:
    rows = conn.execute(query("recover_leases"), {"max_attempts": max_attempts}).fetchall()
    return [QueueOutcome(*row) for row in rows]


def claim(
    conn: Conn, batch_size: int, lease_seconds: float, event_id: int | None = None
) -> list[ClaimedRow]:
    """Claim a batch of one event (the next in turn, or `event_id` when given)."""
    rows = conn.execute(
        query("claim_batch"),
        {"batch_size": batch_size, "lease_seconds": lease_seconds, "event_id": event_id},
    ).fetchall()
    return [ClaimedRow(*row) for row in rows]


def lock_queue_rows(conn: Conn, queue_ids: Sequence[int]) -> dict[int, float]:
    """Lock rows in the queue's lock order (call inside the transaction that settles them);
    returns the milliseconds each has waited since it was enqueued, by queue id."""
    rows = conn.execute(query("lock_queue_rows"), {"queue_ids": list(queue_ids)}).fetchall()
    return {int(queue_id): float(waited_ms) for queue_id, waited_ms in rows}


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


def describe_queue_outcomes(conn: Conn, outcomes: list[QueueOutcome]) -> list[dict[str, Any]]:
    """Dead-letter messages: each outcome with its event code and user id."""
    if not outcomes:
        return []
    with conn.cursor(row_factory=dict_row) as cur:
        names = {
            (row["event_id"], row["profile_id"]): row
            for row in cur.execute(
                query("describe_queue_outcomes"),
                {
                    "event_ids": [o.event_id for o in outcomes],
                    "profile_ids": [o.profile_id for o in outcomes],
                },
            )
        }
    messages = []
    for o in outcomes:
        known = names.get((o.event_id, o.profile_id), {})
        messages.append(
            {
                "type": "matchmaking.dead",
                "event_id": o.event_id,
                "event_code": known.get("event_code"),
                "profile_id": o.profile_id,
                "user_id": known.get("user_id"),
                "queue_id": o.queue_id,
                "attempts": o.attempts,
                "last_error": o.last_error,
            }
        )
    return messages


# --- embedding ---------------------------------------------------------------------------


def profiles_for_embedding(
    conn: Conn, profile_ids: Sequence[int], embedder: str
) -> list[tuple[int, Profile, str | None]]:
    """(profile id, profile, content hash of its stored vector or None)."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            query("profiles_to_embed"), {"profile_ids": list(profile_ids), "embedder": embedder}
        ).fetchall()
    return [(row["id"], profile_from_row(row), row["content_hash"]) for row in rows]


def profile_from_row(row: dict[str, Any]) -> Profile:
    """A stored profile (already validated on the way in) from a dict_row."""
    return Profile.model_construct(
        **{name: row[name] for name in Profile.model_fields if name in row}
    )


def store_vectors(conn: Conn, embedder: str, rows: Iterable[tuple[int, str, bytes, int]]) -> None:
    """rows: (profile id, content hash, int16 vector bytes, dims). Call inside a transaction:
    COPY into a staging table, then one upsert (thousands of vectors in three round trips)."""
    rows = list(rows)
    if not rows:
        return
    conn.execute(query("create_vector_staging"))
    with conn.cursor() as cur, cur.copy(query("copy_vector_staging")) as copy:
        for pid, content_hash, vector, dims in rows:
            copy.write_row((pid, content_hash, dims, vector))
    conn.execute(query("upsert_staged_vectors"), {"embedder": embedder})


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


def live_queue_depth(conn: Conn) -> int:
    row = conn.execute(query("live_queue_count")).fetchone()
    return int(row[0]) if row else 0


def pending_by_priority(conn: Conn) -> tuple[int, int, int, int]:
    """Pending rows of the whole queue at priorities 0, 1, 2 and 3."""
    row = conn.execute(query("pending_by_priority")).fetchone()
    p0, p1, p2, p3 = (int(n) for n in row) if row else (0, 0, 0, 0)
    return p0, p1, p2, p3


def oldest_pending_age_s(conn: Conn) -> float:
    row = conn.execute(query("oldest_pending_age")).fetchone()
    return float(row[0]) if row else 0.0


def job_status(conn: Conn, event_id: int) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        job = cur.execute(query("job_status"), {"event_id": event_id}).fetchone() or {}
        queue = cur.execute(query("queue_stats"), {"event_id": event_id}).fetchone() or {}
        counts = cur.execute(query("attendee_counts"), {"event_id": event_id}).fetchone() or {}
    return {"job": job, "queue": queue, "attendees": counts}


def dead_rows(conn: Conn, event_id: int) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query("dead_rows"), {"event_id": event_id}).fetchall()


# --- status ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusFigures:
    """The rows behind an event's status: its queue now, its job row (None before any
    work), coverage and exposure of its lists."""

    queue: dict[str, Any]
    job: dict[str, Any] | None
    coverage: dict[str, Any]
    exposure: dict[str, Any]


def status_figures(conn: Conn, event_id: int) -> StatusFigures:
    """Read in one snapshot (repeatable read, unless the caller's transaction is already
    under way), so that the figures agree with each other."""
    params = {"event_id": event_id}
    outermost = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        if outermost:
            cur.execute(query("repeatable_read"))
        queue = cur.execute(query("status_queue_now"), params).fetchone() or {}
        job = cur.execute(query("status_job"), params).fetchone()
        coverage = cur.execute(query("status_coverage"), params).fetchone() or {}
        exposure = cur.execute(query("status_exposure"), params).fetchone() or {}
    return StatusFigures(queue, job, coverage, exposure)


def queue_overview(conn: Conn) -> list[dict[str, Any]]:
    """Per event with queue rows: pending, running, waiting for a retry (and until when)
    and dead users, and whether the event is paused."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query("status_queue_overview")).fetchall()


# --- provider circuit breaker (0009) -----------------------------------------------------


@dataclass(frozen=True)
class BreakerRow:
    """A provider configuration's circuit breaker as stored."""

    state: str  # "closed" | "open"
    reason: str | None
    failing_since: datetime | None
    opened_at: datetime | None
    last_probe_at: datetime | None
    probe_due: bool


def defer(conn: Conn, deferrals: dict[int, str], lease_token: uuid.UUID, delay_s: float) -> int:
    """Put leased rows back (pending after ~delay_s) without counting the attempt."""
    if not deferrals:
        return 0
    row = conn.execute(
        query("defer_rows"),
        {
            "queue_ids": list(deferrals),
            "errors": list(deferrals.values()),
            "lease_token": lease_token,
            "delay_s": delay_s,
        },
    ).fetchone()
    return int(row[0]) if row else 0


def read_breaker(conn: Conn, config_key: str, probe_interval_s: float) -> BreakerRow | None:
    row = conn.execute(
        query("breaker_read"), {"config_key": config_key, "probe_interval_s": probe_interval_s}
    ).fetchone()
    return BreakerRow(*row) if row else None


def record_provider_fault(
    conn: Conn, config_key: str, *, permanent: bool, reason: str, window_s: float
) -> tuple[str, str, datetime | None]:
    """(state before, state after, opened at) of the breaker after this fault."""
    row = conn.execute(
        query("breaker_fault"),
        {
            "config_key": config_key,
            "permanent": permanent,
            "reason": reason[:2000],
            "window_s": window_s,
        },
    ).fetchone()
    assert row is not None
    return str(row[0]), str(row[1]), row[2]


def record_provider_success(conn: Conn, config_key: str) -> str | None:
    """Close the breaker; the previous state when that changed anything, else None."""
    row = conn.execute(query("breaker_success"), {"config_key": config_key}).fetchone()
    return str(row[0]) if row else None


def claim_breaker_probe(conn: Conn, config_key: str, probe_interval_s: float) -> bool:
    row = conn.execute(
        query("breaker_claim_probe"),
        {"config_key": config_key, "probe_interval_s": probe_interval_s},
    ).fetchone()
    return row is not None


def events_to_switch_back(conn: Conn, embedder_key: str) -> list[int]:
    rows = conn.execute(query("events_to_switch_back"), {"embedder_key": embedder_key})
    return [int(r[0]) for r in rows.fetchall()]


def icebreakers_missing(conn: Conn, limit: int) -> list[tuple[int, int, int]]:
    """(event id, owner, matched) of list entries without an icebreaker, oldest first."""
    rows = conn.execute(query("icebreakers_missing"), {"limit": limit}).fetchall()
    return [(int(e), int(o), int(m)) for e, o, m in rows]


def icebreaker_coverage(conn: Conn, event_id: int) -> tuple[int, int]:
    """(list entries, entries with an icebreaker) of the event."""
    row = conn.execute(query("status_icebreakers"), {"event_id": event_id}).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


# --- presence of lingering matchmaker runs (db/migrations/0011) ----------------------------


def hold_presence(conn: Conn, run_id: uuid.UUID, worker_id: str, lease_s: float) -> bool:
    """Hold or renew a run's presence lease for `lease_s` seconds (the database's clock);
    True when another run that came before this one is present."""
    row = conn.execute(
        query("hold_presence"), {"run_id": run_id, "worker_id": worker_id, "lease_s": lease_s}
    ).fetchone()
    return bool(row and row[0])


def release_presence(conn: Conn, run_id: uuid.UUID) -> None:
    """Delete the run's lease, committed on return: the caller must not be inside a
    transaction, or the API could still see the lease after the run's last look."""
    if not conn.autocommit or conn.info.transaction_status != pq.TransactionStatus.IDLE:
        raise RuntimeError("release_presence must commit: an autocommit connection, no transaction")
    conn.execute(query("release_presence"), {"run_id": run_id})


def matchmaker_present(conn: Conn) -> bool:
    """Whether any matchmaker run holds a valid presence lease."""
    row = conn.execute(query("matchmaker_present")).fetchone()
    return bool(row and row[0])


def claimable_event_code(conn: Conn) -> str | None:
    """The code of an event with a row claimable now, without claiming it."""
    row = conn.execute(query("claimable_event_code")).fetchone()
    return str(row[0]) if row else None

"""Brute-force verification of an event's stored lists (invariants 1 and 2 of
docs/architecture.md: exact top-k, symmetric scores).

Independent of the engine's incremental path: it reads the current state straight from
the database, scores every pair in float64 (the dot products of the quantised blocks are
exact integers either way), ranks each row with a plain sort by (score desc, user_id asc)
and compares with user_matches: the same users and bit-identical scores. Under the
exposure correction it ranks by s' = 2·s - (r(A) + r(B)) instead, with r from a first
pass over every row (docs/architecture.md, "Exposure correction").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from psycopg.rows import dict_row

from core.data.named_sql import query
from core.data.repository import Conn, profile_from_row
from core.embedding.vectors import content_hash
from core.matching.scoring import Coefficients, block_dim, combine
from core.models import EventRecord

ROW_BLOCK = 512


@dataclass
class ListMismatch:
    user_id: str
    expected: list[tuple[str, float]]
    stored: list[tuple[str, float]]


@dataclass
class VerifyReport:
    attendees: int = 0
    checked: int = 0
    mismatches: list[ListMismatch] = field(default_factory=list)
    missing_vectors: list[str] = field(default_factory=list)
    stale_vectors: list[str] = field(default_factory=list)
    asymmetric_pairs: list[tuple[str, str]] = field(default_factory=list)
    embedder_key: str = ""  # the embedder whose vectors the lists were checked against
    embedder_reason: str = ""  # why that embedder is the one in effect (verify)

    @property
    def ok(self) -> bool:
        return not (
            self.mismatches or self.missing_vectors or self.stale_vectors or self.asymmetric_pairs
        )


def verify_event(conn: Conn, event: EventRecord, embedder_key: str) -> VerifyReport:
    report = VerifyReport(embedder_key=embedder_key)
    with conn.cursor(row_factory=dict_row) as cur:
        members = cur.execute(
            query("oracle_members"), {"event_id": event.id, "embedder": embedder_key}
        ).fetchall()
    report.attendees = len(members)
    user_of = {row["profile_id"]: row["user_id"] for row in members}
    matchable = []
    for row in members:
        if row["vector"] is None:
            report.missing_vectors.append(row["user_id"])
            continue
        if content_hash(profile_from_row(row)) != row["content_hash"]:
            report.stale_vectors.append(row["user_id"])
        matchable.append(
            (row["profile_id"], row["user_id"], row["company"].strip().casefold(), row["vector"])
        )

    stored_lists: dict[int, list[tuple[str, float]]] = {}
    stored_scores: dict[tuple[str, str], float] = {}
    for owner, _rank, matched, score in conn.execute(query("oracle_lists"), {"event_id": event.id}):
        other = user_of.get(matched, f"<inactive profile {matched}>")
        stored_lists.setdefault(owner, []).append((other, score))
        if owner in user_of:
            stored_scores[(user_of[owner], other)] = score
    for (a, b), score in stored_scores.items():
        if (b, a) in stored_scores and stored_scores[(b, a)] != score and a < b:
            report.asymmetric_pairs.append((a, b))

    if not matchable:
        return report
    dismissed: dict[int, set[int]] = {}
    for a, b in conn.execute(query("oracle_dismissals"), {"event_id": event.id}):
        dismissed.setdefault(a, set()).add(b)
        dismissed.setdefault(b, set()).add(a)

    ids = [m[0] for m in matchable]
    users = [m[1] for m in matchable]
    row_of = {pid: i for i, pid in enumerate(ids)}
    company_names = [m[2] for m in matchable]
    codes = {name: c for c, name in enumerate(sorted(set(company_names)))}
    company = np.array([codes[name] if name else -1 for name in company_names])
    vectors = np.stack([np.frombuffer(m[3], dtype="<i2") for m in matchable]).astype(np.float64)
    d = block_dim(vectors.shape[1])
    coef = Coefficients.from_weights(event.settings.weights)
    k = event.settings.k
    n = len(ids)

    def scores_of(start: int) -> np.ndarray:
        """Exact s of rows start.. against everyone, exclusions set to -inf."""
        q = vectors[start : start + ROW_BLOCK]
        interests = q[:, :d] @ vectors[:, :d].T
        complement = q[:, d : 2 * d] @ vectors[:, 2 * d : 3 * d].T
        complement = complement + q[:, 2 * d : 3 * d] @ vectors[:, d : 2 * d].T
        bio = q[:, 3 * d :] @ vectors[:, 3 * d :].T
        scores = combine(interests, complement, bio, coef)
        for offset in range(scores.shape[0]):
            i = start + offset
            allowed = np.ones(n, dtype=bool)
            allowed[i] = False
            if event.settings.exclude_same_company and company[i] >= 0:
                allowed &= company != company[i]
            for other in dismissed.get(ids[i], ()):
                if other in row_of:
                    allowed[row_of[other]] = False
            scores[offset, ~allowed] = -np.inf
        return scores

    # The exposure correction: r(X) = the float64 sum of X's best m allowed scores, best
    # first, divided by how many there are (m, fewer if X has fewer partners, 0 if none);
    # s'(A, B) = 2·s(A, B) - (r(A) + r(B)).
    hubness = event.settings.exposure_correction == "hubness"
    r = np.zeros(n)
    if hubness:
        m = event.settings.hubness_m
        for start in range(0, n, ROW_BLOCK):
            for offset, row in enumerate(scores_of(start)):
                best = sorted((float(v) for v in row if v > -np.inf), reverse=True)[:m]
                total = 0.0
                for value in best:
                    total += value
                r[start + offset] = total / len(best) if best else 0.0

    for start in range(0, n, ROW_BLOCK):
        scores = scores_of(start)
        for offset, plain in enumerate(scores):
            i = start + offset
            row = 2.0 * plain - (r[i] + r) if hubness else plain
            allowed = row > -np.inf
            take = min(k, int(allowed.sum()))
            best_rows: list[int] = []
            if take:
                kth = np.partition(row, n - take)[n - take]
                candidates = np.flatnonzero(row >= kth).tolist()
                best_rows = sorted(candidates, key=lambda j: (-row[j], users[j]))[:take]
            expected = [(users[j], float(row[j])) for j in best_rows]
            stored = stored_lists.get(ids[i], [])
            report.checked += 1
            if expected != stored:
                report.mismatches.append(ListMismatch(users[i], expected, stored))
    return report

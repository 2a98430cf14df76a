"""Exact incremental top-k for one event, kept in memory between batches.

An EventState holds the event's vectors, exclusions and current lists as numpy arrays.
It is refreshed incrementally from the database at the start of every batch (under the
event's advisory lock), so a warm worker does not reload 10,000 vectors per batch.

Processing a batch A of users (their vectors just became current):
1. score A against everyone with one matrix product; each user's new list is its top-k;
2. every other attendee v only needs to look at A's column of that block (scores are
   symmetric): v's new list is the best k of its old list and A's scores, unless someone
   of A was on v's list and now scores lower (or is excluded) — then v's row is recomputed
   in full. This is the bump rule, and it keeps lists exact: a pair not involving A did
   not change score, so nobody outside (old list + A) can enter v's top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from core import repository as repo
from core.reasons import TagProfile, explain
from core.repository import Conn, EventRecord, ListEntry, MemberRow
from core.scoring import (
    EXCLUDED,
    NO_MATCH,
    Coefficients,
    FloatMatrix,
    IndexMatrix,
    block_dim,
    merge_top_k,
    pair_scores,
    top_k,
)

NO_COMPANY = -1
# Score against every row (a slice) once this share of rows is matchable.
DENSE_FRACTION = 0.6


class VectorShapeError(ValueError):
    """A stored vector does not have the width this event's embedder produces."""


@dataclass
class BatchChanges:
    """Lists to write (owner profile id → entries), and how many users were matched."""

    lists: dict[int, list[ListEntry]] = field(default_factory=dict)
    matched_users: int = 0
    recomputed_neighbours: int = 0


class EventState:
    def __init__(self, event: EventRecord, embedder_key: str, width: int) -> None:
        self.event = event
        self.embedder_key = embedder_key
        self.width = width
        self.k = event.settings.k
        self.coef = Coefficients.from_weights(event.settings.weights)
        self.exclude_same_company = event.settings.exclude_same_company
        self.n = 0
        self.profile_ids = np.zeros(0, dtype=np.int64)
        self.user_ids: list[str] = []
        self.row_of: dict[int, int] = {}
        # matchable: an active attendee whose vector is present
        self.matchable = np.zeros(0, dtype=bool)
        self.company = np.zeros(0, dtype=np.int32)
        # (4, capacity, d): the I, S, O, B blocks, each contiguous for BLAS
        self.blocks = np.zeros((4, 0, block_dim(width)), dtype=np.float32)
        self.tags: list[TagProfile | None] = []
        self.dismissed: dict[int, set[int]] = {}
        self.top_idx: IndexMatrix = np.zeros((0, self.k), dtype=np.int64)
        self.top_val: FloatMatrix = np.zeros((0, self.k), dtype=np.float64)
        self._company_codes: dict[str, int] = {}
        self._id_rank: npt.NDArray[np.int64] | None = None
        self.watermark: int | None = None
        self.lists_version = -1
        self.stale_rows: set[int] = set()  # stored lists to rewrite whatever happens

    # --- loading -------------------------------------------------------------------------

    def refresh(self, conn: Conn) -> None:
        """Bring the state up to date; call with the event lock held."""
        # Read the watermark first: the queries below run on later snapshots, so every
        # transaction below this xmin is visible to them, and later ones are re-read next time.
        xmin = repo.snapshot_xmin(conn)
        for member in repo.member_rows(conn, self.event.id, self.embedder_key, self.watermark):
            self._apply_member(member)
        for a, b in repo.dismissal_pairs(conn, self.event.id, self.watermark or 0):
            ra, rb = self.row_of.get(a), self.row_of.get(b)
            if ra is not None and rb is not None:
                self.dismissed.setdefault(ra, set()).add(rb)
                self.dismissed.setdefault(rb, set()).add(ra)
        self.watermark = xmin
        version = repo.lists_version(conn, self.event.id)
        if version != self.lists_version:
            self._load_lists(repo.event_lists(conn, self.event.id))
            self.lists_version = version

    def _grow(self, needed: int) -> None:
        capacity = len(self.profile_ids)
        if needed <= capacity:
            return
        new_capacity = max(needed, 2 * capacity, 64)

        def grown(array: Any, fill: object) -> Any:
            out = np.full((new_capacity, *array.shape[1:]), fill, dtype=array.dtype)
            out[: self.n] = array[: self.n]
            return out

        self.profile_ids = grown(self.profile_ids, 0)
        self.matchable = grown(self.matchable, False)
        self.company = grown(self.company, NO_COMPANY)
        blocks = np.zeros((4, new_capacity, self.blocks.shape[2]), dtype=np.float32)
        blocks[:, : self.n] = self.blocks[:, : self.n]
        self.blocks = blocks
        self.top_idx = grown(self.top_idx, NO_MATCH)
        self.top_val = grown(self.top_val, EXCLUDED)

    def _row_for(self, profile_id: int, user_id: str) -> int:
        row = self.row_of.get(profile_id)
        if row is None:
            row = self.n
            self._grow(row + 1)
            self.n += 1
            self.profile_ids[row] = profile_id
            self.user_ids.append(user_id)
            self.tags.append(None)
            self.row_of[profile_id] = row
            self._id_rank = None
        return row

    def _apply_member(self, member: MemberRow) -> None:
        row = self._row_for(member.profile_id, member.user_id)
        if member.vector is not None:
            vector = np.frombuffer(member.vector, dtype="<i2")
            if vector.size != self.width:
                raise VectorShapeError(
                    f"vector of {member.user_id} has {vector.size} dims, expected {self.width}"
                )
            self.blocks[:, row] = vector.reshape(4, -1)
        self.matchable[row] = member.active and member.vector is not None
        company = member.company.strip().casefold()
        self.company[row] = (
            self._company_codes.setdefault(company, len(self._company_codes))
            if company
            else NO_COMPANY
        )
        self.tags[row] = TagProfile.from_lists(member.interests, member.seeking, member.offering)
        if not member.active:
            self.top_idx[row] = NO_MATCH
            self.top_val[row] = EXCLUDED

    def _load_lists(self, entries: list[tuple[int, int, int, float]]) -> None:
        self.top_idx[:] = NO_MATCH
        self.top_val[:] = EXCLUDED
        self.stale_rows = set()
        for owner, rank, matched, score in entries:
            row, other = self.row_of.get(owner), self.row_of.get(matched)
            if row is not None and other is not None and rank <= self.k:
                self.top_idx[row, rank - 1] = other
                self.top_val[row, rank - 1] = score
            elif row is not None:
                # Longer than k (k was lowered) or naming a row we do not know: the
                # stored list must be rewritten even if its first k entries stay.
                self.stale_rows.add(row)

    @property
    def id_rank(self) -> npt.NDArray[np.int64]:
        """Position of each row in user_id order: the tie-break of equal scores."""
        if self._id_rank is None:
            order = sorted(range(self.n), key=self.user_ids.__getitem__)
            rank = np.empty(self.n, dtype=np.int64)
            rank[order] = np.arange(self.n, dtype=np.int64)
            self._id_rank = rank
        return self._id_rank

    # --- matching ------------------------------------------------------------------------

    def _columns(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """The rows worth scoring against, and each row's position among them (-1: none).

        While an event fills up (a from-scratch drain) most rows have no vector yet, so
        only matchable rows are scored; once most are matchable, every row is scored (a
        free slice, no copy) and the rest masked.
        """
        n = self.n
        matchable = np.flatnonzero(self.matchable[:n])
        cols = matchable if matchable.size < DENSE_FRACTION * n else np.arange(n)
        col_pos = np.full(n, -1, dtype=np.int64)
        col_pos[cols] = np.arange(cols.size)
        return cols, col_pos

    def masked_scores(
        self,
        rows: npt.NDArray[np.int64],
        cols: npt.NDArray[np.int64],
        col_pos: npt.NDArray[np.int64],
    ) -> FloatMatrix:
        """Scores of `rows` against `cols`, exclusions set to EXCLUDED."""
        dense = cols.size == self.n
        target = self.blocks[:, : self.n] if dense else self.blocks[:, cols]
        scores = pair_scores(self.blocks[:, rows], target, self.coef)
        if dense:
            scores[:, ~self.matchable[: self.n]] = EXCLUDED
        own = col_pos[rows]
        scored_self = own >= 0
        scores[np.flatnonzero(scored_self), own[scored_self]] = EXCLUDED
        if self.exclude_same_company:
            company = self.company[rows][:, None]
            scores[(company == self.company[cols][None, :]) & (company != NO_COMPANY)] = EXCLUDED
        for i, row in enumerate(rows.tolist()):
            for other in self.dismissed.get(row, ()):
                if col_pos[other] >= 0:
                    scores[i, col_pos[other]] = EXCLUDED
        return scores

    def _best(
        self, scores: FloatMatrix, cols: npt.NDArray[np.int64]
    ) -> tuple[IndexMatrix, FloatMatrix]:
        positions, values = top_k(scores, self.id_rank[cols], self.k)
        return np.where(positions >= 0, cols[np.maximum(positions, 0)], NO_MATCH), values

    def process(self, profile_ids: list[int]) -> BatchChanges:
        """Recompute the given users and propagate to everyone else (see module doc)."""
        changes = BatchChanges()
        n, k = self.n, self.k
        claimed_rows = {self.row_of[p] for p in profile_ids if p in self.row_of}
        batch = np.array(sorted(r for r in claimed_rows if self.matchable[r]), dtype=np.int64)
        new_idx = self.top_idx[:n].copy()
        new_val = self.top_val[:n].copy()
        for row in claimed_rows - set(batch.tolist()):  # left, or no vector: empty list
            new_idx[row], new_val[row] = NO_MATCH, EXCLUDED

        if batch.size:
            id_rank = self.id_rank
            cols, col_pos = self._columns()
            block = self.masked_scores(batch, cols, col_pos)
            new_idx[batch], new_val[batch] = self._best(block, cols)
            changes.matched_users = int(batch.size)

            # Everyone else who is matchable, as positions among cols.
            is_other = self.matchable[cols].copy()
            is_other[col_pos[batch]] = False
            other_pos = np.flatnonzero(is_other)
            others = cols[other_pos]
            old_idx, old_val = self.top_idx[others], self.top_val[others]
            batch_pos = np.full(n, -1, dtype=np.int64)
            batch_pos[batch] = np.arange(batch.size)
            entry_pos = np.where(old_idx >= 0, batch_pos[np.maximum(old_idx, 0)], -1)
            # Only rows where the batch can change something: one of the batch is on the
            # list already, or a batch score reaches the k-th (ties included).
            reaches = block[:, other_pos].max(axis=0) >= old_val[:, k - 1]
            touched = np.flatnonzero((entry_pos >= 0).any(axis=1) | reaches)
            if touched.size:
                rows = others[touched]
                theirs = block[:, other_pos[touched]].T  # (rows, batch): symmetric scores
                old_idx, old_val = old_idx[touched], old_val[touched]
                entry_pos = entry_pos[touched]
                in_batch = entry_pos >= 0
                rescored = np.take_along_axis(theirs, np.maximum(entry_pos, 0), axis=1)
                needs_full = (in_batch & (rescored < old_val)).any(axis=1)

                cand_pos, cand_val = top_k(theirs, id_rank[batch], k)
                cand_idx = np.where(cand_pos >= 0, batch[np.maximum(cand_pos, 0)], NO_MATCH)
                merged_idx, merged_val = merge_top_k(
                    np.concatenate([np.where(in_batch, NO_MATCH, old_idx), cand_idx], axis=1),
                    np.concatenate([np.where(in_batch, EXCLUDED, old_val), cand_val], axis=1),
                    id_rank,
                    k,
                )
                full_rows = rows[needs_full]
                if full_rows.size:
                    merged_idx[needs_full], merged_val[needs_full] = self._best(
                        self.masked_scores(full_rows, cols, col_pos), cols
                    )
                    changes.recomputed_neighbours = int(full_rows.size)
                new_idx[rows], new_val[rows] = merged_idx, merged_val

        differs = (new_idx != self.top_idx[:n]).any(axis=1) | (new_val != self.top_val[:n]).any(
            axis=1
        )
        differs[list(self.stale_rows)] = True
        self.stale_rows.clear()
        for row in np.flatnonzero(differs).tolist():
            changes.lists[int(self.profile_ids[row])] = self._entries(
                row, new_idx[row], new_val[row]
            )
        self.top_idx[:n], self.top_val[:n] = new_idx, new_val
        return changes

    def _entries(self, row: int, idx: npt.NDArray[np.int64], val: FloatMatrix) -> list[ListEntry]:
        owner_tags = self.tags[row]
        entries = []
        for rank, (other, score) in enumerate(zip(idx.tolist(), val.tolist(), strict=True), 1):
            if other == NO_MATCH:
                break
            other_tags = self.tags[other]
            reasons = explain(owner_tags, other_tags) if owner_tags and other_tags else []
            entries.append(ListEntry(rank, int(self.profile_ids[other]), float(score), reasons))
        return entries

"""Exact incremental top-k for one event, kept in memory between batches.

An EventState holds the event's vectors, exclusions and current lists as numpy arrays. It
never touches the database: core.queue.loader feeds it the members, dismissals and lists
that changed (by transaction-id watermark), so a warm worker does not reload 10,000
vectors per batch.

Processing a batch A of users (their vectors just became current), in two halves:
1. prepare (no lock needed): score A against everyone, chunk by chunk; each user's new
   list is its top-k, and from the same scores (they are symmetric) every other attendee
   gets its best k among A;
2. apply (under the event's lock, after another refresh): correct A's lists for rows that
   changed since (or prepare again if one of A changed), then for every other attendee v:
   v's new list is the best k of its current list and A's candidates, unless someone of
   A was on v's list and now scores lower (or is excluded) — then v's row is recomputed
   in full. This is the bump rule, and it keeps lists exact: a pair not involving A did
   not change score, so nobody outside (old list + A) can enter v's top-k.

Top-k among many columns is found by screening (core.matching.screening): approximate
float32 scores of a whole chunk, from one product, pick the few columns that can be in a
row's top k (with a proven error margin), and only those are scored exactly.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from core.matching import screening
from core.matching.reasons import TagProfile, explain
from core.matching.scoring import (
    EXCLUDED,
    NO_MATCH,
    Coefficients,
    FloatMatrix,
    IndexMatrix,
    block_dim,
    combine,
    grouped_top_k,
    merge_top_k,
    pair_scores,
    query_side,
    screening_tolerance,
    top_k,
)
from core.models import EventRecord, ListEntry, MemberRow

NO_COMPANY = -1
# Score against every row (a slice) once this share of rows is matchable.
DENSE_FRACTION = 0.6
# Scores held at once while processing a batch: 4M float64 = 32 MiB, plus the float32
# products behind them. A batch of any size is scored in chunks of this many pairs.
CHUNK_ELEMENTS = 1 << 22
# Refreshes remembered for batches prepared earlier; an older one is prepared again.
CHANGE_LOG_LENGTH = 256
# New rows ranked by user_id one by one; more are ranked by a sort of the event.
RANK_INSERTIONS = 64
# A chunk of at most this many rows is scored exactly (see prepare).
EXACT_CHUNK_ROWS = 64
# Dismissed pairs are looked up as row * PAIR_KEY + other.
PAIR_KEY = 1 << 32
# Under the exposure correction each row keeps its best max(m, k) + CERTIFY_SPARE partners
# by s: enough to find r and, for most rows, to prove its top k by s' (see _exposure_lists).
CERTIFY_SPARE = 4
# An unproven row is repaired from its previous list when at most this many columns
# changed their s' (bump rule); otherwise it is ranked against everyone.
BUMP_COLUMNS = 256
# _exposure_derive: rows grouped by their floor, then looked at together (by their
# reach, within a group), the slack of its bounds (see there), and pairs scored exactly at
# once (each gathers 4 KiB of vectors).
WIDEN_GROUP = 1024
WIDEN_ROWS = 64
REGION_SLACK = 1e-12
PAIR_CHUNK = 1 << 16


class VectorShapeError(ValueError):
    """A stored vector does not have the width this event's embedder produces."""


@dataclass
class BatchChanges:
    """Lists to write (owner profile id → entries), and how many users were matched."""

    lists: dict[int, list[ListEntry]] = field(default_factory=dict)
    matched_users: int = 0
    recomputed_neighbours: int = 0


@dataclass
class PreparedBatch:
    """EventState.prepare's result: rows are EventState rows (append-only, so they stay
    valid while the state lives), scores from the state as it was then."""

    profile_ids: list[int]
    refresh: int  # the state's refresh count when prepared
    claimed: set[int]
    batch: npt.NDArray[np.int64]  # claimed rows that were matchable
    batch_idx: IndexMatrix
    batch_val: FloatMatrix
    others: npt.NDArray[np.int64]  # the other matchable rows then
    cand_idx: IndexMatrix  # per other row: its best k among the batch
    cand_val: FloatMatrix


class EventState:
    def __init__(self, event: EventRecord, embedder_key: str, width: int) -> None:
        self.event = event
        self.embedder_key = embedder_key
        self.width = width
        settings = event.settings
        # The stored lists' length; self.k is the width of the in-memory lists by s, the
        # same under "none", longer under "hubness" (the exposure correction's candidates).
        self.list_k = settings.k
        self.hubness = settings.exposure_correction == "hubness"
        self.hubness_m = settings.hubness_m
        self.k = max(settings.k, settings.hubness_m) + CERTIFY_SPARE if self.hubness else settings.k
        self.coef = Coefficients.from_weights(event.settings.weights)
        self.exclude_same_company = event.settings.exclude_same_company
        self.n = 0
        self.profile_ids = np.zeros(0, dtype=np.int64)
        self.user_ids: list[str] = []
        self.row_of: dict[int, int] = {}
        # matchable: an active attendee whose vector is present
        self.matchable = np.zeros(0, dtype=bool)
        self.company = np.zeros(0, dtype=np.int32)
        # (capacity, 4d) rows [I | S | O | B] as float32 (exact integers); see blocks
        self.vectors = np.zeros((0, 4 * block_dim(width)), dtype=np.float32)
        self.block_norms = np.zeros(4, dtype=np.float64)  # the largest of each block
        self.tags: list[TagProfile | None] = []
        self.dismissed: dict[int, set[int]] = {}
        self._dismissed_keys: npt.NDArray[np.int64] | None = None
        self.top_idx: IndexMatrix = np.zeros((0, self.k), dtype=np.int64)
        self.top_val: FloatMatrix = np.zeros((0, self.k), dtype=np.float64)
        # Under "hubness": the stored lists by s' (top_* then hold each row's best k by s,
        # exact for the current vectors once synced), and r per row.
        self.list_idx: IndexMatrix = np.zeros((0, self.list_k), dtype=np.int64)
        self.list_val: FloatMatrix = np.zeros((0, self.list_k), dtype=np.float64)
        self.r: FloatMatrix = np.zeros(0, dtype=np.float64)
        self.s_synced = False  # top_* built for every row (a new state builds them once)
        self.unsynced: set[int] = set()  # rows changed since top_* were last brought up to date
        self.lists_reloaded = False  # list_* came from the database since the last apply
        self._company_codes: dict[str, int] = {}
        # id_rank of the first rows (those since are ranked on demand) and their ids sorted
        self._id_rank = np.zeros(0, dtype=np.int64)
        self._sorted_ids: list[str] = []
        # Where the loader's last refresh stopped (core.queue.loader keeps them): the
        # transaction-id watermark of member changes and the stored lists' version.
        self.watermark: int | None = None
        self.lists_version = -1
        self.stale_rows: set[int] = set()  # stored lists to rewrite whatever happens
        self.chunk_elements = CHUNK_ELEMENTS
        self.screen_sample = screening.SCREEN_SAMPLE
        # (refresh number, rows it reported): what changed since a batch was prepared
        self.refreshes = 0
        self.change_log: list[tuple[int, set[int]]] = []

    @classmethod
    def from_members(
        cls, event: EventRecord, embedder_key: str, width: int, members: list[MemberRow]
    ) -> EventState:
        """A state built from member rows in hand, without a database (the benchmark's
        matching core, tests)."""
        state = cls(event, embedder_key, width)
        state.load_members(members)
        return state

    # --- loading -------------------------------------------------------------------------

    def update(self, members: list[MemberRow], dismissals: list[tuple[int, int]]) -> set[int]:
        """Take in changed members and new dismissals (pairs of profile ids), as one
        refresh; return the rows whose data may have changed (core.queue.loader reads
        them from the database)."""
        changed = self.load_members(members)
        for a, b in dismissals:
            ra, rb = self.row_of.get(a), self.row_of.get(b)
            if ra is not None and rb is not None:
                self.dismissed.setdefault(ra, set()).add(rb)
                self.dismissed.setdefault(rb, set()).add(ra)
                changed.update((ra, rb))
                self._dismissed_keys = None
        if self.hubness:
            self.unsynced |= changed
        self.refreshes += 1
        self.change_log.append((self.refreshes, changed))
        del self.change_log[:-CHANGE_LOG_LENGTH]
        return changed

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
        self.vectors = grown(self.vectors, 0)
        self.top_idx = grown(self.top_idx, NO_MATCH)
        self.top_val = grown(self.top_val, EXCLUDED)
        self.list_idx = grown(self.list_idx, NO_MATCH)
        self.list_val = grown(self.list_val, EXCLUDED)
        self.r = grown(self.r, 0.0)

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
        return row

    def load_members(self, members: list[MemberRow]) -> set[int]:
        """Take in changed members; vectors are copied into the blocks in one go."""
        rows = []
        vector_rows, vectors = [], []
        for member in members:
            row = self._row_for(member.profile_id, member.user_id)
            rows.append(row)
            if member.vector is not None:
                if len(member.vector) != 2 * self.width:
                    raise VectorShapeError(
                        f"vector of {member.user_id} has {len(member.vector) // 2} dims,"
                        f" expected {self.width}"
                    )
                vector_rows.append(row)
                vectors.append(member.vector)
            self.matchable[row] = member.active and member.vector is not None
            company = member.company.strip().casefold()
            self.company[row] = (
                self._company_codes.setdefault(company, len(self._company_codes))
                if company
                else NO_COMPANY
            )
            self.tags[row] = TagProfile.from_lists(
                member.interests, member.seeking, member.offering
            )
            if not member.active:
                self.top_idx[row] = NO_MATCH
                self.top_val[row] = EXCLUDED
                self.list_idx[row] = NO_MATCH
                self.list_val[row] = EXCLUDED
        if vectors:
            stacked = np.frombuffer(b"".join(vectors), dtype="<i2").reshape(len(vectors), -1)
            self.vectors[vector_rows] = stacked
            blocks = stacked.reshape(len(vectors), 4, -1)
            norms = np.sqrt(np.square(blocks, dtype=np.float64).sum(axis=2)).max(axis=0)
            np.maximum(self.block_norms, norms, out=self.block_norms)
        return set(rows)

    def load_lists(self, entries: list[tuple[int, int, int, float]]) -> None:
        """Take in the stored lists (another writer changed them). Under "hubness" they
        are the lists by s' (the lists by s are the state's own, kept from the vectors)."""
        idx, val = (self.list_idx, self.list_val) if self.hubness else (self.top_idx, self.top_val)
        idx[:] = NO_MATCH
        val[:] = EXCLUDED
        self.stale_rows = set()
        self.lists_reloaded = True
        for owner, rank, matched, score in entries:
            row, other = self.row_of.get(owner), self.row_of.get(matched)
            if row is not None and other is not None and rank <= self.list_k:
                idx[row, rank - 1] = other
                val[row, rank - 1] = score
            elif row is not None:
                # Longer than k (k was lowered) or naming a row we do not know: the
                # stored list must be rewritten even if its first k entries stay.
                self.stale_rows.add(row)

    @property
    def blocks(self) -> npt.NDArray[np.float32]:
        """(4, capacity, d) view of the vectors: the I, S, O, B blocks for pair_scores."""
        return _as_blocks(self.vectors)

    @property
    def tolerance(self) -> float:
        """How far an approximate score may be from the exact one (screening_tolerance)."""
        return screening_tolerance(self.coef, self.block_norms, self.vectors.shape[1])

    @property
    def dismissed_keys(self) -> npt.NDArray[np.int64]:
        if self._dismissed_keys is None:
            keys = [a * PAIR_KEY + b for a, others in self.dismissed.items() for b in others]
            self._dismissed_keys = np.unique(np.array(keys, dtype=np.int64))
        return self._dismissed_keys

    @property
    def matchable_count(self) -> int:
        """Rows a batch is scored against (active, with a vector)."""
        return int(np.count_nonzero(self.matchable[: self.n]))

    @property
    def id_rank(self) -> npt.NDArray[np.int64]:
        """Position of each row in user_id order: the tie-break of equal scores. A few new
        rows are ranked by insertion (a newcomer must not cost a sort of the event)."""
        ranked = self._id_rank.size
        if self.n - ranked > RANK_INSERTIONS:
            order = sorted(range(self.n), key=self.user_ids.__getitem__)
            self._sorted_ids = [self.user_ids[row] for row in order]
            self._id_rank = np.empty(self.n, dtype=np.int64)
            self._id_rank[order] = np.arange(self.n, dtype=np.int64)
        elif self.n > ranked:
            rank = np.concatenate([self._id_rank, np.zeros(self.n - ranked, dtype=np.int64)])
            for row in range(ranked, self.n):
                user_id = self.user_ids[row]
                place = bisect.bisect_left(self._sorted_ids, user_id)
                self._sorted_ids.insert(place, user_id)
                rank[:row][rank[:row] >= place] += 1
                rank[row] = place
            self._id_rank = rank
        return self._id_rank

    # --- matching ------------------------------------------------------------------------

    def _columns(self) -> npt.NDArray[np.int64]:
        """The rows worth scoring against.

        While an event fills up (a from-scratch drain) most rows have no vector yet, so
        only matchable rows are scored; once most are matchable, every row is scored (a
        free slice of the vectors, no copy) and the rest excluded.
        """
        n = self.n
        matchable = np.flatnonzero(self.matchable[:n])
        return matchable if matchable.size < DENSE_FRACTION * n else np.arange(n)

    def _targets(self, cols: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """The vectors of `cols`: a slice when cols is every row, else a copy (made once
        per pass, not per chunk)."""
        if cols.size == self.n:  # sorted and distinct, so every row
            return self.vectors[: self.n]
        return self.vectors[cols]

    def _approx(
        self, rows: npt.NDArray[np.int64], targets: npt.NDArray[np.float32]
    ) -> npt.NDArray[np.float32]:
        """Approximate scores of rows against targets: one float32 product."""
        result: npt.NDArray[np.float32] = query_side(self.vectors[rows], self.coef) @ targets.T
        return result

    def excluded(self, a: npt.NDArray[np.int64], b: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Which pairs (a[i], b[i]) may not match: not matchable, oneself, the same
        company (if the event says so), or dismissed."""
        excluded = self._excluded_by_row(a, b)
        if self.dismissed:
            excluded |= np.isin(a * PAIR_KEY + b, self.dismissed_keys)
        return excluded

    def excluded_block(
        self, rows: npt.NDArray[np.int64], cols: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.bool_]:
        """_excluded for every pair of rows x cols (cols sorted, as every caller's are):
        dismissals are looked up per row, not per pair."""
        block = self._excluded_by_row(rows[:, None], cols[None, :])
        if self.dismissed and cols.size:
            for i, row in enumerate(rows.tolist()):
                dismissed = self.dismissed.get(row)
                if dismissed:
                    theirs = np.array(sorted(dismissed), dtype=np.int64)
                    at = np.minimum(np.searchsorted(cols, theirs), cols.size - 1)
                    block[i, at[cols[at] == theirs]] = True
        return block

    def _excluded_by_row(
        self, a: npt.NDArray[np.int64], b: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.bool_]:
        """The exclusions that follow from the two rows' own data (a and b broadcast):
        not matchable, oneself, the same company."""
        excluded: npt.NDArray[np.bool_] = ~self.matchable[a] | ~self.matchable[b] | (a == b)
        if self.exclude_same_company:
            company = self.company[a]
            excluded |= (company == self.company[b]) & (company != NO_COMPANY)
        return excluded

    def _chunks(self, rows: npt.NDArray[np.int64], width: int) -> list[npt.NDArray[np.int64]]:
        """Split rows so that one chunk's score block stays near CHUNK_ELEMENTS."""
        step = max(1, self.chunk_elements // max(width, 1))
        return [rows[i : i + step] for i in range(0, rows.size, step)]

    def _candidates(
        self, rows: npt.NDArray[np.int64], members: npt.NDArray[np.int64]
    ) -> tuple[IndexMatrix, FloatMatrix]:
        """Each row's best k among `members` (exclusions apart), chunk by chunk (bounded
        memory)."""
        idx = np.full((rows.size, self.k), NO_MATCH, dtype=np.int64)
        val = np.full((rows.size, self.k), EXCLUDED, dtype=np.float64)
        if not members.size:
            return idx, val
        targets = self._targets(members)
        id_rank = self.id_rank
        start = 0
        for chunk in self._chunks(rows, members.size):
            end = start + chunk.size
            at, found, exact = screening.screen(
                self, self._approx(chunk, targets), chunk, members, targets
            )
            idx[start:end], val[start:end] = grouped_top_k(
                at, found, exact, id_rank, n_groups=chunk.size, k=self.k
            )
            start = end
        return idx, val

    def _offer(
        self,
        chunk: npt.NDArray[np.int64],
        others: npt.NDArray[np.int64],
        scores: npt.NDArray[np.floating[Any]],
        *,
        exact_scores: bool,
        candidates: tuple[IndexMatrix, FloatMatrix],
    ) -> None:
        """Merge into each other row's candidates (its best k so far, in place) its best k
        among `chunk`, given the chunk's scores against them (chunk x others): exact ones
        with exclusions applied, or approximate ones. Only rows the chunk can reach are
        looked at: after the first chunks, most rows already hold better candidates."""
        k = self.k
        cand_idx, cand_val = candidates
        tol = 0.0 if exact_scores else self.tolerance
        reach = np.flatnonzero(scores.max(axis=0) >= cand_val[:, k - 1] - tol)
        if not reach.size:
            return
        theirs = np.ascontiguousarray(scores[:, reach].T)
        if exact_scores:
            best, values = top_k(theirs, self.id_rank[chunk], k)
            # Rows with no candidates yet (the first chunk; a newcomer's only one) take
            # the chunk's best k as they are.
            empty = cand_val[reach, 0] == EXCLUDED
            cand_idx[reach[empty]] = np.where(
                best[empty] >= 0, chunk[np.maximum(best[empty], 0)], NO_MATCH
            )
            cand_val[reach[empty]] = values[empty]
            reach, best, values = reach[~empty], best[~empty], values[~empty]
            at, slot = np.nonzero(best >= 0)
            found, exact = chunk[best[at, slot]], values[at, slot]
        else:
            at, found, exact = screening.screen(
                self,
                theirs,
                others[reach],
                chunk,
                self.vectors[chunk],
                floor=cand_val[reach, k - 1],
            )
        present = np.bincount(at, minlength=reach.size) > 0
        rows = reach[present]
        cand_idx[rows], cand_val[rows] = grouped_top_k(
            np.concatenate([np.repeat(np.arange(rows.size), k), (np.cumsum(present) - 1)[at]]),
            np.concatenate([cand_idx[rows].reshape(-1), found]),
            np.concatenate([cand_val[rows].reshape(-1), exact]),
            self.id_rank,
            n_groups=rows.size,
            k=k,
        )

    def exact_block(
        self,
        rows: npt.NDArray[np.int64],
        cols: npt.NDArray[np.int64],
        targets: npt.NDArray[np.float32],
    ) -> FloatMatrix:
        """Exact scores of rows against cols (targets: their vectors), exclusions set to
        EXCLUDED."""
        scores = pair_scores(self.blocks[:, rows], _as_blocks(targets), self.coef)
        scores[self.excluded_block(rows, cols)] = EXCLUDED
        return scores

    def rank_everyone(self) -> tuple[IndexMatrix, FloatMatrix]:
        """Every row's exact top k among all matchable rows, from scratch (what a full
        rebuild computes; rows not matchable get empty lists); by s' under "hubness"."""
        everyone = np.flatnonzero(self.matchable[: self.n])
        idx = np.full((self.n, self.k), NO_MATCH, dtype=np.int64)
        val = np.full((self.n, self.k), EXCLUDED, dtype=np.float64)
        idx[everyone], val[everyone] = self._candidates(everyone, everyone)
        if not self.hubness:
            return idx, val
        # By s' (the state's lists by s become these, as after a drain).
        self.top_idx[: self.n], self.top_val[: self.n] = idx, val
        self.s_synced = True
        self.unsynced.clear()
        return self._exposure_lists(np.ones(self.n, dtype=bool), rebuild=True)

    def changed_since(self, refresh: int) -> set[int] | None:
        """Rows reported by the refreshes after `refresh`; None if no longer known."""
        if refresh < self.refreshes and (
            not self.change_log or self.change_log[0][0] > refresh + 1
        ):
            return None
        return {row for number, rows in self.change_log if number > refresh for row in rows}

    def prepare(self, profile_ids: list[int]) -> PreparedBatch:
        """The heavy half of a batch, which needs no lock: the batch's own lists, and for
        every other matchable row its best k among the batch (list-independent).

        The batch is scored chunk by chunk, so a batch of thousands (a from-scratch drain
        or a full rematch) needs no more memory than CHUNK_ELEMENTS scores at a time.
        """
        k = self.k
        claimed = {self.row_of[p] for p in profile_ids if p in self.row_of}
        batch = np.array(sorted(r for r in claimed if self.matchable[r]), dtype=np.int64)
        prepared = PreparedBatch(
            profile_ids=list(profile_ids),
            refresh=self.refreshes,
            claimed=claimed,
            batch=batch,
            batch_idx=np.full((batch.size, k), NO_MATCH, dtype=np.int64),
            batch_val=np.full((batch.size, k), EXCLUDED, dtype=np.float64),
            others=np.zeros(0, dtype=np.int64),
            cand_idx=np.zeros((0, k), dtype=np.int64),
            cand_val=np.zeros((0, k), dtype=np.float64),
        )
        if not batch.size:
            return prepared
        id_rank = self.id_rank
        cols = self._columns()
        targets = self._targets(cols)
        is_other = self.matchable[cols].copy()
        is_other[np.isin(cols, batch)] = False
        other_pos = np.flatnonzero(is_other)
        others = prepared.others = cols[other_pos]
        cand_idx = np.full((others.size, k), NO_MATCH, dtype=np.int64)
        cand_val = np.full((others.size, k), EXCLUDED, dtype=np.float64)
        start = 0
        for chunk in self._chunks(batch, cols.size):
            end = start + chunk.size
            small = chunk.size <= EXACT_CHUNK_ROWS
            if small:
                # A few rows: exact scores of the whole block cost less than screening,
                # whose half for the others would score most of their pairs one by one.
                exact_block = self.exact_block(chunk, cols, targets)
                best, values = top_k(exact_block, id_rank[cols], k)
                prepared.batch_idx[start:end] = np.where(
                    best >= 0, cols[np.maximum(best, 0)], NO_MATCH
                )
                prepared.batch_val[start:end] = values
                scores: npt.NDArray[np.floating[Any]] = exact_block
            else:
                scores = approx = self._approx(chunk, targets)
                at, found, exact = screening.screen(self, approx, chunk, cols, targets)
                prepared.batch_idx[start:end], prepared.batch_val[start:end] = grouped_top_k(
                    at, found, exact, id_rank, n_groups=chunk.size, k=k
                )
            start = end
            if others.size:
                self._offer(
                    chunk,
                    others,
                    scores[:, other_pos],
                    exact_scores=small,
                    candidates=(cand_idx, cand_val),
                )
        prepared.cand_idx, prepared.cand_val = cand_idx, cand_val
        return prepared

    def apply(self, prepared: PreparedBatch) -> BatchChanges:
        """The light half, under the event lock and after a refresh: make the prepared
        batch exact against whatever changed since it was prepared (the rows the
        refreshes since reported), merge it into everyone else's current list, and
        return the lists that differ."""
        changed = self.changed_since(prepared.refresh)
        if changed is None or changed & prepared.claimed:
            # A claimed user changed again (or was dismissed) meanwhile, or the changes
            # are no longer known: prepare again on the current state.
            prepared, changed = self.prepare(prepared.profile_ids), set()
        changes = BatchChanges()
        if self.hubness:
            self._apply_exposure(prepared, changed, changes)
            return changes
        n = self.n
        new_idx, new_val = self._advance(prepared, changed, changes)
        self._record(changes, new_idx, new_val, self.top_idx[:n], self.top_val[:n])
        self.top_idx[:n], self.top_val[:n] = new_idx, new_val
        return changes

    def _record(
        self,
        changes: BatchChanges,
        new_idx: IndexMatrix,
        new_val: FloatMatrix,
        old_idx: IndexMatrix,
        old_val: FloatMatrix,
    ) -> None:
        """Put the lists that differ from the stored ones (or must be rewritten) into
        changes."""
        differs = (new_idx != old_idx).any(axis=1) | (new_val != old_val).any(axis=1)
        differs[list(self.stale_rows)] = True
        self.stale_rows.clear()
        for row in np.flatnonzero(differs).tolist():
            changes.lists[int(self.profile_ids[row])] = self._entries(
                row, new_idx[row], new_val[row]
            )

    def _advance(
        self, prepared: PreparedBatch, changed: set[int], changes: BatchChanges
    ) -> tuple[IndexMatrix, FloatMatrix]:
        """Every row's list by s (top_*) after the prepared batch: the batch's own lists
        made exact against `changed` (rows changed since it was prepared), and the batch
        merged into everyone else's (the bump rule)."""
        n, k = self.n, self.k
        new_idx = self.top_idx[:n].copy()
        new_val = self.top_val[:n].copy()
        keep = self.matchable[prepared.batch]
        batch = prepared.batch[keep]
        for row in prepared.claimed - set(batch.tolist()):  # left, or no vector: empty list
            new_idx[row], new_val[row] = NO_MATCH, EXCLUDED
        # Claimed users who left (or lost their vector) are excluded now: a list holding
        # one must be recomputed (the stored lists lose a leaver through the departure
        # trigger; the longer in-memory lists of "hubness" only here).
        gone = np.zeros(n, dtype=bool)
        gone[list(prepared.claimed)] = True
        gone &= ~self.matchable[:n]

        if batch.size or gone.any():
            changes.matched_users = int(batch.size)
            batch_idx, batch_val = prepared.batch_idx[keep], prepared.batch_val[keep]
            cols = self._columns()
            in_batch = np.zeros(n, dtype=bool)
            in_batch[batch] = True
            recomputed = 0

            # 1. The batch's own lists, against rows that changed since they were prepared.
            moved = np.array(sorted(r for r in changed if not in_batch[r]), dtype=np.int64)
            if moved.size:
                fresh = moved[self.matchable[moved]]
                cand = self._candidates(batch, fresh)
                is_moved = np.zeros(n, dtype=bool)
                is_moved[moved] = True
                # (A new dismissal marks both of its users changed: one of the batch
                # would have made us prepare again above.)
                batch_idx, batch_val, full = self._merge(
                    batch, batch_idx, batch_val, is_moved, cand
                )
                if full.any():
                    batch_idx[full], batch_val[full] = self._candidates(batch[full], cols)
                    recomputed += int(full.sum())
            new_idx[batch], new_val[batch] = batch_idx, batch_val

            # 2. Everyone else: merge the batch into their current lists.
            others = np.flatnonzero(self.matchable[:n] & ~in_batch)
            if others.size:
                cand_idx = np.full((others.size, k), NO_MATCH, dtype=np.int64)
                cand_val = np.full((others.size, k), EXCLUDED, dtype=np.float64)
                slot = np.full(n, -1, dtype=np.int64)
                slot[prepared.others] = np.arange(prepared.others.size)
                prepared_slot = slot[others]
                stale = np.zeros(n, dtype=bool)
                stale[list(changed)] = True
                usable = (prepared_slot >= 0) & ~stale[others]
                cand_idx[usable] = prepared.cand_idx[prepared_slot[usable]]
                cand_val[usable] = prepared.cand_val[prepared_slot[usable]]
                redo = others[~usable]  # new, changed or newly matchable since prepared
                if redo.size:
                    cand_idx[~usable], cand_val[~usable] = self._candidates(redo, batch)
                merged_idx, merged_val, full = self._merge(
                    others,
                    self.top_idx[others],
                    self.top_val[others],
                    in_batch | gone,
                    (cand_idx, cand_val),
                )
                touched = np.flatnonzero(
                    (merged_idx != self.top_idx[others]).any(axis=1)
                    | (merged_val != self.top_val[others]).any(axis=1)
                    | full
                )
                rows = others[touched]
                merged_idx, merged_val, full = (
                    merged_idx[touched],
                    merged_val[touched],
                    full[touched],
                )
                if full.any():
                    merged_idx[full], merged_val[full] = self._candidates(rows[full], cols)
                    recomputed += int(full.sum())
                new_idx[rows], new_val[rows] = merged_idx, merged_val
            changes.recomputed_neighbours = recomputed

        return new_idx, new_val

    # --- the exposure correction ("hubness") --------------------------------------------

    def _apply_exposure(
        self, prepared: PreparedBatch, changed: set[int], changes: BatchChanges
    ) -> None:
        """apply under "hubness": bring the lists by s (top_*) up to date with every row
        changed since the last apply (the batch, then whatever else the refreshes
        reported: a leaver, an edit another worker matched, a dismissal), so that r and
        s' are exact for the current vectors; then the lists by s' (list_*)."""
        n = self.n
        dirty = np.zeros(n, dtype=bool)
        rebuild = self.lists_reloaded
        if not self.s_synced:
            # A new state: the lists by s of every row outside the batch, against
            # everyone, once (the stored lists are by s' and cannot seed them); the batch
            # brings its own. In a from-scratch drain nobody is outside the first batch.
            in_batch = np.zeros(n, dtype=bool)
            in_batch[prepared.batch] = True
            rest = np.flatnonzero(self.matchable[:n] & ~in_batch)
            self.top_idx[:n], self.top_val[:n] = NO_MATCH, EXCLUDED
            if rest.size:
                everyone = np.flatnonzero(self.matchable[:n])
                self.top_idx[rest], self.top_val[rest] = self._candidates(rest, everyone)
            self.s_synced, rebuild = True, True
            self.unsynced.clear()
        self.top_idx[:n], self.top_val[:n] = self._advance(prepared, changed, changes)
        pending = self.unsynced - prepared.claimed
        if pending:
            synced = self.prepare([int(self.profile_ids[row]) for row in sorted(pending)])
            self.top_idx[:n], self.top_val[:n] = self._advance(synced, set(), BatchChanges())
        dirty[list(prepared.claimed | pending)] = True
        self.unsynced.clear()
        self.lists_reloaded = False
        new_idx, new_val = self._exposure_lists(dirty, rebuild=rebuild)
        self._record(changes, new_idx, new_val, self.list_idx[:n], self.list_val[:n])
        self.list_idx[:n], self.list_val[:n] = new_idx, new_val

    def _exposure_r(self) -> FloatMatrix:
        """r per row: the float64 sum of its best m scores by s, best first (ties give
        equal values, so the order of the sum is fixed), divided by how many there are (m,
        fewer when the row has fewer partners, r = 0 with none). top_* hold them in that
        order, exact; the oracle sums the same values in the same order."""
        n, m = self.n, self.hubness_m
        values = self.top_val[:n, :m]
        present = values > EXCLUDED
        total = np.zeros(n, dtype=np.float64)
        for j in range(m):
            total += np.where(present[:, j], values[:, j], 0.0)
        count = np.count_nonzero(present, axis=1)
        r: FloatMatrix = np.where(count > 0, total / np.maximum(count, 1), 0.0)
        return r

    def _exposure_lists(
        self, dirty: npt.NDArray[np.bool_], *, rebuild: bool
    ) -> tuple[IndexMatrix, FloatMatrix]:
        """Every row's top k by s'(A, B) = 2·s(A, B) - (r(A) + r(B)), ties by user_id.

        s'(A, B) changed since the last apply only where A or B is `dirty` (vector,
        exclusions) or has a new r. A row with neither is repaired from its previous
        list (exact) by the bump rule when few columns moved; any other row, or after
        the stored lists were reloaded (`rebuild`), is derived afresh (_exposure_derive).
        """
        n, k = self.n, self.list_k
        r_before = self.r[:n].copy()
        r = self._exposure_r()
        self.r[:n] = r
        moved = dirty | (r != r_before)
        new_idx = np.full((n, k), NO_MATCH, dtype=np.int64)
        new_val = np.full((n, k), EXCLUDED, dtype=np.float64)
        rows = np.flatnonzero(self.matchable[:n])
        columns = np.flatnonzero(moved)
        derive = rows
        if not rebuild and columns.size <= BUMP_COLUMNS:
            derive, kept = rows[moved[rows]], rows[~moved[rows]]
            if kept.size and columns.size:
                idx, val, full = self._exposure_bump(kept, columns, r)
                new_idx[kept], new_val[kept] = idx, val
                derive = np.union1d(derive, kept[full])
            elif kept.size:
                new_idx[kept], new_val[kept] = self.list_idx[kept], self.list_val[kept]
        if derive.size:
            new_idx[derive], new_val[derive] = self._exposure_derive(derive, r)
        return new_idx, new_val

    def _exposure_bump(
        self, rows: npt.NDArray[np.int64], columns: npt.NDArray[np.int64], r: FloatMatrix
    ) -> tuple[IndexMatrix, FloatMatrix, npt.NDArray[np.bool_]]:
        """The bump rule by s': each row's previous list (exact, r of the row unchanged)
        merged with the `columns` whose s' for it changed; rows where a listed column now
        scores lower are flagged `full` (someone outside may belong)."""
        k = self.list_k
        a = np.repeat(rows, columns.size)
        b = np.tile(columns, rows.size)
        fresh = (2.0 * self.scores_of_pairs(a, b) - (r[a] + r[b])).reshape(rows.size, -1)
        old_idx, old_val = self.list_idx[rows], self.list_val[rows]
        is_column = np.zeros(self.n, dtype=bool)
        is_column[columns] = True
        on_list = (old_idx >= 0) & is_column[np.maximum(old_idx, 0)]
        at = np.minimum(np.searchsorted(columns, np.maximum(old_idx, 0)), columns.size - 1)
        rescored = np.where(on_list, np.take_along_axis(fresh, at, axis=1), EXCLUDED)
        full = np.any(on_list & (rescored < old_val), axis=1)
        merged_idx, merged_val = merge_top_k(
            np.concatenate(
                [np.where(on_list, NO_MATCH, old_idx), np.broadcast_to(columns, fresh.shape)],
                axis=1,
            ),
            np.concatenate([np.where(on_list, EXCLUDED, old_val), fresh], axis=1),
            self.id_rank,
            k,
        )
        return merged_idx, merged_val, full

    def _exposure_derive(
        self, rows: npt.NDArray[np.int64], r: FloatMatrix
    ) -> tuple[IndexMatrix, FloatMatrix]:
        """Rows' exact top k by s', from the lists by s (top_*, M = self.k wide) and few
        exact scores.

        Candidates of A: its best M by s, and every B holding A among its best M (s is
        symmetric, so that score is known too). Any other partner B has s(A, B) <=
        s_M(A) and s(A, B) <= s_M(B) (a row with fewer than M partners holds them all:
        nobody outside can be a partner), so s'(A, B) <= 2·min(s_M(A), s_M(B)) - r(A) -
        r(B): it can only reach the k-th best candidate when r(B) <= 2·s_M(A) - r(A) -
        kth and 2·s_M(B) - r(B) >= kth + r(A), and, by its approximate score (within
        tol of s), when 2·approx - r(A) - r(B) >= kth - 2·tol. The few pairs that pass
        all three are scored exactly. Every test gets REGION_SLACK, far above the float64
        error of these sums (~1e-15), so a pair left out scores strictly below the k-th
        best.
        """
        n, k, width = self.n, self.list_k, self.k
        id_rank = self.id_rank
        s_idx, s_val = self.top_idx[:n], self.top_val[:n]
        wanted = np.zeros(n, dtype=bool)
        wanted[rows] = True
        slot = np.full(n, -1, dtype=np.int64)
        slot[rows] = np.arange(rows.size)
        holder = np.repeat(np.arange(n), width)
        held, held_s = s_idx.reshape(-1), s_val.reshape(-1)
        forward = (held >= 0) & wanted[holder]
        backward = (held >= 0) & wanted[np.maximum(held, 0)]
        own = np.concatenate([holder[forward], held[backward]])
        other = np.concatenate([held[forward], holder[backward]])
        score = np.concatenate([held_s[forward], held_s[backward]])
        value = 2.0 * score - (r[own] + r[other])
        own, other, value = _distinct(own, other, value, n)
        _, best_val = grouped_top_k(slot[own], other, value, id_rank, n_groups=rows.size, k=k)
        kth = best_val[:, k - 1]

        # The region: columns sorted by r, so that each row's first test is a prefix (up
        # to its reach), the second a threshold (its floor) on the column's bound. Rows
        # are grouped by floor, then ordered by reach within a group, so that a chunk of
        # rows has similar reaches and floors and needs few columns: only the columns
        # any of its rows may need are gathered and multiplied (one float32 product),
        # and the approximate scores leave the few pairs that pass both tests within
        # 2·tol of the k-th best.
        full = s_idx[:, -1] >= 0
        column_bound = np.where(full, 2.0 * s_val[:, -1], EXCLUDED) - r
        everyone = np.flatnonzero(self.matchable[:n])
        by_r = everyone[np.argsort(r[everyone], kind="stable")]
        sorted_r, bound_by_r = r[by_r], column_bound[by_r]
        own_r, own_last = r[rows], s_val[rows, -1]
        with np.errstate(invalid="ignore"):  # rows holding every partner: -inf - -inf
            reach = np.searchsorted(sorted_r, 2.0 * own_last - own_r - kth + REGION_SLACK, "right")
        reach[~full[rows]] = 0
        floor = kth + own_r - REGION_SLACK
        near = kth - 2 * self.tolerance - REGION_SLACK
        searched = np.flatnonzero(reach > 0)  # rows with an empty region need nothing
        searched = searched[np.argsort(-floor[searched], kind="stable")]
        groups = np.array_split(searched, max(1, searched.size // WIDEN_GROUP))
        order = np.concatenate(
            [group[np.argsort(reach[group], kind="stable")] for group in groups] or [searched]
        )
        targets: npt.NDArray[np.float32] | None = None
        found_own, found_other = [], []
        for start in range(0, order.size, WIDEN_ROWS):
            at = order[start : start + WIDEN_ROWS]
            length = int(reach[at].max())
            # The two bounds first (no float work): the columns any row of the chunk
            # may need, then each row's own pairs among them; the product only for the
            # columns some pair uses.
            wide = np.flatnonzero(bound_by_r[:length] >= floor[at].min())
            if not wide.size:
                continue
            i, w = np.nonzero(
                (wide[None, :] < reach[at][:, None])
                & (bound_by_r[wide][None, :] >= floor[at][:, None])
            )
            if not i.size:
                continue
            if targets is None:
                targets = self.vectors[by_r]
            used = np.zeros(wide.size, dtype=bool)
            used[w] = True
            column_of = np.cumsum(used) - 1  # a used column's place in the product
            approx = self._approx(rows[at], targets[wide[used]])
            j = wide[w]
            corrected = 2.0 * approx[i, column_of[w]].astype(np.float64) - (
                own_r[at][i] + sorted_r[j]
            )
            keep = corrected >= near[at][i]
            i, j = i[keep], j[keep]
            found_own.append(rows[at][i])
            found_other.append(by_r[j])
        if found_own:
            a, b = np.concatenate(found_own), np.concatenate(found_other)
            exact = np.concatenate(
                [
                    self.scores_of_pairs(a[i : i + PAIR_CHUNK], b[i : i + PAIR_CHUNK])
                    for i in range(0, a.size, PAIR_CHUNK)
                ]
                or [np.zeros(0)]
            )
            own, other, value = _distinct(
                np.concatenate([own, a]),
                np.concatenate([other, b]),
                np.concatenate([value, 2.0 * exact - (r[a] + r[b])]),
                n,
            )
        return grouped_top_k(slot[own], other, value, id_rank, n_groups=rows.size, k=k)

    def _merge(
        self,
        rows: npt.NDArray[np.int64],
        idx: IndexMatrix,
        val: FloatMatrix,
        members: npt.NDArray[np.bool_],
        candidates: tuple[IndexMatrix, FloatMatrix],
    ) -> tuple[IndexMatrix, FloatMatrix, npt.NDArray[np.bool_]]:
        """Lists of `rows` after the scores of `members` (a mask over rows) changed:
        their old entries make way for each row's best k among them (cand_*). Where a
        member on a list now scores lower or is excluded, someone outside old list +
        members may belong: those rows are flagged for a full recompute."""
        cand_idx, cand_val = candidates
        on_list = (idx >= 0) & members[np.maximum(idx, 0)]
        rescored = np.full(idx.shape, EXCLUDED)
        hits, slots = np.nonzero(on_list)
        rescored[hits, slots] = self.scores_of_pairs(rows[hits], idx[hits, slots])
        full = np.any(on_list & (rescored < val), axis=1)
        merged_idx, merged_val = merge_top_k(
            np.concatenate([np.where(on_list, NO_MATCH, idx), cand_idx], axis=1),
            np.concatenate([np.where(on_list, EXCLUDED, val), cand_val], axis=1),
            self.id_rank,
            self.k,
        )
        return merged_idx, merged_val, full

    def scores_of_pairs(self, a: npt.NDArray[np.int64], b: npt.NDArray[np.int64]) -> FloatMatrix:
        """score(a[i], b[i]) for each i, bit-identical to the matrix products (each dot
        product is exact in float32, whatever the summation order), with exclusions."""
        blocks = self.blocks
        interests = np.einsum("ij,ij->i", blocks[0, a], blocks[0, b])
        complement = np.einsum("ij,ij->i", blocks[1, a], blocks[2, b])
        complement += np.einsum("ij,ij->i", blocks[2, a], blocks[1, b])
        bio = np.einsum("ij,ij->i", blocks[3, a], blocks[3, b])
        scores = combine(interests, complement, bio, self.coef)
        scores[self.excluded(a, b)] = EXCLUDED
        return scores

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


def _distinct(
    own: npt.NDArray[np.int64], other: npt.NDArray[np.int64], value: FloatMatrix, n: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], FloatMatrix]:
    """Candidate pairs without repeats (a pair found twice has the same exact value)."""
    _, first = np.unique(own * n + other, return_index=True)
    return own[first], other[first], value[first]


def _as_blocks(vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """(n, 4d) rows -> a (4, n, d) view, the layout pair_scores takes."""
    return vectors.reshape(vectors.shape[0], 4, -1).transpose(1, 0, 2)

"""`matchmaker bench`: our drain against the compute limit and a pgvector peer.

Every size runs in a fresh child process, so its peak RSS is its own. In the child, on the
same generated attendees and the same stored vectors:

- **ours**: import, then a from-scratch drain by the real worker (timed, with database
  round trips and peak RSS), then newcomers one at a time (claim → every affected list
  committed), then optionally the brute-force oracle;
- **limit**: the stored vectors, pure numpy: blocked matrix products and argpartition top-k
  with the same exclusions, no database — the issue's yardstick for this machine;
- **core**: our engine's matching alone on the same vectors, no database: every row's
  exact top k from scratch by screening (EventState.rank_everyone), which beats the
  limit's argpartition; ours / core is then what the service adds to its matching;
- **peer**: what a user would build with pgvector: one `ORDER BY embedding <#> q LIMIT k`
  query and one list upsert per attendee (sampled and extrapolated above `peer_max`), and
  an HNSW index where the extension has it, with its recall against our exact lists.

`--exposure-correction hubness` runs all of the above under the correction;
`--exposure-cost N` instead times the from-scratch drain of N attendees under `none` and
`hubness` in turns, in one process (same machine, same load), and reports the medians and
their ratio (the correction's cost).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import queue
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from core.data import repository as repo
from core.data.connections import connect
from core.data.repository import Conn
from core.embedding.local import LocalEmbedder
from core.matching.engine import CHUNK_ELEMENTS, EventState
from core.matching.scoring import EXCLUDED, Coefficients, pair_scores, to_blocks
from core.models import EventIn, EventRecord, EventSettings, ExposureCorrection, MemberRow
from core.queue.worker import Matchmaker
from core.settings import Settings
from tooling.local_runs import (
    delete_event,
    delete_profiles_with_prefix,
    drain,
    import_profiles,
    recreate_event,
)
from tooling.oracle import verify_event
from tooling.synthetic import generate_profiles

NEWCOMERS = 40
PEER_SAMPLE = 300


@dataclass
class BenchOptions:
    seed: int = 7
    batch_size: int | None = None
    verify: bool = True
    peer: bool = True
    peer_max: int = 2_000  # above: a sample of PEER_SAMPLE users, extrapolated
    hnsw_max: int = 10_000  # HNSW index builds above this take minutes: skipped
    newcomers: int = NEWCOMERS
    exposure_correction: ExposureCorrection = "none"


@dataclass
class SizeResult:
    attendees: int
    drain_s: float
    users_per_s: float
    batches: int
    lists_written: int
    round_trips: int
    peak_rss_mib: float
    newcomer_p50_ms: float
    newcomer_p95_ms: float
    limit_s: float
    ours_over_limit: float
    core_s: float
    ours_over_core: float
    core_agrees: bool  # the core found exactly the drain's lists
    peer_s: float | None = None
    peer_extrapolated: bool = False
    peer_round_trips: int | None = None
    peer_over_ours: float | None = None
    peer_agreement: float | None = None  # share of our list entries the peer also found
    hnsw_build_s: float | None = None
    hnsw_s: float | None = None
    hnsw_recall: float | None = None
    peer_note: str = ""
    verified: bool | None = None
    verify_s: float | None = None


# --- measuring ---------------------------------------------------------------------------


class RoundTrips:
    """Counts the connection's waits on the server: one per statement, BEGIN, COMMIT and
    COPY step — the round trips a remote database would charge latency for."""

    def __init__(self, conn: Conn) -> None:
        self.count = 0
        original = conn.wait

        def counting_wait(gen: Any, *args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return original(gen, *args, **kwargs)

        setattr(conn, "wait", counting_wait)  # noqa: B010 -- instance override on purpose


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q))


@contextmanager
def timed() -> Iterator[Callable[[], float]]:
    start = time.perf_counter()
    end: float | None = None

    def elapsed() -> float:
        return (end if end is not None else time.perf_counter()) - start

    yield elapsed
    end = time.perf_counter()


# --- the compute limit --------------------------------------------------------------------


def compute_limit(
    vectors: np.ndarray[Any, Any], company: np.ndarray[Any, Any], coef: Coefficients, k: int
) -> float:
    """Seconds for exact top-k of every row, pure numpy: blocked products + argpartition."""
    blocks = to_blocks(vectors)
    n = vectors.shape[0]
    rows_per_block = max(1, CHUNK_ELEMENTS // n)
    start = time.perf_counter()
    for first in range(0, n, rows_per_block):
        rows = np.arange(first, min(first + rows_per_block, n))
        scores = pair_scores(blocks[:, rows], blocks, coef)
        scores[np.arange(rows.size), rows] = EXCLUDED
        same = (company[rows][:, None] == company[None, :]) & (company[rows][:, None] >= 0)
        scores[same] = EXCLUDED
        best = np.argpartition(scores, n - k, axis=1)[:, n - k :]
        order = np.argsort(-np.take_along_axis(scores, best, axis=1), axis=1)
        np.take_along_axis(best, order, axis=1)
    return time.perf_counter() - start


def matching_core(
    event: EventRecord, stored: StoredEvent, embedder: LocalEmbedder
) -> tuple[float, bool]:
    """Seconds for our engine's exact top-k of every attendee from scratch, no database;
    and whether it found exactly the lists the drain stored."""
    state = EventState.from_members(event, embedder.key, embedder.dim, stored.members)
    start = time.perf_counter()
    idx, _ = state.rank_everyone()
    elapsed = time.perf_counter() - start
    found = {
        int(state.profile_ids[row]): [int(state.profile_ids[c]) for c in idx[row] if c >= 0]
        for row in range(state.n)
    }
    return elapsed, {owner: lst for owner, lst in found.items() if lst} == stored.lists


# --- the pgvector peer --------------------------------------------------------------------


def peer_vectors(
    vectors: np.ndarray[Any, Any], coef: Coefficients
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Stored x = [I | O | S | B] and query q = [ci·I | cc·S | cc·O | cb·B], so that
    q_A · x_B is exactly our score(A, B): one inner product per pair, pgvector's `<#>`."""
    d = vectors.shape[1] // 4
    v = vectors.astype(np.float64)
    interests, seeking, offering, bio = (v[:, i * d : (i + 1) * d] for i in range(4))
    stored = np.hstack([interests, offering, seeking, bio])
    query_side = np.hstack(
        [
            coef.interests * interests,
            coef.complement * seeking,
            coef.complement * offering,
            coef.bio * bio,
        ]
    )
    return stored, query_side


def vector_literal(row: np.ndarray[Any, Any]) -> str:
    return "[" + ",".join(f"{x:.9g}" for x in row.tolist()) + "]"


PEER_QUERY = """
SELECT profile_id, -(embedding <#> %(q)s::vector) AS score
  FROM bench_peer
 WHERE profile_id <> %(me)s AND (company = '' OR company <> %(company)s)
 ORDER BY embedding <#> %(q)s::vector
 LIMIT %(k)s
"""


@dataclass
class StoredEvent:
    """An event's matchable attendees as stored: the input of the limit and the peer."""

    ids: list[int]
    company: list[str]
    vectors: np.ndarray[Any, Any]
    coef: Coefficients
    k: int
    lists: dict[int, list[int]]  # our lists as the drain left them: owner -> matched
    members: list[MemberRow]


def run_peer(
    conn: Conn, stored: StoredEvent, sample: list[int]
) -> tuple[float, int, dict[int, list[int]]]:
    """Per-user query + per-user list upsert for the `sample` rows; (seconds, trips, lists)."""
    trips = RoundTrips(conn)
    lists: dict[int, list[int]] = {}
    ids, company = stored.ids, stored.company
    _, query_side = peer_vectors(stored.vectors, stored.coef)
    literals = {i: vector_literal(query_side[i]) for i in sample}
    start = time.perf_counter()
    for i in sample:
        found = conn.execute(
            PEER_QUERY, {"q": literals[i], "me": ids[i], "company": company[i], "k": stored.k}
        ).fetchall()
        with conn.transaction():
            conn.execute("DELETE FROM bench_peer_matches WHERE owner = %s", (ids[i],))
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO bench_peer_matches (owner, rank, matched, score)"
                    " VALUES (%s, %s, %s, %s)",
                    [(ids[i], rank, pid, score) for rank, (pid, score) in enumerate(found, 1)],
                )
        lists[ids[i]] = [pid for pid, _ in found]
    return time.perf_counter() - start, trips.count, lists


def load_peer(conn: Conn, event: StoredEvent) -> None:
    stored, _ = peer_vectors(event.vectors, event.coef)
    dims = stored.shape[1]
    conn.execute("DROP TABLE IF EXISTS bench_peer, bench_peer_matches")
    conn.execute(
        sql.SQL(
            "CREATE TABLE bench_peer (profile_id bigint PRIMARY KEY, company text NOT NULL,"
            " embedding vector({}) NOT NULL)"
        ).format(sql.Literal(dims))
    )
    conn.execute(
        "CREATE TABLE bench_peer_matches (owner bigint, rank int, matched bigint,"
        " score float8, PRIMARY KEY (owner, rank))"
    )
    with conn.cursor() as cur, cur.copy("COPY bench_peer FROM STDIN") as copy:
        for pid, comp, row in zip(event.ids, event.company, stored, strict=True):
            copy.write_row((pid, comp, vector_literal(row)))
    conn.execute("ANALYZE bench_peer")


# --- one size, in a child process --------------------------------------------------------


def warm_up(conn: Conn, settings: Settings) -> None:
    """A small event first, untimed: imports, BLAS threads and caches are warm, as in a
    warm Lambda container, so the figures measure matching rather than process start."""
    event_in = EventIn(code="bench-warm-up", settings=EventSettings())
    recreate_event(conn, event_in)
    delete_profiles_with_prefix(conn, "benchwarm-")
    event = import_profiles(conn, event_in, generate_profiles(200, seed=1, id_prefix="benchwarm-"))
    drain(conn, Matchmaker(settings), show_progress=False)
    clean_up(conn, event, "benchwarm-")


def run_size(db_url: str, settings: Settings, size: int, options: BenchOptions) -> SizeResult:
    conn = connect(db_url, settings, application_name="matchmaker-bench")
    warm_up(conn, settings)
    prefix = f"bench{size}-"
    event_in = EventIn(
        code=f"bench-{size}",
        settings=EventSettings(exposure_correction=options.exposure_correction),
    )
    recreate_event(conn, event_in)  # first: deleting the event is the cheap cascade
    delete_profiles_with_prefix(conn, prefix)
    event = import_profiles(
        conn, event_in, generate_profiles(size, seed=options.seed, id_prefix=prefix)
    )
    matchmaker = Matchmaker(settings)
    trips = RoundTrips(conn)
    with timed() as drain_s:
        report = drain(conn, matchmaker, batch_size=options.batch_size, show_progress=False)
    drain_trips = trips.count
    print(f"  {size}: drained in {drain_s():.2f}s", file=sys.stderr, flush=True)

    # The limit and the peer get exactly the N stored vectors the drain produced.
    stored = stored_event(conn, event)
    latencies = newcomer_latencies(conn, matchmaker, event, options, prefix)
    rss = peak_rss_mib()

    verified: bool | None = None
    verify_s: float | None = None
    if options.verify:
        with timed() as elapsed:
            verified = verify_event(conn, event, LocalEmbedder().key).ok
        verify_s = elapsed()
        print(f"  {size}: verified={verified} in {verify_s:.1f}s", file=sys.stderr, flush=True)

    codes = {name: c for c, name in enumerate(sorted(set(stored.company)))}
    company = np.array([codes[name] if name else -1 for name in stored.company])
    limit_s = compute_limit(stored.vectors, company, stored.coef, stored.k)
    core_s, core_agrees = matching_core(event, stored, LocalEmbedder())
    print(
        f"  {size}: compute limit {limit_s:.2f}s, matching core {core_s:.2f}s",
        file=sys.stderr,
        flush=True,
    )

    result = SizeResult(
        attendees=size,
        drain_s=round(drain_s(), 3),
        users_per_s=round(size / drain_s(), 1),
        batches=report.batches,
        lists_written=report.lists_written,
        round_trips=drain_trips,
        peak_rss_mib=round(rss, 1),
        newcomer_p50_ms=round(percentile(latencies, 50) * 1000, 1),
        newcomer_p95_ms=round(percentile(latencies, 95) * 1000, 1),
        limit_s=round(limit_s, 5),
        ours_over_limit=round(drain_s() / limit_s, 2),
        core_s=round(core_s, 5),
        ours_over_core=round(drain_s() / core_s, 2),
        core_agrees=core_agrees,
        verified=verified,
        verify_s=None if verify_s is None else round(verify_s, 2),
    )
    if options.peer:
        measure_peer(conn, result, event, stored, options)
    clean_up(conn, event, prefix)
    conn.close()
    return result


def clean_up(conn: Conn, event: EventRecord, prefix: str) -> None:
    """Drop the benchmark's event and profiles. The event goes first (its lists with it);
    a VACUUM then leaves user_matches small for the per-profile cascade of the delete,
    which may take longer than the service's statement timeout at 50,000 profiles."""
    delete_event(conn, event.code)
    conn.execute("SET statement_timeout = 0")
    conn.execute("VACUUM user_matches")
    delete_profiles_with_prefix(conn, prefix)
    conn.execute("RESET statement_timeout")


def newcomer_latencies(
    conn: Conn, matchmaker: Matchmaker, event: EventRecord, options: BenchOptions, prefix: str
) -> list[float]:
    """Join one newcomer at a time; time claim → batch committed (every affected list)."""
    event_in = EventIn(code=event.code, settings=event.settings)
    latencies = []
    newcomers = generate_profiles(options.newcomers, seed=options.seed + 1, id_prefix=prefix + "n")
    for profile in newcomers:
        import_profiles(conn, event_in, [profile])
        start = time.perf_counter()
        claimed = repo.claim(conn, 1, matchmaker.settings.lease_seconds, event.id)
        batch = matchmaker.process_claimed(conn, claimed)
        latencies.append(time.perf_counter() - start)
        if batch.completed != 1:
            raise RuntimeError(f"newcomer {profile.user_id} was not matched: {batch.error}")
    return latencies


def stored_event(conn: Conn, event: EventRecord) -> StoredEvent:
    members = [
        m
        for m in repo.member_rows(conn, event.id, LocalEmbedder().key, None)
        if m.active and m.vector is not None
    ]
    return StoredEvent(
        ids=[m.profile_id for m in members],
        company=[m.company.strip().casefold() for m in members],
        vectors=np.stack([np.frombuffer(m.vector or b"", dtype="<i2") for m in members]),
        coef=Coefficients.from_weights(event.settings.weights),
        k=event.settings.k,
        lists={
            owner: [matched for _, matched, _ in entries]
            for owner, entries in group_lists(repo.event_lists(conn, event.id)).items()
        },
        members=members,
    )


def measure_peer(
    conn: Conn, result: SizeResult, event: EventRecord, stored: StoredEvent, options: BenchOptions
) -> None:
    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    except psycopg.Error as exc:
        result.peer_note = f"pgvector unavailable: {type(exc).__name__}"
        return
    n = len(stored.ids)
    load_peer(conn, stored)
    if n <= options.peer_max:
        sample = list(range(n))
    else:
        sample = np.random.default_rng(options.seed).choice(n, PEER_SAMPLE, replace=False).tolist()
        result.peer_extrapolated = True
    ours = stored.lists
    peer_s, peer_trips, found = run_peer(conn, stored, sample)
    scale = n / len(sample)
    result.peer_s = round(peer_s * scale, 2)
    result.peer_round_trips = round(peer_trips * scale)
    result.peer_over_ours = round(result.peer_s / result.drain_s, 1)
    result.peer_agreement = agreement(found, ours)
    print(f"  {result.attendees}: peer {result.peer_s:.1f}s", file=sys.stderr, flush=True)

    if n <= options.hnsw_max:
        with timed() as build_s:
            conn.execute("CREATE INDEX ON bench_peer USING hnsw (embedding vector_ip_ops)")
            conn.execute("ANALYZE bench_peer")
        hnsw_s, _, approx = run_peer(conn, stored, sample)
        result.hnsw_build_s = round(build_s(), 2)
        result.hnsw_s = round(hnsw_s * scale, 2)
        result.hnsw_recall = agreement(approx, ours)
    conn.execute("DROP TABLE IF EXISTS bench_peer, bench_peer_matches")


def agreement(found: dict[int, list[int]], ours: dict[int, list[int]]) -> float | None:
    """Share of our (exact) list entries that `found` has too, over found's owners."""
    total = sum(len(ours.get(owner, [])) for owner in found)
    hits = sum(len(set(found[owner]) & set(ours.get(owner, []))) for owner in found)
    return round(hits / total, 4) if total else None


def group_lists(
    entries: list[tuple[int, int, int, float]],
) -> dict[int, list[tuple[int, int, float]]]:
    out: dict[int, list[tuple[int, int, float]]] = {}
    for owner, rank, matched, score in sorted(entries):
        out.setdefault(owner, []).append((rank, matched, score))
    return out


def _child(db_url: str, settings: Settings, size: int, options: BenchOptions, results: Any) -> None:
    results.put(asdict(run_size(db_url, settings, size, options)))


def run_in_child(db_url: str, settings: Settings, size: int, options: BenchOptions) -> SizeResult:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_child, args=(db_url, settings, size, options, results))
    child.start()
    while True:
        try:
            data = results.get(timeout=1)
            break
        except queue.Empty:
            if not child.is_alive():
                raise RuntimeError(
                    f"benchmark of {size} attendees failed (exit {child.exitcode})"
                ) from None
    child.join()
    return SizeResult(**data)


# --- the exposure correction's cost --------------------------------------------------------

EXPOSURE_MODES: tuple[ExposureCorrection, ...] = ("none", "hubness")


@dataclass
class ExposureCost:
    """From-scratch drains of the same attendees under each setting, in turns."""

    attendees: int
    drains_s: dict[str, list[float]]
    verified: bool | None  # the oracle on the last hubness event

    def median_s(self, mode: str) -> float:
        return float(np.median(self.drains_s[mode]))

    @property
    def ratio(self) -> float:
        """hubness over none: 1.25 is the issue's ceiling."""
        return self.median_s("hubness") / self.median_s("none")


def exposure_cost(
    db_url: str, settings: Settings, size: int, options: BenchOptions, rounds: int = 3
) -> ExposureCost:
    """Time `rounds` from-scratch drains by the real worker per setting, alternating (a
    shared machine's load then weighs on both alike)."""
    conn = connect(db_url, settings, application_name="matchmaker-bench")
    warm_up(conn, settings)
    drains: dict[str, list[float]] = {mode: [] for mode in EXPOSURE_MODES}
    verified: bool | None = None
    for round_no in range(rounds):
        for mode in EXPOSURE_MODES:
            prefix = f"benchx{size}{mode[0]}{round_no}-"
            event_in = EventIn(
                code=f"bench-exposure-{mode}-{size}",
                settings=EventSettings(exposure_correction=mode),
            )
            recreate_event(conn, event_in)
            delete_profiles_with_prefix(conn, prefix)
            profiles = generate_profiles(size, seed=options.seed, id_prefix=prefix)
            event = import_profiles(conn, event_in, profiles)
            with timed() as drain_s:
                report = drain(
                    conn, Matchmaker(settings), batch_size=options.batch_size, show_progress=False
                )
            drains[mode].append(round(drain_s(), 3))
            print(
                f"  {size} {mode}: drained in {drain_s():.2f}s, {report.batches} batches",
                file=sys.stderr,
                flush=True,
            )
            if options.verify and mode == "hubness" and round_no == rounds - 1:
                verified = verify_event(conn, event, LocalEmbedder().key).ok
            clean_up(conn, event, prefix)
    conn.close()
    return ExposureCost(attendees=size, drains_s=drains, verified=verified)


def format_exposure_cost(cost: ExposureCost) -> str:
    runs = "; ".join(
        f"{mode} {', '.join(f'{s:.2f}' for s in cost.drains_s[mode])}" for mode in EXPOSURE_MODES
    )
    return (
        f"exposure correction, {cost.attendees} attendees from scratch: none median"
        f" {cost.median_s('none'):.2f}s, hubness median {cost.median_s('hubness'):.2f}s,"
        f" hubness/none {cost.ratio:.2f} (drains: {runs}; verified={cost.verified})"
    )


# --- the report ----------------------------------------------------------------------------

# (field, title, decimals); None decimals: shown as is
COLUMNS: list[tuple[str, str, int | None]] = [
    ("attendees", "attendees", None),
    ("drain_s", "drain s", 2),
    ("users_per_s", "users/s", 0),
    ("round_trips", "trips", None),
    ("peak_rss_mib", "RSS MiB", 0),
    ("limit_s", "limit s", 2),
    ("ours_over_limit", "ours/limit", 2),
    ("core_s", "core s", 2),
    ("ours_over_core", "ours/core", 2),
    ("peer_s", "peer s", 1),
    ("peer_over_ours", "peer/ours", 1),
    ("hnsw_s", "hnsw s", 1),
    ("hnsw_recall", "recall", 3),
    ("newcomer_p50_ms", "new p50 ms", 1),
    ("newcomer_p95_ms", "new p95 ms", 1),
    ("verified", "verified", None),
]


def format_table(results: list[SizeResult]) -> str:
    widths = [max(len(title), 9) for _, title, _ in COLUMNS]
    lines = [" ".join(f"{title:>{w}}" for (_, title, _), w in zip(COLUMNS, widths, strict=True))]
    for result in results:
        cells = []
        for (key, _, decimals), width in zip(COLUMNS, widths, strict=True):
            value = getattr(result, key)
            if value is None:
                text = "-"
            elif decimals is None or isinstance(value, bool):
                text = str(value)
            else:
                text = f"{value:.{decimals}f}"
            if key == "peer_s" and result.peer_extrapolated:
                text = "~" + text
            cells.append(f"{text:>{width}}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def run_bench(
    db_url: str, settings: Settings, sizes: list[int], options: BenchOptions, json_path: Path | None
) -> list[SizeResult]:
    results = []
    for size in sizes:
        print(f"benchmarking {size} attendees...", file=sys.stderr, flush=True)
        results.append(run_in_child(db_url, settings, size, options))
    print(format_table(results))
    notes = [f"{r.attendees}: {r.peer_note}" for r in results if r.peer_note]
    if any(r.peer_extrapolated for r in results):
        notes.append(f"~ peer extrapolated from {PEER_SAMPLE} sampled attendees")
    for note in notes:
        print(note)
    if json_path:
        payload = {
            "machine": machine_description(),
            "settings": {
                "batch_size": options.batch_size or settings.batch_size,
                "bulk_batch_seconds": settings.bulk_batch_seconds,
            },
            "results": [asdict(r) for r in results],
        }
        json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return results


def machine_description() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
    }

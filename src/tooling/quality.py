"""`matchmaker eval`: the quality of the lists against a planted truth (issue 17.4).

For each event size, one planted event (tooling.planted) is matched once per exposure
correction mode, each in a fresh event of its own (its own attendee ids, so the second
mode embeds and matches from scratch like the first), by the real worker on the database:

- **drain**: import, then a from-scratch drain, timed;
- **precision@k**: the share of listed people who are relevant by the planted truth,
  averaged over attendees with a list (a random list's precision, the truth's base rate,
  is printed as the floor);
- **coverage**: the share of active attendees who appear on at least one other list;
- **exposure**: the Gini coefficient of appearances and the most-listed attendee's count,
  from the event status (core.api.status: the same figures the admin status shows);
- **churn per join**: newcomers (the next attendees of the same planted stream) join one at
  a time, each drained alone; for each, how many existing lists changed (their ordered
  members differ), how many lists the worker wrote and how long its drain took.

The correction is set through the service's settings path (the admin API's settings
PATCH), so the evaluation uses the setting as an operator would.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from core.api import service
from core.api.principals import Principal
from core.api.schemas import SettingsPatch
from core.api.status import event_status
from core.data import repository as repo
from core.data.repository import Conn
from core.models import EventIn, EventRecord, EventSettings
from core.queue.worker import Matchmaker
from core.settings import Settings
from tooling.bench import clean_up
from tooling.local_runs import (
    delete_profiles_with_prefix,
    drain,
    import_profiles,
    recreate_event,
)
from tooling.planted import PlantedEvent, generate_planted, relevance_base_rate
from tooling.progress import Progress

MODES = ("none", "hubness")
WARM_UP_ATTENDEES = 200
MOST_LISTED_SHARE = 0.01

Lists = Mapping[int, Sequence[int]]  # owner -> listed attendees, in rank order
Truth = Callable[[np.ndarray[Any, Any], np.ndarray[Any, Any]], np.ndarray[Any, Any]]


class EvalError(Exception):
    """The evaluation cannot run as asked (e.g. a mode this build does not have)."""


# --- metrics on lists (pure) ----------------------------------------------------------------


def precision_at_k(lists: Lists, truth: Truth) -> float | None:
    """Mean over owners with a non-empty list of the share of its entries that are
    relevant; None when nobody has a list. `truth(a, b)` judges the pairs (a[i], b[i])."""
    owners = [owner for owner, listed in lists.items() if listed]
    if not owners:
        return None
    a = np.array([owner for owner in owners for _ in lists[owner]], dtype=np.int64)
    b = np.array([m for owner in owners for m in lists[owner]], dtype=np.int64)
    hits = truth(a, b).astype(np.float64)
    sizes = np.array([len(lists[owner]) for owner in owners], dtype=np.float64)
    per_owner = np.add.reduceat(hits, np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int))
    return float(np.mean(per_owner / sizes))


def appearances(lists: Lists) -> Counter[int]:
    """How many lists each listed attendee is on."""
    return Counter(m for listed in lists.values() for m in listed)


def coverage(lists: Lists, attendees: int) -> float | None:
    """Share of the `attendees` who appear on at least one list (someone else's: no list
    holds its owner)."""
    return len(appearances(lists)) / attendees if attendees else None


def generic_share_of_most_listed(lists: Lists, generic: Sequence[bool], top_n: int) -> float | None:
    """Of the `top_n` most-listed attendees (ties by index), the fraction that is generic
    (`generic[i]`: whether attendee i is)."""
    top = most_listed(lists, top_n)
    return sum(generic[person] for person in top) / len(top) if top else None


def most_listed(lists: Lists, top_n: int) -> list[int]:
    """The `top_n` most-listed attendees, ties by index."""
    counts = appearances(lists)
    return sorted(counts, key=lambda person: (-counts[person], person))[: max(top_n, 0)]


def precision_naming(lists: Lists, truth: Truth, named: set[int]) -> float | None:
    """The share of relevant entries among the list entries that name someone in `named`
    (are the most-listed people listed for good reasons?); None when no entry does."""
    pairs = [(owner, m) for owner, listed in lists.items() for m in listed if m in named]
    if not pairs:
        return None
    a, b = (np.array(side, dtype=np.int64) for side in zip(*pairs, strict=True))
    return float(truth(a, b).mean())


def changed_lists(before: Lists, after: Lists) -> int:
    """How many of the lists in `before` differ in `after` (other members or another
    order; a list that is gone counts as changed). New owners in `after` do not count."""
    return sum(1 for owner, listed in before.items() if list(after.get(owner, ())) != list(listed))


@dataclass(frozen=True)
class Spread:
    mean: float
    p95: float
    max: float


def spread(counts: Sequence[float]) -> Spread | None:
    if not counts:
        return None
    values = np.asarray(counts, dtype=np.float64)
    return Spread(float(values.mean()), float(np.percentile(values, 95)), float(values.max()))


# --- one mode on one event --------------------------------------------------------------------


@dataclass
class ModeResult:
    mode: str
    attendees: int
    k: int
    drain_s: float
    precision: float | None
    coverage: float | None
    gini: float | None
    max_appearances: int
    mean_appearances: float | None
    # Of the 1 % most-listed attendees, the share whose profiles are generic (mostly hub
    # words, tooling.planted): whether the hubs are the planted ones.
    generic_among_most_listed: float | None = None
    # precision@k restricted to the list entries that name one of those 1 %.
    precision_naming_most_listed: float | None = None
    joins: int = 0
    churn: Spread | None = None
    written: Spread | None = None
    join_drain_ms: Spread | None = None


@dataclass
class SizeComparison:
    attendees: int
    seed: int
    base_rate: float  # the precision of a random list
    modes: list[ModeResult] = field(default_factory=list)


@dataclass
class EvalOptions:
    sizes: list[int]
    seed: int = 7
    joins: int = 20
    modes: list[str] = field(default_factory=lambda: list(MODES))
    hubness_m: int | None = None  # None: the event's default
    show_progress: bool = True


def check_modes(modes: Sequence[str]) -> None:
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise EvalError(f"unknown mode(s) {', '.join(unknown)}: choose from {', '.join(MODES)}")
    if not modes:
        raise EvalError("give at least one mode")


def set_exposure_correction(conn: Conn, code: str, mode: str, hubness_m: int | None) -> EventRecord:
    """Set the mode through the service's settings path (the admin settings PATCH)."""
    patch: dict[str, Any] = {"exposure_correction": mode}
    if hubness_m is not None:
        patch["hubness_m"] = hubness_m
    admin = Principal("matchmaker-eval", "admin")
    service.update_settings(conn, admin, code, SettingsPatch.model_validate(patch), service.no_wake)
    event = repo.fetch_event(conn, code)
    assert event is not None  # created by the caller
    return event


def lists_by_profile(conn: Conn, event_id: int) -> dict[int, list[int]]:
    lists: dict[int, list[int]] = {}
    for owner, _rank, matched, _score in sorted(repo.event_lists(conn, event_id)):
        lists.setdefault(owner, []).append(matched)
    return lists


def lists_by_index(conn: Conn, event_id: int, index_of: Mapping[str, int]) -> dict[int, list[int]]:
    """The stored lists with attendees as indices of the planted event."""
    return {
        index_of[entry["user_id"]]: [index_of[m["user_id"]] for m in entry["matches"]]
        for entry in repo.export_lists(conn, event_id)
    }


def _say(out: TextIO, text: str) -> None:
    print(text, file=out, flush=True)


def run_mode(
    conn: Conn,
    settings: Settings,
    *,
    size: int,
    mode: str,
    options: EvalOptions,
    progress_out: TextIO = sys.stderr,
) -> ModeResult:
    """One planted event of `size` under `mode`: drain, quality, churn; cleaned up after."""
    prefix = f"eval{size}{mode[:3]}-"
    code = f"eval-{size}-{mode}"
    planted = generate_planted(size + options.joins, seed=options.seed, id_prefix=prefix)
    recreate_event(conn, EventIn(code=code, settings=EventSettings()))
    delete_profiles_with_prefix(conn, prefix)
    event = set_exposure_correction(conn, code, mode, options.hubness_m)
    event_in = EventIn(code=code, settings=event.settings)
    try:
        import_profiles(conn, event_in, planted.profiles[:size])
        matchmaker = Matchmaker(settings)
        start = time.perf_counter()
        drain(conn, matchmaker, show_progress=options.show_progress)
        drain_s = time.perf_counter() - start
        _say(progress_out, f"eval {size} {mode}: drained in {drain_s:.2f}s")
        result = measure_lists(
            conn, settings, event=event, planted=planted, mode=mode, drain_s=drain_s
        )
        joins = join_one_at_a_time(
            conn, matchmaker, event_in=event_in, planted=planted, size=size, options=options
        )
        result.joins = len(joins.changed)
        result.churn, result.written = spread(joins.changed), spread(joins.written)
        result.join_drain_ms = spread(joins.drain_ms)
    finally:
        clean_up(conn, event, prefix)
    return result


def measure_lists(
    conn: Conn,
    settings: Settings,
    *,
    event: EventRecord,
    planted: PlantedEvent,
    mode: str,
    drain_s: float,
) -> ModeResult:
    active = repo.event_size(conn, event.id)
    lists = lists_by_index(conn, event.id, planted.index_of())
    exposure = event_status(conn, event, settings, lambda: None).exposure
    top_n = max(1, round(MOST_LISTED_SHARE * active))
    return ModeResult(
        mode=mode,
        attendees=active,
        k=event.settings.k,
        drain_s=drain_s,
        precision=precision_at_k(lists, planted.relevant_pairs),
        coverage=coverage(lists, active),
        gini=exposure.gini,
        max_appearances=exposure.max_appearances,
        mean_appearances=exposure.mean_appearances,
        generic_among_most_listed=generic_share_of_most_listed(
            lists, [person.generic for person in planted.latent], top_n
        ),
        precision_naming_most_listed=precision_naming(
            lists, planted.relevant_pairs, set(most_listed(lists, top_n))
        ),
    )


@dataclass
class JoinFigures:
    """Per newcomer, in join order."""

    changed: list[int] = field(default_factory=list)  # existing lists that changed
    written: list[int] = field(default_factory=list)  # lists the worker wrote
    drain_ms: list[float] = field(default_factory=list)  # the newcomer's drain, alone


def join_one_at_a_time(
    conn: Conn,
    matchmaker: Matchmaker,
    *,
    event_in: EventIn,
    planted: PlantedEvent,
    size: int,
    options: EvalOptions,
) -> JoinFigures:
    event = repo.fetch_event(conn, event_in.code)
    assert event is not None
    figures = JoinFigures()
    newcomers = planted.profiles[size : size + options.joins]
    progress = Progress("joins", len(newcomers)) if options.show_progress else None
    before = lists_by_profile(conn, event.id)
    for done, profile in enumerate(newcomers, 1):
        import_profiles(conn, event_in, [profile])
        start = time.perf_counter()
        report = drain(conn, matchmaker, show_progress=False)
        figures.drain_ms.append((time.perf_counter() - start) * 1000)
        after = lists_by_profile(conn, event.id)
        figures.changed.append(changed_lists(before, after))
        figures.written.append(report.lists_written)
        before = after
        if progress:
            progress.update(done)
    if progress:
        progress.finish(len(newcomers))
    return figures


def warm_up(conn: Conn, settings: Settings) -> None:
    """A small event first, untimed, so the first timed drain does not pay for imports
    and caches (as bench does)."""
    prefix, code = "evalwarm-", "eval-warm-up"
    event = recreate_event(conn, EventIn(code=code, settings=EventSettings()))
    delete_profiles_with_prefix(conn, prefix)
    import_profiles(conn, EventIn(code=code), generate_planted(WARM_UP_ATTENDEES).profiles)
    drain(conn, Matchmaker(settings), show_progress=False)
    clean_up(conn, event, prefix)


def run_eval(
    conn: Conn,
    settings: Settings,
    options: EvalOptions,
    progress_out: TextIO = sys.stderr,
    on_size: Callable[[SizeComparison], None] | None = None,
) -> list[SizeComparison]:
    """Every size under every mode; `on_size` sees each size's comparison once measured."""
    check_modes(options.modes)
    warm_up(conn, settings)
    comparisons = []
    for size in options.sizes:
        base = relevance_base_rate(generate_planted(size, seed=options.seed), seed=options.seed)
        comparison = SizeComparison(size, options.seed, base)
        for mode in options.modes:
            _say(progress_out, f"eval {size} {mode}: importing and matching...")
            comparison.modes.append(
                run_mode(
                    conn,
                    settings,
                    size=size,
                    mode=mode,
                    options=options,
                    progress_out=progress_out,
                )
            )
        comparisons.append(comparison)
        if on_size:
            on_size(comparison)
    return comparisons


# --- the report -----------------------------------------------------------------------------


def _number(value: float | None, decimals: int) -> str:
    return "-" if value is None else f"{value:,.{decimals}f}"


def _change(first: float | None, other: float | None) -> str:
    if first is None or other is None or first == 0:
        return "-"
    return f"{(other - first) / first:+.1%}"


# (title, value of a mode, decimals)
ROWS: list[tuple[str, Callable[[ModeResult], float | None], int]] = [
    ("precision@k", lambda r: r.precision, 3),
    ("coverage", lambda r: r.coverage, 3),
    ("Gini of appearances", lambda r: r.gini, 3),
    ("most-listed count", lambda r: r.max_appearances, 0),
    ("mean appearances", lambda r: r.mean_appearances, 2),
    ("generic in top 1% listed", lambda r: r.generic_among_most_listed, 2),
    ("precision naming top 1%", lambda r: r.precision_naming_most_listed, 3),
    ("churn/join mean", lambda r: r.churn.mean if r.churn else None, 2),
    ("churn/join p95", lambda r: r.churn.p95 if r.churn else None, 1),
    ("churn/join max", lambda r: r.churn.max if r.churn else None, 0),
    ("lists written/join mean", lambda r: r.written.mean if r.written else None, 2),
    ("join drain ms mean", lambda r: r.join_drain_ms.mean if r.join_drain_ms else None, 1),
    ("join drain ms p95", lambda r: r.join_drain_ms.p95 if r.join_drain_ms else None, 1),
    ("drain s", lambda r: r.drain_s, 2),
]


def format_comparison(comparison: SizeComparison) -> str:
    """A side-by-side table of the modes; the last column compares the last mode with the
    first (drain: their ratio)."""
    modes = comparison.modes
    k = modes[0].k if modes else 0
    title_width = max(len(title) for title, _, _ in ROWS)
    head = [f"{'':<{title_width}}", *(f"{r.mode:>10}" for r in modes)]
    compare = len(modes) >= 2
    if compare:
        head.append(f"{modes[-1].mode + ' vs ' + modes[0].mode:>18}")
    lines = [
        f"{comparison.attendees:,} attendees (seed {comparison.seed}, k={k}, "
        f"{modes[0].joins if modes else 0} joins; a random list's precision: "
        f"{comparison.base_rate:.3f})",
        " ".join(head),
    ]
    for title, value, decimals in ROWS:
        cells = [f"{title:<{title_width}}"]
        cells += [f"{_number(value(r), decimals):>10}" for r in modes]
        if compare:
            first, last = value(modes[0]), value(modes[-1])
            if title == "drain s" and first and last is not None:
                cells.append(f"{f'x{last / first:.2f}':>18}")
            else:
                cells.append(f"{_change(first, last):>18}")
        lines.append(" ".join(cells))
    return "\n".join(lines)

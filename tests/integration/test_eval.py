"""`matchmaker eval` (tooling.quality) on a real PostgreSQL: the exposure figures it takes
from the event status on hand-made lists, churn against what the worker wrote, the
exposure correction set through the service's settings path, and the command end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from core.data import repository as repo
from core.data.repository import Conn
from core.models import EventIn, EventRecord, ListEntry
from core.settings import Settings
from tooling.local_runs import import_profiles
from tooling.planted import generate_planted
from tooling.quality import (
    EvalOptions,
    measure_lists,
    run_eval,
    set_exposure_correction,
)

N = 40


def planted_event(conn: Conn, code: str, n: int = N) -> tuple[EventRecord, dict[str, int]]:
    """An event of n planted attendees, not matched; their profile ids by user_id."""
    planted = generate_planted(n, seed=3, id_prefix=f"{code}-")
    event = import_profiles(conn, EventIn(code=code), planted.profiles)
    ids = {m.user_id: m.profile_id for m in repo.member_rows(conn, event.id, "none", None)}
    return event, ids


def write_hand_made(conn: Conn, event: EventRecord, lists: dict[int, list[int]]) -> None:
    with conn.transaction():
        repo.write_lists(
            conn,
            event.id,
            {
                owner: [ListEntry(rank, m, 1.0 / rank, []) for rank, m in enumerate(listed, 1)]
                for owner, listed in lists.items()
            },
        )


def test_exposure_of_equal_lists_is_zero(conn: Conn, settings: Settings) -> None:
    """Given hand-made lists where everyone lists the next three attendees (cyclically),
    when the eval measures them,
    then everyone appears exactly three times: Gini 0, most-listed 3, coverage 1, and the
    precision is the planted truth's share over exactly those pairs."""
    event, ids = planted_event(conn, "eval-equal")
    order = sorted(ids.values())
    write_hand_made(
        conn, event, {p: [order[(i + d) % N] for d in (1, 2, 3)] for i, p in enumerate(order)}
    )
    planted = generate_planted(N, seed=3, id_prefix="eval-equal-")
    result = measure_lists(conn, settings, event=event, planted=planted, mode="none", drain_s=0.0)
    assert result.gini == 0
    assert result.max_appearances == 3
    assert result.coverage == 1.0
    index = {ids[p.user_id]: i for i, p in enumerate(planted.profiles)}
    expected = sum(
        planted.relevant(index[order[i]], index[order[(i + d) % N]])
        for i in range(N)
        for d in (1, 2, 3)
    ) / (3 * N)
    assert result.precision == pytest.approx(expected)


def test_exposure_of_one_person_listed_everywhere_is_near_one(
    conn: Conn, settings: Settings
) -> None:
    """Given hand-made lists where everyone lists the same person (who lists one other),
    when the eval measures them,
    then the Gini is near 1, the most-listed count is everyone else, and only two people
    are covered."""
    event, ids = planted_event(conn, "eval-hub")
    hub, *others = sorted(ids.values())
    write_hand_made(conn, event, {hub: [others[0]], **{p: [hub] for p in others}})
    planted = generate_planted(N, seed=3, id_prefix="eval-hub-")
    result = measure_lists(conn, settings, event=event, planted=planted, mode="none", drain_s=0.0)
    assert result.gini is not None and result.gini > 0.9
    assert result.max_appearances == N - 1
    assert result.coverage == pytest.approx(2 / N)


def test_eval_none_end_to_end_in_process(conn: Conn, settings: Settings) -> None:
    """Given 200 planted attendees,
    when the eval runs mode none with 4 joins,
    then the lists beat a random list's precision, the figures are in range, a join never
    changes more lists than the worker wrote, and the eval's events are cleaned up."""
    options = EvalOptions(sizes=[200], seed=5, joins=4, modes=["none"], show_progress=False)
    (comparison,) = run_eval(conn, settings, options)
    (result,) = comparison.modes
    assert result.mode == "none"
    assert result.attendees == 200
    assert result.precision is not None and result.precision > comparison.base_rate
    assert result.coverage is not None and 0 < result.coverage <= 1
    assert result.gini is not None and 0 <= result.gini < 1
    assert result.mean_appearances == pytest.approx(3.0, abs=0.05)
    assert result.max_appearances >= 3
    assert result.generic_among_most_listed is not None
    assert 0 <= result.generic_among_most_listed <= 1
    assert result.precision_naming_most_listed is not None
    assert 0 <= result.precision_naming_most_listed <= 1
    assert result.joins == 4 and result.churn is not None and result.written is not None
    assert result.churn.max <= result.written.max
    assert result.churn.mean <= result.written.mean
    assert result.join_drain_ms is not None and 0 < result.join_drain_ms.mean < 60_000
    assert repo.fetch_event(conn, "eval-200-none") is None
    assert repo.fetch_event(conn, "eval-warm-up") is None


@pytest.mark.parametrize("mode", ["none", "hubness"])
def test_mode_is_set_through_the_settings_path(conn: Conn, mode: str) -> None:
    """The eval sets the event's exposure_correction as the admin settings PATCH does."""
    event, _ = planted_event(conn, f"eval-set-{mode}", n=5)
    updated = set_exposure_correction(conn, event.code, mode, hubness_m=7)
    stored = repo.fetch_event(conn, event.code)
    assert stored is not None
    assert getattr(updated.settings, "exposure_correction") == mode  # noqa: B009
    assert getattr(stored.settings, "exposure_correction") == mode  # noqa: B009
    assert getattr(stored.settings, "hubness_m") == 7  # noqa: B009


# --- the command ------------------------------------------------------------------------------


def run_cli(db_url: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tooling.cli", "eval", *args],
        env={**os.environ, "DATABASE_URL": db_url},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def row(stdout: str, title: str) -> list[str]:
    line = next(line for line in stdout.splitlines() if line.startswith(title))
    return line[len(title) :].split()


@pytest.mark.parametrize(
    "modes",
    ["none", "", "none,hubness"],
    ids=["none", "default", "both"],
)
def test_eval_command_prints_the_table(db_url: str, tmp_path: Path, modes: str) -> None:
    """Given the CLI on a fresh database,
    when `matchmaker eval --attendees 200 --joins 3 --modes MODES` runs (no --modes:
    every mode this build has),
    then it exits 0 and prints one column per mode (and their comparison) with every
    figure, and the JSON holds the same figures; progress goes to stderr."""
    out = tmp_path / "eval.json"
    result = run_cli(
        db_url,
        "--attendees",
        "200",
        "--joins",
        "3",
        *(["--modes", modes] if modes else []),
        "--json",
        str(out),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(
        r"^200 attendees \(seed 7, k=3, 3 joins; a random list's precision: 0\.\d{3}\)$",
        result.stdout,
        re.MULTILINE,
    ), result.stdout
    names = modes.split(",") if modes else ["none", "hubness"]
    header = next(line for line in result.stdout.splitlines() if line.split()[:1] == names[:1])
    assert header.split()[: len(names)] == names
    for title in (
        "precision@k",
        "coverage",
        "Gini of appearances",
        "most-listed count",
        "generic in top 1% listed",
        "precision naming top 1%",
        "churn/join mean",
        "churn/join p95",
        "churn/join max",
        "join drain ms mean",
        "drain s",
    ):
        cells = row(result.stdout, title)
        assert len(cells) == len(names) + (1 if len(names) > 1 else 0), (title, cells)
        assert all(cell != "-" for cell in cells[: len(names)]), (title, cells)
    precision = float(row(result.stdout, "precision@k")[0])
    assert 0 < precision <= 1
    assert "drained in" in result.stderr
    data = json.loads(out.read_text(encoding="utf-8"))
    figures = data["eval"][0]
    assert [m["mode"] for m in figures["modes"]] == names
    assert figures["modes"][0]["precision"] == pytest.approx(precision, abs=0.0005)


def test_eval_command_rejects_bad_options(db_url: str, tmp_path: Path) -> None:
    for args, message in (
        (["--attendees", "1,x"], "--attendees: a comma-separated list of whole numbers"),
        (["--attendees", "1"], "--attendees: every size must be at least 2"),
        (["--modes", "none,fair"], "unknown mode(s) fair"),
        (["--joins", "-1"], "--joins: at least 0"),
    ):
        result = run_cli(db_url, "--modes", "none", *args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr

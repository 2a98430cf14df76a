"""End to end through the real console entry point: each command is a separate process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from core.embedding.local import LocalEmbedder
from tooling.synthetic import generate_profiles

EVENT = "cli-ev"
ATTENDEES = 60
K = 3


def cli(db_url: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `python -m tooling.cli ARGS` against db_url; never raises on a non-zero exit."""
    return subprocess.run(
        [sys.executable, "-m", "tooling.cli", *args],
        env={**os.environ, "DATABASE_URL": db_url},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def write_synthetic(path: Path, n: int = ATTENDEES, prefix: str = "cli-") -> list[str]:
    """n realistic attendees as JSONL; returns their user_ids."""
    profiles = generate_profiles(n, seed=11, id_prefix=prefix)
    path.write_text("".join(p.model_dump_json() + "\n" for p in profiles), encoding="utf-8")
    return [p.user_id for p in profiles]


def assert_clean_failure(result: subprocess.CompletedProcess[str], code: int) -> str:
    """Exit status `code`, a single 'matchmaker: ...' line on stderr, no traceback."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("matchmaker: ")
    return lines[0]


# --------------------------------------------------------------------------- migrate


def test_migrate_applies_once_then_is_a_no_op(empty_db_url: str, tmp_path: Path) -> None:
    """Given an empty database,
    when `migrate` runs twice,
    then the first run applies every migration and the second applies none; both exit 0."""
    first = cli(empty_db_url, "migrate", cwd=tmp_path)
    second = cli(empty_db_url, "migrate", cwd=tmp_path)

    assert first.returncode == 0, first.stderr
    applied = re.findall(r"^applied (\S+\.sql)$", first.stdout, re.MULTILINE)
    assert applied and applied == sorted(applied)
    assert f"{len(applied)} applied, 0 already applied" in first.stdout
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == f"0 applied, {len(applied)} already applied"


# --------------------------------------------------------------------------- the pipeline


def test_import_run_export_status_verify(db_url: str, tmp_path: Path) -> None:
    """Given 60 synthetic attendees in a JSONL file,
    when `import`, `run --quiet`, `export`, `status`, `status --json` and `verify` run as
    separate processes,
    then every attendee gets k=3 well-formed matches (ranks 1..3, scores non-increasing,
    never themselves), run says drained, status reports the event idle with 60 full lists
    and nothing pending, and verify says OK."""
    user_ids = write_synthetic(tmp_path / "people.jsonl")

    imported = cli(db_url, "import", EVENT, "people.jsonl", "--name", "CLI Event", cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert f"imported {ATTENDEES} attendees into {EVENT}; 0 rows rejected" in imported.stdout
    assert imported.stderr == ""

    ran = cli(db_url, "run", "--quiet", cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert f"processed {ATTENDEES} users" in ran.stdout
    assert "0 failed, 0 dead" in ran.stdout
    assert "stopped: drained (nothing pending, running or waiting for a retry)" in ran.stdout

    exported = cli(db_url, "export", EVENT, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    entries = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [e["user_id"] for e in entries] == sorted(user_ids)
    for entry in entries:
        assert set(entry) == {"user_id", "matches"}
        matches = entry["matches"]
        assert all(set(m) == {"user_id", "rank", "score", "reasons"} for m in matches)
        assert [m["rank"] for m in matches] == list(range(1, K + 1)), entry
        scores = [m["score"] for m in matches]
        assert scores == sorted(scores, reverse=True), entry
        others = [m["user_id"] for m in matches]
        assert entry["user_id"] not in others
        assert len(set(others)) == K
        assert set(others) <= set(user_ids)
        assert all(isinstance(m["reasons"], list) and m["reasons"] for m in matches)

    to_file = cli(db_url, "export", EVENT, "-o", "lists.jsonl", cwd=tmp_path)
    assert to_file.returncode == 0, to_file.stderr
    assert (tmp_path / "lists.jsonl").read_text(encoding="utf-8") == exported.stdout

    status = cli(db_url, "status", EVENT, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert f"event {EVENT} (CLI Event): k=3, exclude_same_company=True" in status.stdout
    assert "  state: idle - nothing queued" in status.stdout
    assert f"coverage: {ATTENDEES}/{ATTENDEES} active attendees with a full list" in status.stdout
    assert (
        "now: pending 0 (p3=0 p2=0 p1=0 p0=0), running 0, waiting for a retry 0, dead 0"
        in status.stdout
    )

    status_json = cli(db_url, "status", EVENT, "--json", cwd=tmp_path)
    assert status_json.returncode == 0, status_json.stderr
    figures = json.loads(status_json.stdout)
    assert figures["event"] == EVENT
    coverage = figures["coverage"]
    assert (coverage["active"], coverage["full_lists"], coverage["without_list"]) == (
        ATTENDEES,
        ATTENDEES,
        0,
    )
    queue = figures["queue"]
    assert queue["pending_by_priority"] == {"0": 0, "1": 0, "2": 0, "3": 0}
    assert (queue["running"], queue["waiting_retry"], queue["dead"]) == (0, 0, 0)
    assert figures["state"] == "idle"
    assert figures["totals"]["processed"] == ATTENDEES

    verified = cli(db_url, "verify", EVENT, cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout
    assert f"verify: OK - {ATTENDEES} lists equal the brute-force top-k" in verified.stdout
    # it says which embedder it checked against, and why that one is in effect
    assert f"verify: against the embedder {LocalEmbedder().key}" in verified.stdout
    assert "the event asks for the local embedder" in verified.stdout


def test_verify_fails_and_names_the_user_of_a_corrupted_list(db_url: str, tmp_path: Path) -> None:
    """Given an imported and matched event,
    when one user's rank-1 score is altered directly in the database,
    then `verify` exits 1, reports FAILED and names that user."""
    user_ids = write_synthetic(tmp_path / "people.jsonl", n=30)
    assert cli(db_url, "import", EVENT, "people.jsonl", cwd=tmp_path).returncode == 0
    assert cli(db_url, "run", "--quiet", cwd=tmp_path).returncode == 0
    victim = user_ids[7]
    with psycopg.connect(db_url, autocommit=True) as conn:
        changed = conn.execute(
            "UPDATE user_matches SET score = score + 1 WHERE rank = 1"
            " AND profile_id = (SELECT id FROM profiles WHERE user_id = %s)",
            (victim,),
        ).rowcount
    assert changed == 1

    result = cli(db_url, "verify", EVENT, cwd=tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "verify: FAILED - 1 of 30 lists differ" in result.stdout
    assert re.search(rf"^  {re.escape(victim)}: expected ", result.stdout, re.MULTILINE)
    others = set(user_ids) - {victim}
    assert not any(f"  {u}: expected" in result.stdout for u in others)


# --------------------------------------------------------------------------- import errors


def test_import_with_bad_rows_exits_1_and_imports_the_good_rows(
    db_url: str, tmp_path: Path
) -> None:
    """Given a JSONL file of good attendees with two bad rows (lines 3 and 6),
    when it is imported,
    then the command exits 1, prints `file:line N: reason` for each bad row on stderr,
    and the good rows are stored and exported."""
    good = generate_profiles(5, seed=3, id_prefix="good-")
    lines = [p.model_dump_json() for p in good]
    lines.insert(2, json.dumps({"user_id": "bad id!", "name": "x"}))
    lines.insert(5, json.dumps({"user_id": "bad-2", "interests": "not a list"}))
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    result = cli(db_url, "import", EVENT, "mixed.jsonl", cwd=tmp_path)

    assert result.returncode == 1, result.stderr
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2, result.stderr
    assert errors[0].startswith("mixed.jsonl: line 3: user_id: ")
    assert errors[1].startswith("mixed.jsonl: line 6: interests: ")
    assert "Traceback" not in result.stderr
    assert f"imported 5 attendees into {EVENT}; 2 rows rejected" in result.stdout
    exported = cli(db_url, "export", EVENT, cwd=tmp_path)
    assert [json.loads(line)["user_id"] for line in exported.stdout.splitlines()] == [
        p.user_id for p in good
    ]


def test_import_into_an_invalid_event_code_exits_2(db_url: str, tmp_path: Path) -> None:
    """Given a valid file,
    when it is imported into the event code 'no spaces!',
    then the command exits 2 with one 'invalid input' line naming the code, and stores
    nothing."""
    write_synthetic(tmp_path / "people.jsonl", n=3)

    result = cli(db_url, "import", "no spaces!", "people.jsonl", cwd=tmp_path)

    line = assert_clean_failure(result, 2)
    assert line.startswith("matchmaker: invalid input: code: ")
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM profiles").fetchone() == (0,)


@pytest.mark.parametrize(
    ("file_name", "content", "expected"),
    [
        ("people.txt", '{"user_id": "ann"}\n', "unsupported import file extension '.txt'"),
        ("people", '{"user_id": "ann"}\n', "unsupported import file extension '(none)'"),
        ("missing.jsonl", None, "missing.jsonl"),
    ],
    ids=["txt", "no-extension", "missing"],
)
def test_import_of_an_unusable_file_exits_2(
    db_url: str, tmp_path: Path, file_name: str, content: str | None, expected: str
) -> None:
    """Given a file with an unsupported extension, or no file at all,
    when it is imported,
    then the command exits 2 with a one-line message naming the problem, no traceback,
    and does not even create the event."""
    if content is not None:
        (tmp_path / file_name).write_text(content, encoding="utf-8")

    result = cli(db_url, "import", EVENT, file_name, cwd=tmp_path)

    line = assert_clean_failure(result, 2)
    assert expected in line
    assert result.stdout == ""
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (0,)


def test_import_of_a_directory_exits_2(db_url: str, tmp_path: Path) -> None:
    """Given a directory named like an import file,
    when it is imported,
    then the command exits 2 with a one-line message and no traceback."""
    (tmp_path / "people.jsonl").mkdir()

    result = cli(db_url, "import", EVENT, "people.jsonl", cwd=tmp_path)

    line = assert_clean_failure(result, 2)
    assert "people.jsonl" in line


# --------------------------------------------------------------------------- unknown event


@pytest.mark.parametrize("command", ["export", "status", "verify"])
def test_commands_on_an_unknown_event_exit_2(db_url: str, tmp_path: Path, command: str) -> None:
    """Given no event called 'nope-ev',
    when export / status / verify is asked about it,
    then the command exits 2 with one line naming the missing event, and prints nothing
    on stdout."""
    result = cli(db_url, command, "nope-ev", cwd=tmp_path)

    line = assert_clean_failure(result, 2)
    assert "no event with code 'nope-ev'" in line
    assert result.stdout == ""


def test_unreachable_database_exits_2_without_leaking_the_password(tmp_path: Path) -> None:
    """Given a DATABASE_URL (with a password) where no server listens,
    when any command runs,
    then it exits 2 saying it cannot connect, with no traceback and without echoing the
    password."""
    url = "postgresql://someone:s3cret-pw@127.0.0.1:1/nothing?connect_timeout=2"

    result = cli(url, "status", EVENT, cwd=tmp_path)

    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("matchmaker: cannot connect to the database")
    assert "Traceback" not in result.stderr
    assert "s3cret-pw" not in result.stderr + result.stdout


# --------------------------------------------------------------------------- demo / bench


def test_demo_matches_and_verifies_a_synthetic_event(db_url: str, tmp_path: Path) -> None:
    """Given an empty database,
    when `demo --users 150 --event demo-test` runs,
    then it exits 0, prints the wall time for 150 attendees, sample lists and
    'verify: OK', and leaves the event with 150 matched attendees."""
    result = cli(db_url, "demo", "--users", "150", "--event", "demo-test", cwd=tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"matched in \d+\.\d\ds \(wall time for 150 attendees\)", result.stdout)
    assert "processed 150 users" in result.stdout
    assert "verify: OK - 150 lists equal the brute-force top-k" in result.stdout
    assert len(re.findall(r"^  #1 demo-\d{6} score ", result.stdout, re.MULTILINE)) == 3
    status = json.loads(cli(db_url, "status", "demo-test", "--json", cwd=tmp_path).stdout)
    assert status["coverage"]["active"] == 150
    assert status["coverage"]["without_list"] == status["coverage"]["missing_matches"] == 0


def test_bench_writes_verified_figures(db_url: str, tmp_path: Path) -> None:
    """Given an empty database,
    when `bench --sizes 60,120 --json out.json` runs,
    then it exits 0, prints the table, and out.json holds one verified row per size with
    the drain, the compute limit and their ratio, the matching core (which must find the
    drain's lists), round trips, peak RSS, newcomer
    latencies and the pgvector peer (which must find the lists we found); the benchmark
    cleans its profiles and peer tables up afterwards."""
    result = cli(db_url, "bench", "--sizes", "60,120", "--json", "out.json", cwd=tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "ours/limit" in result.stdout and "peer/ours" in result.stdout
    payload = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert payload["machine"]["cpus"] >= 1
    rows: list[dict[str, Any]] = payload["results"]
    assert [(r["attendees"], r["verified"]) for r in rows] == [(60, True), (120, True)]
    for row in rows:
        assert row["lists_written"] >= row["attendees"]
        assert row["drain_s"] > 0 and row["users_per_s"] > 0 and row["limit_s"] > 0
        assert row["ours_over_limit"] > 0  # drain / limit, from unrounded times
        # The engine's matching core, alone on the same vectors, finds the drain's lists.
        assert row["core_s"] > 0 and row["ours_over_core"] > 0 and row["core_agrees"] is True
        assert row["round_trips"] > 0 and row["peak_rss_mib"] > 0
        assert 0 < row["newcomer_p50_ms"] <= row["newcomer_p95_ms"]
        if row["peer_note"]:  # an embedded PostgreSQL without pgvector
            assert "pgvector unavailable" in row["peer_note"]
            continue
        assert row["peer_s"] > 0 and row["peer_round_trips"] > row["attendees"]
        # The peer answers the same question: its exact scan finds (nearly) our lists;
        # float32 in pgvector may order near-ties differently.
        assert row["peer_agreement"] >= 0.95
        assert 0 < row["hnsw_recall"] <= 1
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM profiles").fetchone() == (0,)
        assert conn.execute("SELECT to_regclass('bench_peer')").fetchone() == (None,)


def test_bench_exposure_cost_times_both_settings(db_url: str, tmp_path: Path) -> None:
    """Given an empty database,
    when `bench --exposure-cost 80 --rounds 2` runs,
    then it exits 0 and prints two drains per setting, their medians and the ratio of
    hubness over none (consistent with the medians), the last hubness event verified by
    the oracle; the benchmark cleans its events and profiles up afterwards."""
    result = cli(db_url, "bench", "--exposure-cost", "80", "--rounds", "2", cwd=tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(
        r"80 attendees from scratch: none median (\d+\.\d\d)s, hubness median (\d+\.\d\d)s,"
        r" hubness/none (\d+\.\d\d) \(drains: none ([\d., ]+); hubness ([\d., ]+);"
        r" verified=True\)",
        result.stdout,
    )
    assert found, result.stdout
    none_s, hubness_s, ratio = (float(found.group(i)) for i in (1, 2, 3))
    assert len(found.group(4).split(", ")) == len(found.group(5).split(", ")) == 2
    assert none_s > 0 and hubness_s > 0
    # The ratio is of the unrounded medians; the printed ones are within 0.005 s.
    low, high = (hubness_s - 0.005) / (none_s + 0.005), (hubness_s + 0.005) / (none_s - 0.005)
    assert low - 0.005 <= ratio <= high + 0.005
    assert result.stderr.count("80 hubness: drained in") == 2
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM profiles").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (0,)

"""The migration runner (src/core/data/migrations.py) against scratch databases.

Every test gets its own empty database (the `db_url` fixture would hand out an already
migrated one), dropped afterwards.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from core.data.migrations import (
    MIGRATION_LOCK_KEY,
    MigrationError,
    MigrationReport,
    default_migrations_dir,
    migrate,
)
from tests.helpers import APP_TABLES

MIGRATIONS = default_migrations_dir()
FILES = sorted(p.name for p in MIGRATIONS.glob("*.sql"))
TABLES = {*APP_TABLES, "schema_migrations"}


@pytest.fixture
def scratch(empty_db_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def migrations_copy(tmp_path: Path) -> Path:
    """A private copy of db/migrations the test may edit."""
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, directory)
    return directory


def tables(conn: psycopg.Connection[Any]) -> set[str]:
    rows = conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
    ).fetchall()
    return {r[0] for r in rows}


def ledger(conn: psycopg.Connection[Any]) -> list[tuple[str, str, str, Any]]:
    rows = conn.execute(
        "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version"
    ).fetchall()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def schema_fingerprint(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    """Every object of the public schema with its kind, and every function body."""
    rows = conn.execute(
        "SELECT c.relname, c.relkind::text FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'"
        " UNION ALL SELECT p.proname, md5(p.prosrc) FROM pg_proc p"
        " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'"
        " UNION ALL SELECT t.tgname, t.tgrelid::regclass::text FROM pg_trigger t"
        " WHERE NOT t.tgisinternal ORDER BY 1, 2"
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- fresh apply and re-run --------------------------------------------------------------


def test_a_fresh_database_gets_every_migration_recorded_with_its_checksum(scratch):
    """Given an empty database, when migrated, then every file of db/migrations is applied
    in order, all tables exist, and schema_migrations records each file's version, name
    and sha256.

    Proves the ledger describes exactly what was applied.
    """
    assert FILES, "no migrations found"

    report = migrate(scratch)

    assert report.applied == FILES
    assert report.already_applied == []
    assert report.drift == []
    assert tables(scratch) >= TABLES
    assert [(v, n, c) for v, n, c, _ in ledger(scratch)] == [
        (name[:4], name, sha256(MIGRATIONS / name)) for name in FILES
    ]


def test_a_rerun_applies_and_changes_nothing(scratch):
    """Given a migrated database, when migrated again, then nothing is applied, every file is
    reported as already applied without drift, and neither the ledger (applied_at
    included) nor the schema changed.

    Proves migrate() is idempotent (deploys run it every time).
    """
    migrate(scratch)
    ledger_before = ledger(scratch)
    schema_before = schema_fingerprint(scratch)

    report = migrate(scratch)

    assert report == MigrationReport(applied=[], already_applied=FILES, drift=[])
    assert ledger(scratch) == ledger_before
    assert schema_fingerprint(scratch) == schema_before


# --- drift -------------------------------------------------------------------------------


def test_an_edited_applied_file_is_reported_as_drift_and_not_reapplied(scratch, migrations_copy):
    """Given a database migrated from a copy of db/migrations, when an applied file is
    edited (it now also creates a table) and migrate runs again, then that file, and only
    it, is reported in drift, its new SQL is not run and the ledger keeps the original
    checksum.

    Proves applied migrations are immutable: edits are flagged, never silently executed.
    """
    migrate(scratch, migrations_copy)
    edited = migrations_copy / FILES[-1]
    original_checksum = sha256(edited)
    edited.write_text(
        edited.read_text(encoding="utf-8") + "\nCREATE TABLE drift_marker (id int);\n",
        encoding="utf-8",
    )

    report = migrate(scratch, migrations_copy)

    assert report.drift == [FILES[-1]]
    assert report.applied == []
    assert report.already_applied == FILES
    assert "drift_marker" not in tables(scratch)
    checksums = {n: c for _, n, c, _ in ledger(scratch)}
    assert checksums[FILES[-1]] == original_checksum != sha256(edited)


# --- failures ----------------------------------------------------------------------------


def test_a_broken_migration_fails_by_name_and_leaves_no_trace(
    scratch, empty_db_url, migrations_copy
):
    """Given a migrated database and a new 0099_broken.sql that creates a table and then
    fails, when migrate runs, then MigrationError names the file, the table it created is
    rolled back, it has no ledger row, the earlier migrations stay recorded and the
    migration lock is released; once fixed, it applies.

    Proves each migration is all-or-nothing and a failure does not wedge later runs.
    """
    migrate(scratch, migrations_copy)
    broken = migrations_copy / "0099_broken.sql"
    broken.write_text(
        "CREATE TABLE broken_partial (id int);\nSELECT * FROM no_such_table;\n",
        encoding="utf-8",
    )

    with pytest.raises(MigrationError, match=r"0099_broken\.sql"):
        migrate(scratch, migrations_copy)

    assert "broken_partial" not in tables(scratch)
    assert [n for _, n, _, _ in ledger(scratch)] == FILES
    with psycopg.connect(empty_db_url, autocommit=True) as other:
        got = other.execute("SELECT pg_try_advisory_lock(%s)", (MIGRATION_LOCK_KEY,)).fetchone()
        assert got == (True,)

    broken.write_text("CREATE TABLE broken_partial (id int);\n", encoding="utf-8")
    report = migrate(scratch, migrations_copy)
    assert report.applied == ["0099_broken.sql"]
    assert "broken_partial" in tables(scratch)


def test_a_broken_first_migration_of_a_fresh_database_applies_nothing_after_it(
    scratch, migrations_copy
):
    """Given an empty database and a broken file ordered between two good ones, when
    migrated, then the files before it are applied, it and the files after it are not.

    Proves migrations stop at the first failure (later ones may depend on it).
    """
    (migrations_copy / "0002_aaa_broken.sql").write_text("SELEC 1;\n", encoding="utf-8")
    # Renumber so the broken file sits between 0001 and the rest.
    for name in FILES[1:]:
        number = int(name[:4]) + 1
        (migrations_copy / name).rename(migrations_copy / f"{number:04d}{name[4:]}")

    with pytest.raises(MigrationError, match=r"0002_aaa_broken\.sql"):
        migrate(scratch, migrations_copy)

    assert [n for _, n, _, _ in ledger(scratch)] == [FILES[0]]
    assert "matchmaking_queue" not in tables(scratch)


@pytest.mark.parametrize(
    "bad_name",
    ["1_short.sql", "0004-dash.sql", "0004_Upper.sql", "0004_.sql", "abcd_letters.sql"],
)
def test_a_malformed_file_name_is_refused_before_anything_is_applied(
    scratch, migrations_copy, bad_name
):
    """Given a migrations directory containing a file not named NNNN_name.sql, when
    migrate runs on an empty database, then MigrationError names the file and nothing,
    not even the ledger, was created.

    Proves the directory is validated up front.
    """
    (migrations_copy / bad_name).write_text("SELECT 1;\n", encoding="utf-8")

    with pytest.raises(MigrationError, match=re.escape(bad_name)):
        migrate(scratch, migrations_copy)

    assert tables(scratch) == set()


def test_two_files_with_the_same_version_are_refused(scratch, migrations_copy):
    """Given two files numbered 0001, when migrate runs, then MigrationError names both and
    nothing is created.

    Proves versions are unique keys of the ledger.
    """
    (migrations_copy / "0001_again.sql").write_text("SELECT 1;\n", encoding="utf-8")

    with pytest.raises(MigrationError, match="version 0001") as excinfo:
        migrate(scratch, migrations_copy)

    assert "0001_again.sql" in str(excinfo.value)
    assert FILES[0] in str(excinfo.value)
    assert tables(scratch) == set()


def test_a_missing_directory_and_a_transactional_connection_are_refused(
    scratch, empty_db_url, tmp_path
):
    """Given a directory that does not exist, or a connection outside autocommit, when
    migrate runs, then MigrationError is raised and nothing is created.

    Proves the runner's preconditions are checked, not assumed.
    """
    with pytest.raises(MigrationError, match="not found"):
        migrate(scratch, tmp_path / "nope")
    with (
        psycopg.connect(empty_db_url) as transactional,
        pytest.raises(MigrationError, match="autocommit"),
    ):
        migrate(transactional)
    assert tables(scratch) == set()


# --- concurrency -------------------------------------------------------------------------


def test_two_concurrent_migrations_apply_each_file_exactly_once(empty_db_url):
    """Given an empty database, when two threads (own connections, released together)
    migrate it at the same time, then both succeed, between them every file is applied
    exactly once (the other reports it as already applied) and the ledger has one row
    per file.

    Proves the advisory lock serialises concurrent deploys.
    """
    barrier = threading.Barrier(2)
    reports: list[MigrationReport] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with psycopg.connect(empty_db_url, autocommit=True) as conn:
                barrier.wait(timeout=10)
                reports.append(migrate(conn))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    assert errors == []
    assert len(reports) == 2
    applied = sorted(name for r in reports for name in r.applied)
    assert applied == FILES
    for report in reports:
        assert sorted(report.applied + report.already_applied) == FILES
        assert report.drift == []
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        assert [n for _, n, _, _ in ledger(conn)] == FILES

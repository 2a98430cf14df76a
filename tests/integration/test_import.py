"""Database-level import: files in, profiles / attendees / queue rows out, nothing partial."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from pydantic import ValidationError

from core.data import repository as repo
from core.data.repository import Conn
from core.models import EventIn, EventSettings
from core.queue.worker import Matchmaker
from core.settings import Settings
from tests.conftest import profile
from tests.helpers import queue_rows
from tooling.local_runs import drain, import_file, import_profiles

CSV_HEADER = "user_id,name,company,title,bio,interests,seeking,offering\n"
# Tables an import (or its triggers) may write to.
IMPORT_TABLES = ("events", "profiles", "attendees", "matchmaking_queue", "matchmaking_jobs")


def _write_jsonl(path: Path, *records: dict[str, Any] | str) -> Path:
    lines = [rec if isinstance(rec, str) else json.dumps(rec) for rec in records]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _profiles(conn: Conn) -> dict[str, dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "SELECT id, user_id, name, company, title, bio, interests, seeking, offering,"
            " change_xid::text AS change_xid, updated_at FROM profiles ORDER BY user_id"
        ).fetchall()
    return {row["user_id"]: row for row in rows}


def _attendees(conn: Conn, event_id: int) -> dict[str, bool]:
    rows = conn.execute(
        "SELECT p.user_id, a.active FROM attendees a JOIN profiles p ON p.id = a.profile_id"
        " WHERE a.event_id = %s ORDER BY p.user_id",
        (event_id,),
    ).fetchall()
    return dict(rows)


def _queued(conn: Conn, event_id: int) -> list[tuple[str, int, str, str]]:
    return sorted(
        (r["user_id"], r["priority"], r["reason"], r["status"]) for r in queue_rows(conn, event_id)
    )


def _snapshot(conn: Conn) -> dict[str, list[str]]:
    """Every row of every import-related table, as text (for before/after equality)."""
    return {
        table: sorted(row[0] for row in conn.execute(f"SELECT t::text FROM {table} t"))
        for table in IMPORT_TABLES
    }


def _count(conn: Conn, table: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


def _drain(conn: Conn, settings: Settings) -> None:
    report = drain(conn, Matchmaker(settings), show_progress=False)
    assert not report.dead


# --------------------------------------------------------------------------- good files


def test_jsonl_file_imports_profiles_and_queues_newcomers(conn: Conn, tmp_path: Path) -> None:
    """Given a JSONL file of two attendees,
    when it is imported into an event,
    then both profiles are stored field by field, both are active attendees,
    and each is queued once as a newcomer (priority 3, reason 'join')."""
    path = _write_jsonl(
        tmp_path / "people.jsonl",
        {
            "user_id": "ann",
            "name": " Ann Lee ",
            "company": "Acme",
            "title": "CTO",
            "bio": "Builds robots.",
            "interests": ["robotics", "ML", "ml"],
            "seeking": ["investors"],
            "offering": ["mentorship"],
        },
        {"user_id": "bob@example.com", "interests": ["golf"]},
    )

    report = import_file(conn, EventIn(code="jsonl-ev"), path)

    assert (report.imported, report.errors) == (2, [])
    stored = _profiles(conn)
    assert sorted(stored) == ["ann", "bob@example.com"]
    ann = stored["ann"]
    assert (ann["name"], ann["company"], ann["title"], ann["bio"]) == (
        "Ann Lee",
        "Acme",
        "CTO",
        "Builds robots.",
    )
    assert (ann["interests"], ann["seeking"], ann["offering"]) == (
        ["robotics", "ML"],
        ["investors"],
        ["mentorship"],
    )
    bob = stored["bob@example.com"]
    assert (bob["name"], bob["interests"], bob["seeking"]) == ("", ["golf"], [])
    assert _attendees(conn, report.event.id) == {"ann": True, "bob@example.com": True}
    assert _queued(conn, report.event.id) == [
        ("ann", 3, "join", "pending"),
        ("bob@example.com", 3, "join", "pending"),
    ]


def test_csv_file_splits_semicolon_lists(conn: Conn, tmp_path: Path) -> None:
    """Given a CSV file whose list cells are ';'-separated (one quoted, with commas),
    when it is imported,
    then each list is split and trimmed, empty items dropped, and every row is queued at
    priority 3."""
    path = tmp_path / "people.csv"
    path.write_text(
        CSV_HEADER
        + 'ann,Ann,Acme,CTO,"Likes robots, and ML",robotics; ML ;;,investors,mentoring\n'
        + "bob,Bob,,,,golf,,\n",
        encoding="utf-8",
    )

    report = import_file(conn, EventIn(code="csv-ev"), path)

    assert (report.imported, report.errors) == (2, [])
    stored = _profiles(conn)
    assert stored["ann"]["bio"] == "Likes robots, and ML"
    assert (stored["ann"]["interests"], stored["ann"]["seeking"], stored["ann"]["offering"]) == (
        ["robotics", "ML"],
        ["investors"],
        ["mentoring"],
    )
    assert (stored["bob"]["company"], stored["bob"]["interests"], stored["bob"]["seeking"]) == (
        "",
        ["golf"],
        [],
    )
    assert _attendees(conn, report.event.id) == {"ann": True, "bob": True}
    assert [(u, p) for u, p, _, _ in _queued(conn, report.event.id)] == [("ann", 3), ("bob", 3)]


# --------------------------------------------------------------------------- bad rows


def test_bad_jsonl_rows_are_reported_and_leave_no_trace(conn: Conn, tmp_path: Path) -> None:
    """Given a JSONL file mixing three good rows with bad ones (bad id, unknown field,
    wrong type, broken JSON, duplicate id, missing id, overlong bio),
    when it is imported,
    then every bad row is reported with its line and a reason naming the field, the good
    rows are imported, and no table holds anything from a bad row."""
    path = _write_jsonl(
        tmp_path / "mixed.jsonl",
        {"user_id": "ann", "name": "Ann", "interests": ["ml"]},  # 1
        {"user_id": "bad one", "name": "Trace-A"},  # 2
        {"user_id": "bob", "name": "Bob"},  # 3
        {"user_id": "carl", "name": "Trace-C", "intrests": ["ml"]},  # 4
        {"user_id": "dora", "name": "Trace-D", "interests": "ml"},  # 5
        '{"user_id": "emil", "name": "Trace-E",',  # 6
        {"user_id": "ann", "name": "Trace-Impostor"},  # 7
        {"name": "Trace-F"},  # 8
        {"user_id": "gus", "name": "Trace-G", "bio": "x" * 4001},  # 9
        {"user_id": "finn", "name": "Finn"},  # 10
    )

    report = import_file(conn, EventIn(code="mixed-ev"), path)

    assert report.imported == 3
    errors = {err.line: err.message for err in report.errors}
    assert sorted(errors) == [2, 4, 5, 6, 7, 8, 9]
    assert errors[2].startswith("user_id: ")
    assert "unknown field 'intrests'" in errors[4]
    assert errors[5].startswith("interests: ")
    assert errors[6].startswith("invalid JSON")
    assert "duplicate user_id 'ann' (first on line 1)" in errors[7]
    assert "missing required field 'user_id'" in errors[8]
    assert errors[9].startswith("bio: ")

    stored = _profiles(conn)
    assert sorted(stored) == ["ann", "bob", "finn"]
    assert stored["ann"]["name"] == "Ann"  # the duplicate on line 7 did not overwrite it
    good_ids = {row["id"] for row in stored.values()}
    assert _attendees(conn, report.event.id) == {"ann": True, "bob": True, "finn": True}
    assert [u for u, *_ in _queued(conn, report.event.id)] == ["ann", "bob", "finn"]
    assert {r["profile_id"] for r in queue_rows(conn)} == good_ids
    everything = "\n".join(row for rows in _snapshot(conn).values() for row in rows)
    for marker in ("Trace-", "bad one", "carl", "dora", "emil", "gus"):
        assert marker not in everything


def test_bad_csv_rows_are_reported_and_leave_no_trace(conn: Conn, tmp_path: Path) -> None:
    """Given a CSV file with a good row, a row with a bad user_id, a row with a missing
    cell and a row with too many tags,
    when it is imported,
    then the three bad rows are reported by line with the field named, and only the good
    row reaches the database."""
    too_many = ";".join(f"tag{i}" for i in range(51))
    path = tmp_path / "mixed.csv"
    path.write_text(
        CSV_HEADER
        + "ann,Ann,,,,ml,,\n"  # 2
        + "not valid!,Trace-A,,,,,,\n"  # 3
        + "bob,Trace-B,,,,ml,\n"  # 4: 7 cells
        + f"carl,Trace-C,,,,{too_many},,\n",  # 5
        encoding="utf-8",
    )

    report = import_file(conn, EventIn(code="mixed-csv"), path)

    assert report.imported == 1
    errors = {err.line: err.message for err in report.errors}
    assert sorted(errors) == [3, 4, 5]
    assert errors[3].startswith("user_id: ")
    assert "expected 8 cells, got 7" in errors[4]
    assert errors[5].startswith("interests: ")
    assert sorted(_profiles(conn)) == ["ann"]
    assert _attendees(conn, report.event.id) == {"ann": True}
    assert [u for u, *_ in _queued(conn, report.event.id)] == ["ann"]
    assert "Trace-" not in "\n".join(row for rows in _snapshot(conn).values() for row in rows)


# --------------------------------------------------------------------------- re-imports


def test_reimporting_the_same_file_changes_nothing(
    conn: Conn, settings: Settings, tmp_path: Path
) -> None:
    """Given a file imported and matched (queue drained),
    when the very same file is imported again,
    then no queue row appears and no profile or membership row is rewritten."""
    path = _write_jsonl(
        tmp_path / "people.jsonl",
        {"user_id": "ann", "company": "A", "interests": ["ml", "robotics"]},
        {"user_id": "bob", "company": "B", "interests": ["ml"], "seeking": ["jobs"]},
        {"user_id": "cid", "company": "C", "offering": ["jobs"]},
    )
    first = import_file(conn, EventIn(code="again-ev"), path)
    _drain(conn, settings)
    assert queue_rows(conn) == []
    before = _snapshot(conn)
    profiles_before = _profiles(conn)

    second = import_file(conn, EventIn(code="again-ev"), path)

    assert second.event == first.event
    assert second.imported == 3
    assert queue_rows(conn) == []
    assert _profiles(conn) == profiles_before  # updated_at and change_xid included
    after = _snapshot(conn)
    for table in ("events", "profiles", "attendees", "matchmaking_queue"):
        assert after[table] == before[table], table


def test_reimport_with_pending_queue_adds_no_rows(conn: Conn, tmp_path: Path) -> None:
    """Given a file imported but not yet matched (newcomers pending at priority 3),
    when it is imported again,
    then the queue still holds exactly the same rows (same ids, priorities, reasons)."""
    path = _write_jsonl(tmp_path / "p.jsonl", {"user_id": "ann"}, {"user_id": "bob"})
    event = import_file(conn, EventIn(code="pending-ev"), path).event
    before = queue_rows(conn, event.id)

    import_file(conn, EventIn(code="pending-ev"), path)

    assert queue_rows(conn, event.id) == before
    assert len(before) == 2


def test_reimport_with_changed_interests_queues_only_that_user(
    conn: Conn, settings: Settings, tmp_path: Path
) -> None:
    """Given three attendees imported and matched,
    when the file is re-imported with bob's interests changed (and nothing else),
    then exactly bob is queued, at priority 2 for a profile update, and only bob's
    profile row is rewritten."""
    rows = [
        {"user_id": "ann", "company": "A", "interests": ["ml"]},
        {"user_id": "bob", "company": "B", "interests": ["ml"]},
        {"user_id": "cid", "company": "C", "interests": ["golf"]},
    ]
    event = import_file(conn, EventIn(code="edit-ev"), _write_jsonl(tmp_path / "a.jsonl", *rows))
    event_id = event.event.id
    _drain(conn, settings)
    before = _profiles(conn)

    rows[1] = {**rows[1], "interests": ["ml", "robotics"]}
    import_file(conn, EventIn(code="edit-ev"), _write_jsonl(tmp_path / "b.jsonl", *rows))

    assert _queued(conn, event_id) == [("bob", 2, "profile_update", "pending")]
    after = _profiles(conn)
    assert after["bob"]["interests"] == ["ml", "robotics"]
    assert after["bob"]["updated_at"] > before["bob"]["updated_at"]
    assert after["bob"]["change_xid"] != before["bob"]["change_xid"]
    assert after["ann"] == before["ann"]
    assert after["cid"] == before["cid"]


def test_reimport_with_only_a_name_change_queues_nothing(
    conn: Conn, settings: Settings, tmp_path: Path
) -> None:
    """Given an attendee imported and matched,
    when re-imported with only the display name changed,
    then the name is updated but nothing is queued (name does not affect matching)."""
    event = import_file(
        conn, EventIn(code="name-ev"), _write_jsonl(tmp_path / "a.jsonl", {"user_id": "ann"})
    ).event
    _drain(conn, settings)

    import_file(
        conn,
        EventIn(code="name-ev"),
        _write_jsonl(tmp_path / "b.jsonl", {"user_id": "ann", "name": "Ann B."}),
    )

    assert _profiles(conn)["ann"]["name"] == "Ann B."
    assert queue_rows(conn, event.id) == []


def test_reimport_rejoins_an_attendee_who_left(
    conn: Conn, settings: Settings, tmp_path: Path
) -> None:
    """Given an attendee who was imported, matched and then left the event,
    when the same file is imported again,
    then the attendee is active again and queued as a newcomer (priority 3)."""
    path = _write_jsonl(tmp_path / "a.jsonl", {"user_id": "ann"}, {"user_id": "bob"})
    event = import_file(conn, EventIn(code="rejoin-ev"), path).event
    _drain(conn, settings)
    assert repo.leave_event(conn, event.id, "ann")
    _drain(conn, settings)
    assert _attendees(conn, event.id) == {"ann": False, "bob": True}

    import_file(conn, EventIn(code="rejoin-ev"), path)

    assert _attendees(conn, event.id) == {"ann": True, "bob": True}
    assert _queued(conn, event.id) == [("ann", 3, "join", "pending")]


# --------------------------------------------------------------------------- the event


def test_missing_event_is_created_with_defaults(conn: Conn, tmp_path: Path) -> None:
    """Given no event with code 'fresh-ev',
    when a file is imported into it,
    then the event exists with the default settings (k=3, same-company exclusion on,
    weights 1 / 1 / 0.5, local embedder) and the report names it."""
    assert repo.fetch_event(conn, "fresh-ev") is None
    path = _write_jsonl(tmp_path / "a.jsonl", {"user_id": "ann"})

    report = import_file(conn, EventIn(code="fresh-ev"), path)

    stored = repo.fetch_event(conn, "fresh-ev")
    assert stored is not None
    assert report.event == stored
    assert stored.settings == EventSettings()
    assert (stored.settings.k, stored.settings.exclude_same_company) == (3, True)
    weights = stored.settings.weights
    assert (weights.interests, weights.complementarity, weights.bio) == (1.0, 1.0, 0.5)


def test_existing_event_keeps_its_settings(conn: Conn, make_event: Any, tmp_path: Path) -> None:
    """Given an event created with k=5 and same-company exclusion off,
    when a file is imported into it with default settings,
    then the event's settings are left as they were (no re-match of everybody queued)."""
    event = make_event("custom-ev", k=5, exclude_same_company=False)
    path = _write_jsonl(tmp_path / "a.jsonl", {"user_id": "ann"})

    report = import_file(conn, EventIn(code="custom-ev", name="Other"), path)

    assert report.event == event
    assert repo.fetch_event(conn, "custom-ev") == event
    assert _queued(conn, event.id) == [("ann", 3, "join", "pending")]


@pytest.mark.parametrize("code", ["ab", "has space", "under_score", "x" * 65, ""])
def test_invalid_event_code_is_rejected_before_any_write(
    conn: Conn, tmp_path: Path, code: str
) -> None:
    """Given a valid file and an invalid event code,
    when an import is attempted,
    then pydantic raises a ValidationError naming the code, and nothing is written."""
    path = _write_jsonl(tmp_path / "a.jsonl", {"user_id": "ann"})

    with pytest.raises(ValidationError) as excinfo:
        import_file(conn, EventIn(code=code), path)

    assert excinfo.value.errors()[0]["loc"] == ("code",)
    assert all(_count(conn, table) == 0 for table in IMPORT_TABLES)


def test_database_rejects_an_event_code_that_bypassed_validation(
    conn: Conn, tmp_path: Path
) -> None:
    """Given an EventIn built without validation (model_construct) with a bad code,
    when it is imported,
    then the database CHECK rejects it and no profile of the file is stored."""
    path = _write_jsonl(tmp_path / "a.jsonl", {"user_id": "ann"})
    event = EventIn.model_construct(code="no spaces allowed", name="", settings=EventSettings())

    with pytest.raises(psycopg.errors.CheckViolation):
        import_file(conn, event, path)

    assert all(_count(conn, table) == 0 for table in IMPORT_TABLES)


# --------------------------------------------------------------------------- nothing partial


def test_batch_rejected_by_the_database_stores_nothing(conn: Conn, tmp_path: Path) -> None:
    """Given an event with one attendee, and a CHECK that rejects the name 'boom'
    (a rule pydantic does not know),
    when a file is imported into a new event that updates that attendee, adds two
    newcomers and has one 'boom' row,
    then the import raises, no row of it is stored (no new event, no profile changed or
    added, no membership, no queue row), and the connection stays usable: once the CHECK
    is dropped the same file imports."""
    import_profiles(conn, EventIn(code="first-ev"), [profile("ann", interests=["ml"])])
    conn.execute("ALTER TABLE profiles ADD CONSTRAINT test_ck CHECK (name <> 'boom')")
    path = _write_jsonl(
        tmp_path / "boom.jsonl",
        {"user_id": "ann", "interests": ["ml", "robotics"]},
        {"user_id": "bob"},
        {"user_id": "carl", "name": "boom"},
        {"user_id": "dora"},
    )
    before = _snapshot(conn)

    with pytest.raises(psycopg.errors.CheckViolation):
        import_file(conn, EventIn(code="second-ev"), path)

    assert _snapshot(conn) == before
    assert repo.fetch_event(conn, "second-ev") is None
    assert sorted(_profiles(conn)) == ["ann"]
    assert _profiles(conn)["ann"]["interests"] == ["ml"]

    conn.execute("ALTER TABLE profiles DROP CONSTRAINT test_ck")
    report = import_file(conn, EventIn(code="second-ev"), path)
    assert report.imported == 4
    assert sorted(_attendees(conn, report.event.id)) == ["ann", "bob", "carl", "dora"]


def test_two_imports_in_one_caller_transaction(conn: Conn) -> None:
    """Given a caller that wraps two imports (two events) in one transaction,
    when both run,
    then both succeed and each event gets exactly its own attendees (the staging table
    of the first must neither block nor leak into the second)."""
    with conn.transaction():
        one = import_profiles(conn, EventIn(code="one-ev"), [profile("ann")])
        two = import_profiles(conn, EventIn(code="two-ev"), [profile("bob")])

    assert _attendees(conn, one.id) == {"ann": True}
    assert _attendees(conn, two.id) == {"bob": True}

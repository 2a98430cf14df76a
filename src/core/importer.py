"""Import attendees from a file: good rows in, bad rows reported by line, nothing partial."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core import repository as repo
from core.import_parser import ParsedImport, RowError, parse_import_file
from core.models import EventIn, Profile
from core.repository import Conn, EventRecord

ANALYZE_AFTER_ROWS = 1000


@dataclass
class ImportReport:
    event: EventRecord
    imported: int
    errors: list[RowError] = field(default_factory=list)


def import_profiles(conn: Conn, event: EventIn, profiles: list[Profile]) -> EventRecord:
    """Create the event if missing, upsert the profiles and join them, in one transaction."""
    with conn.transaction():
        record = repo.ensure_event(conn, event)
        if profiles:
            repo.upsert_profiles_and_join(conn, record.id, profiles)
    if len(profiles) >= ANALYZE_AFTER_ROWS:
        # Matching starts right away: don't let it plan against pre-import statistics.
        repo.analyze_matching_tables(conn)
    return record


def import_parsed(conn: Conn, event: EventIn, parsed: ParsedImport) -> ImportReport:
    # Rows that failed validation never reach this point: a bad row writes nothing.
    record = import_profiles(conn, event, [row.profile for row in parsed.rows])
    return ImportReport(record, len(parsed.rows), list(parsed.errors))


def import_file(conn: Conn, event: EventIn, path: Path) -> ImportReport:
    return import_parsed(conn, event, parse_import_file(path))

"""Parse and validate attendee import files (JSONL / CSV) into `Profile`s; no database.

Every problem is reported as a line-numbered `RowError` while the good rows are still
returned, so one typo does not block an import of thousands of attendees.  Only an
unusable file as a whole (unsupported format, bad CSV header) yields no rows.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, get_args

from pydantic import ValidationError

from core.models import Profile, unstorable_text_problem

__all__ = [
    "LIST_FIELDS",
    "MAX_LINE_BYTES",
    "ImportFormat",
    "ImportFormatError",
    "ImportRow",
    "ParsedImport",
    "RowError",
    "detect_format",
    "format_validation_error",
    "parse_import_bytes",
    "parse_import_file",
    "parse_import_text",
]

ImportFormat = Literal["jsonl", "csv"]

# Guard against absurd lines (a whole database dump on one line, a runaway quote):
# a valid profile serialises to well under 100 KiB.
MAX_LINE_BYTES: Final = 1024 * 1024

LIST_FIELDS: Final = frozenset({"interests", "seeking", "offering"})
LIST_SEPARATOR: Final = ";"

_EXTENSIONS: Final[Mapping[str, ImportFormat]] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
}
_PROFILE_FIELDS: Final = tuple(Profile.model_fields)
# Echoed user input (field names, columns) is cut so error bodies stay small.
_MAX_ECHO_CHARS: Final = 60
_MAX_PROBLEMS: Final = 10
# Runs of characters that are not CSV syntax; see `_csv_skeleton`.  The space counts as
# syntax because of skipinitialspace.
_CSV_PLAIN_RUN: Final = re.compile(r'[^,"\r\n ]+')
# csv's own wording is terse; these are the errors a strict reader raises on bad quoting.
_CSV_ERRORS: Final[Mapping[str, str]] = {
    "unexpected end of data": "unterminated quoted cell: the record runs to the end of the file",
    "',' expected after '\"'": "a closing quote must be followed by ',' or the end of the line",
}


class ImportFormatError(ValueError):
    """The file as a whole cannot be imported (e.g. an unsupported extension)."""


@dataclass(frozen=True, slots=True)
class ImportRow:
    line: int  # 1-based physical line where the record starts
    profile: Profile


@dataclass(frozen=True, slots=True)
class RowError:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True, slots=True)
class ParsedImport:
    rows: list[ImportRow] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


# --------------------------------------------------------------------------- public API


def detect_format(path: Path) -> ImportFormat:
    """The import format implied by `path`'s extension (case-insensitive)."""
    fmt = _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        shown = path.suffix or "(none)"
        raise ImportFormatError(
            f"unsupported import file extension {shown!r} for {path.name!r}: "
            "expected .jsonl, .ndjson or .csv"
        )
    return fmt


def parse_import_file(path: Path) -> ParsedImport:
    """Parse an import file, choosing JSONL or CSV by its extension."""
    fmt = detect_format(path)  # before reading, so a wrong file is not loaded at all
    return parse_import_bytes(path.read_bytes(), fmt)


def parse_import_bytes(data: bytes, fmt: ImportFormat) -> ParsedImport:
    """Parse raw bytes (UTF-8, optional BOM); undecodable bytes become line errors."""
    # surrogateescape keeps bad bytes as U+DC80..U+DCFF, so decoding never fails and the
    # offending line can be reported while the rest of the file is still imported.
    return parse_import_text(data.decode("utf-8-sig", errors="surrogateescape"), fmt)


def parse_import_text(text: str, fmt: ImportFormat) -> ParsedImport:
    """Parse already-decoded import text in the given format."""
    text = text.removeprefix("\ufeff")
    if fmt == "jsonl":
        return _parse_jsonl(text)
    if fmt == "csv":
        return _parse_csv(text)
    raise ImportFormatError(  # reachable from untyped callers such as an HTTP route
        f"unsupported import format {fmt!r}: expected one of {list(get_args(ImportFormat))}"
    )


def format_validation_error(exc: ValidationError, *, max_problems: int = _MAX_PROBLEMS) -> str:
    """One readable line per problem, joined with "; ", each naming its field path.

    Shared with the HTTP handlers for 4xx bodies, so it only relies on pydantic's
    generic error shape (type / loc / msg / ctx).
    """
    problems = [_format_problem(err) for err in exc.errors(include_url=False)]
    if len(problems) > max_problems:
        hidden = len(problems) - max_problems
        problems = [*problems[:max_problems], f"... and {hidden} more problem(s)"]
    return "; ".join(problems)


# --------------------------------------------------------------------------- messages


def _format_problem(err: Mapping[str, Any]) -> str:
    loc = tuple(err.get("loc", ()))
    kind = err.get("type")
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden" and loc:
        return _with_path(loc[:-1], f"unknown field {_echo(loc[-1])}")
    if kind == "missing" and loc:
        return _with_path(loc[:-1], f"missing required field {_echo(loc[-1])}")
    if kind == "string_pattern_mismatch" and "pattern" in ctx:
        # Anchors are noise to a human reading "must match ...".
        pattern = str(ctx["pattern"]).removeprefix("^").removesuffix("$")
        return _with_path(loc, f"must match {pattern}")
    if kind == "value_error":  # our own validators' messages, without pydantic's prefix
        return _with_path(loc, str(err.get("msg", "invalid value")).removeprefix("Value error, "))
    return _with_path(loc, str(err.get("msg", "invalid value")))


def _with_path(loc: Sequence[Any], message: str) -> str:
    return f"{'.'.join(str(part) for part in loc)}: {message}" if loc else message


def _echo(value: object) -> str:
    text = str(value)
    if len(text) > _MAX_ECHO_CHARS:
        text = text[:_MAX_ECHO_CHARS] + "..."
    return repr(text)


def _json_type_name(value: object) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if value is None:
        return "null"
    return type(value).__name__


def _utf8_len(text: str) -> int:
    if len(text) * 4 <= MAX_LINE_BYTES:  # cheap: cannot exceed the limit
        return len(text)
    return len(text.encode("utf-8", errors="surrogatepass"))


def _too_long_message(line: str) -> str | None:
    size = _utf8_len(line)
    if size > MAX_LINE_BYTES:
        return f"line is longer than 1 MiB ({size} bytes)"
    return None


# --------------------------------------------------------------------------- shared


class _Collector:
    """Validates records in file order, keeping the first of duplicated user_ids."""

    def __init__(self) -> None:
        self.rows: list[ImportRow] = []
        self.errors: list[RowError] = []
        self._first_line: dict[str, int] = {}

    def error(self, line: int, message: str) -> None:
        self.errors.append(RowError(line, message))

    def add(self, line: int, record: Mapping[str, Any]) -> None:
        try:
            profile = Profile.model_validate(record)
        except ValidationError as exc:
            self.error(line, format_validation_error(exc))
            return
        first = self._first_line.get(profile.user_id)
        if first is not None:
            self.error(line, f"duplicate user_id {profile.user_id!r} (first on line {first})")
            return
        self._first_line[profile.user_id] = line
        self.rows.append(ImportRow(line, profile))

    def result(self) -> ParsedImport:
        return ParsedImport(rows=self.rows, errors=self.errors)


def _physical_lines(text: str) -> Iterator[str]:
    # newline="" splits on \n, \r\n and \r but, unlike str.splitlines, not on U+2028,
    # \x0c etc., which are legal inside JSON strings and CSV cells.
    return iter(io.StringIO(text, newline=""))


# --------------------------------------------------------------------------- JSONL


class _DuplicateKeyError(ValueError):
    pass


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last of repeated keys; in an import that hides a typo.
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKeyError(f"duplicate key {_echo(key)}")
        obj[key] = value
    return obj


def _parse_jsonl(text: str) -> ParsedImport:
    out = _Collector()
    for number, raw in enumerate(_physical_lines(text), start=1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        problem = _too_long_message(line) or unstorable_text_problem(line)
        if problem is not None:
            out.error(number, problem)
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_object_without_duplicates)
        except json.JSONDecodeError as exc:
            out.error(number, f"invalid JSON: {exc.msg} (column {exc.colno})")
            continue
        except _DuplicateKeyError as exc:
            out.error(number, str(exc))
            continue
        except RecursionError:
            out.error(number, "invalid JSON: nested too deeply")
            continue
        except ValueError as exc:  # e.g. an integer beyond Python's digit limit
            out.error(number, f"invalid JSON: {exc}")
            continue
        if not isinstance(obj, dict):
            out.error(number, f"expected a JSON object, got {_json_type_name(obj)}")
            continue
        out.add(number, obj)
    return out.result()


# --------------------------------------------------------------------------- CSV


def _csv_skeleton(line: str) -> str:
    """`line` with every run of plain characters shrunk to one character.

    The csv state machine only distinguishes `,`, `"`, space, CR/LF and "anything else", so the
    skeleton parses into the same cells and quote state; it lets an overlong line be
    skipped without desynchronising the following records.
    """
    return _CSV_PLAIN_RUN.sub("x", line)


class _LineCounter:
    """Feeds physical lines to csv.reader, counting them and shrinking overlong ones."""

    def __init__(self, text: str) -> None:
        self._lines = _physical_lines(text)
        self.consumed = 0
        self.too_long: dict[int, int] = {}  # line number -> size in bytes

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        self.consumed += 1
        size = _utf8_len(line.rstrip("\r\n"))
        if size > MAX_LINE_BYTES:
            self.too_long[self.consumed] = size
            return _csv_skeleton(line)
        return line


def _parse_csv(text: str) -> ParsedImport:
    out = _Collector()
    lines = _LineCounter(text)
    # strict: a quote left open must be an error, not a cell that silently swallows the
    # rest of the file.  skipinitialspace: `a, "b, c"` means what a human expects.
    reader = csv.reader(lines, strict=True, skipinitialspace=True)
    header: list[str] | None = None
    while True:
        start = lines.consumed + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            # Bad quoting or a cell beyond csv's field size limit; the reader resumes on the
            # next line.
            out.error(start, f"malformed CSV: {_CSV_ERRORS.get(str(exc), str(exc))}")
            if header is None:
                return out.result()
            continue
        end = lines.consumed
        if not any(cell.strip() for cell in cells):  # blank line or a row of empty cells
            continue
        overlong = [n for n in lines.too_long if start <= n <= end]
        if overlong:
            number = overlong[0]
            label = "line" if number == start else f"line {number}"
            out.error(start, f"{label} is longer than 1 MiB ({lines.too_long[number]} bytes)")
            if header is None:
                return out.result()
            continue
        if header is None:
            header, problem = _check_header(cells)
            if problem is not None:
                # A bad header makes every row's meaning doubtful: import nothing.
                out.error(start, problem)
                return out.result()
            continue
        _add_csv_record(out, header, cells, start, end)
    if header is None and not out.errors:
        out.error(1, "missing header row (expected column names such as 'user_id')")
    return out.result()


def _check_header(cells: list[str]) -> tuple[list[str], str | None]:
    names = [cell.strip() for cell in cells]
    problems: list[str] = []
    bad_chars = [
        f"column {i}: {p}"
        for i, n in enumerate(names, start=1)
        if (p := unstorable_text_problem(n, unit="character"))
    ]
    problems.extend(bad_chars)
    unnamed = [str(i) for i, name in enumerate(names, start=1) if not name]
    if unnamed:
        problems.append(f"column(s) {', '.join(unnamed)} have no name")
    unknown = [
        n for n in names if n and n not in _PROFILE_FIELDS and not unstorable_text_problem(n)
    ]
    if unknown:
        label = "unknown column" if len(unknown) == 1 else "unknown columns"
        problems.append(
            f"{label} {', '.join(_echo(n) for n in unknown)} "
            f"(expected: {', '.join(_PROFILE_FIELDS)})"
        )
    duplicated = sorted({n for n in names if n and names.count(n) > 1})
    if duplicated:
        problems.append(f"duplicate column(s) {', '.join(_echo(n) for n in duplicated)}")
    if "user_id" not in names:
        problems.append("missing required column 'user_id'")
    return names, "; ".join(problems) or None


def _add_csv_record(
    out: _Collector, header: list[str], cells: list[str], start: int, end: int
) -> None:
    if len(cells) != len(header):
        message = f"expected {len(header)} cells, got {len(cells)}"
        if end > start:  # a quoted cell swallowed line breaks: most likely a stray quote
            message += f" (record spans lines {start}-{end}; unbalanced quote?)"
        out.error(start, message)
        return
    record: dict[str, Any] = {}
    for name, cell in zip(header, cells, strict=True):
        problem = unstorable_text_problem(cell, unit="character")
        if problem is not None:
            out.error(start, f"{name}: {problem}")
            return
        if name in LIST_FIELDS:
            record[name] = [item.strip() for item in cell.split(LIST_SEPARATOR) if item.strip()]
        else:
            record[name] = cell.strip()
    out.add(start, record)

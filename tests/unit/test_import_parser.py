"""Unit tests for tooling.attendee_files: parsing, validation and line-numbered errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.models import Profile
from tooling.attendee_files import (
    MAX_LINE_BYTES,
    ImportFormatError,
    ParsedImport,
    RowError,
    format_validation_error,
    parse_import_bytes,
    parse_import_file,
    parse_import_text,
)

CSV_HEADER = "user_id,name,company,title,bio,interests,seeking,offering\n"


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


def _jsonl(*objects: object) -> str:
    return "".join(json.dumps(obj) + "\n" for obj in objects)


def _errors(parsed: ParsedImport) -> list[str]:
    return [str(err) for err in parsed.errors]


def _lines(parsed: ParsedImport) -> list[int]:
    return [row.line for row in parsed.rows]


# --------------------------------------------------------------------------- JSONL


def test_good_jsonl_file(tmp_path: Path) -> None:
    content = (
        '{"user_id": "ann", "name": " Ann ", "interests": ["ML", "ml", " golf "]}\n'
        "\n"
        "   \n"
        '{"user_id": "bob@example.com", "seeking": ["investors"], "offering": ["advice"]}\n'
    )
    parsed = parse_import_file(_write(tmp_path, "people.jsonl", content))

    assert parsed.ok
    assert parsed.errors == []
    assert _lines(parsed) == [1, 4]  # blank lines skipped but still counted
    ann, bob = (row.profile for row in parsed.rows)
    assert ann == Profile(user_id="ann", name="Ann", interests=["ML", "golf"])
    assert bob.seeking == ["investors"]
    assert bob.offering == ["advice"]
    assert bob.bio == ""


def test_ndjson_extension_crlf_and_bom(tmp_path: Path) -> None:
    content = '\ufeff{"user_id": "a"}\r\n{"user_id": "b"}\r\n'
    parsed = parse_import_file(_write(tmp_path, "people.NDJSON", content))

    assert parsed.ok
    assert [row.profile.user_id for row in parsed.rows] == ["a", "b"]
    assert _lines(parsed) == [1, 2]


def test_empty_jsonl_is_ok_and_empty() -> None:
    parsed = parse_import_text("", "jsonl")
    assert parsed.ok
    assert parsed.rows == []


def test_jsonl_bad_rows_are_reported_and_good_rows_kept(tmp_path: Path) -> None:
    lines = [
        json.dumps({"user_id": "good1"}),  # 1
        json.dumps({"user_id": "x", "intrests": ["ml"]}),  # 2
        '{"user_id": "y" "name": "Y"}',  # 3
        json.dumps({"user_id": "has space"}),  # 4
        json.dumps(["not", "an", "object"]),  # 5
        json.dumps({"user_id": "z", "interests": [f"t{i}" for i in range(51)]}),  # 6
        json.dumps({"name": "no id"}),  # 7
        json.dumps({"user_id": "w", "bio": "b" * 5000, "name": 5}),  # 8
        json.dumps({"user_id": "good2"}),  # 9
    ]
    parsed = parse_import_file(_write(tmp_path, "p.jsonl", "\n".join(lines)))

    assert not parsed.ok
    assert [row.profile.user_id for row in parsed.rows] == ["good1", "good2"]
    assert _lines(parsed) == [1, 9]
    assert _errors(parsed) == [
        "line 2: unknown field 'intrests'",
        "line 3: invalid JSON: Expecting ',' delimiter (column 17)",
        "line 4: user_id: must match [A-Za-z0-9_.:@-]{1,128}",
        "line 5: expected a JSON object, got list",
        "line 6: interests: List should have at most 50 items after validation, not 51",
        "line 7: missing required field 'user_id'",
        "line 8: name: Input should be a valid string; bio: String should have at most 4000 "
        "characters",
    ]
    assert parsed.errors[0] == RowError(line=2, message="unknown field 'intrests'")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('"just a string"', "expected a JSON object, got string"),
        ("42", "expected a JSON object, got number"),
        ("null", "expected a JSON object, got null"),
        ('{"user_id": "a", "user_id": "b"}', "duplicate key 'user_id'"),
        ('{"user_id": "a", "interests": ["x", ""]}', "interests.1: String should have at least"),
        ('{"user_id": "a", "bio": "nul\\u0000here"}', "bio: NUL character at character 4"),
        ('{"user_id": "a", "name": "\\ud800"}', "name: Input should be a valid string"),
        ("[" * 100_000 + "]" * 100_000, "invalid JSON"),
        ('{"user_id": ' + "9" * 5000 + "}", "invalid JSON"),
        ("{", "invalid JSON: Expecting property name enclosed in double quotes (column 2)"),
    ],
)
def test_jsonl_odd_lines_are_errors_not_crashes(line: str, expected: str) -> None:
    parsed = parse_import_text(f'{{"user_id": "ok"}}\n{line}\n', "jsonl")

    assert [row.profile.user_id for row in parsed.rows] == ["ok"]
    assert len(parsed.errors) == 1
    assert parsed.errors[0].line == 2
    assert parsed.errors[0].message.startswith(expected)


def test_jsonl_overlong_line_is_an_error_for_that_line_only() -> None:
    huge = json.dumps({"user_id": "big", "bio": "x" * MAX_LINE_BYTES})
    parsed = parse_import_text(
        _jsonl({"user_id": "a"}) + huge + "\n" + _jsonl({"user_id": "b"}), "jsonl"
    )

    assert _lines(parsed) == [1, 3]
    assert len(parsed.errors) == 1
    assert parsed.errors[0].line == 2
    assert parsed.errors[0].message.startswith("line is longer than 1 MiB")


def test_jsonl_invalid_utf8_is_a_line_error(tmp_path: Path) -> None:
    content = b'{"user_id": "a"}\n{"user_id": "b", "name": "\xff\xfe"}\n{"user_id": "c"}\n'
    parsed = parse_import_file(_write(tmp_path, "p.jsonl", content))

    assert [row.profile.user_id for row in parsed.rows] == ["a", "c"]
    assert _errors(parsed) == ["line 2: invalid UTF-8 (byte 0xFF at column 27)"]


def test_jsonl_duplicate_user_id_keeps_first() -> None:
    text = _jsonl(
        {"user_id": "a", "name": "First"},
        {"user_id": "b"},
        {"user_id": " a ", "name": "Second"},  # same id once whitespace is stripped
    )
    parsed = parse_import_text(text, "jsonl")

    assert [(r.profile.user_id, r.profile.name) for r in parsed.rows] == [("a", "First"), ("b", "")]
    assert _errors(parsed) == ["line 3: duplicate user_id 'a' (first on line 1)"]


def test_invalid_row_does_not_claim_its_user_id() -> None:
    text = _jsonl({"user_id": "a", "bio": "x" * 5000}, {"user_id": "a"})
    parsed = parse_import_text(text, "jsonl")

    assert _lines(parsed) == [2]
    assert [err.line for err in parsed.errors] == [1]


# --------------------------------------------------------------------------- CSV


def test_good_csv_file(tmp_path: Path) -> None:
    content = (
        CSV_HEADER
        + "ann, Ann Lee ,Acme,CTO,Builds things, ML ; golf;;  ,investors,advice;hiring\n"
        + "bob,,,,,,,\n"
    )
    parsed = parse_import_file(_write(tmp_path, "people.csv", content))

    assert parsed.ok
    assert _lines(parsed) == [2, 3]
    ann, bob = (row.profile for row in parsed.rows)
    assert ann == Profile(
        user_id="ann",
        name="Ann Lee",
        company="Acme",
        title="CTO",
        bio="Builds things",
        interests=["ML", "golf"],
        seeking=["investors"],
        offering=["advice", "hiring"],
    )
    assert bob == Profile(user_id="bob")


def test_csv_subset_of_columns_in_any_order_with_bom_and_crlf(tmp_path: Path) -> None:
    content = "\ufeff interests , user_id\r\nml;nlp,a\r\n\r\n,b\r\n"
    parsed = parse_import_file(_write(tmp_path, "people.CSV", content))

    assert parsed.ok
    assert [(r.line, r.profile.user_id, r.profile.interests) for r in parsed.rows] == [
        (2, "a", ["ml", "nlp"]),
        (4, "b", []),
    ]


def test_csv_bom_in_bytes(tmp_path: Path) -> None:
    content = b"\xef\xbb\xbfuser_id,name\r\nz,Z\xc3\xa9\r\n"
    parsed = parse_import_file(_write(tmp_path, "people.csv", content))

    assert parsed.ok
    assert parsed.rows[0].profile.name == "Z\u00e9"


def test_csv_quoted_cells_with_commas_and_newlines_keep_line_numbers(tmp_path: Path) -> None:
    content = (
        "user_id,name,bio,interests\n"  # 1
        'a,"Lee, Ann","line one\n'  # 2 (record spans 2-4)
        "line two\n"  # 3
        'line ""three""",x\n'  # 4
        "b,Bob,,\n"  # 5
        'c,"C\r\n'  # 6 (spans 6-7, CRLF inside the quotes)
        'C",,"a;b"\n'  # 7
        "\n"  # 8
        "d,,,\n"  # 9
    )
    parsed = parse_import_file(_write(tmp_path, "p.csv", content))

    assert parsed.ok, _errors(parsed)
    assert [(r.line, r.profile.user_id) for r in parsed.rows] == [
        (2, "a"),
        (5, "b"),
        (6, "c"),
        (9, "d"),
    ]
    a = parsed.rows[0].profile
    assert a.name == "Lee, Ann"
    assert a.bio == 'line one\nline two\nline "three"'
    assert parsed.rows[2].profile.interests == ["a", "b"]


def test_csv_bad_rows_are_reported_and_good_rows_kept() -> None:
    tags = ";".join(f"t{i}" for i in range(51))
    text = (
        CSV_HEADER  # 1
        + "good1,,,,,,,\n"  # 2
        + "bad id,,,,,,,\n"  # 3
        + f"z,,,,,{tags},,\n"  # 4
        + "short,row\n"  # 5
        + f"long,,,,{'b' * 4001},,,\n"  # 6
        + ",Nobody,,,,,,\n"  # 7
        + "good2,,,,,,,\n"  # 8
    )
    parsed = parse_import_text(text, "csv")

    assert [(r.line, r.profile.user_id) for r in parsed.rows] == [(2, "good1"), (8, "good2")]
    assert _errors(parsed) == [
        "line 3: user_id: must match [A-Za-z0-9_.:@-]{1,128}",
        "line 4: interests: List should have at most 50 items after validation, not 51",
        "line 5: expected 8 cells, got 2",
        "line 6: bio: String should have at most 4000 characters",
        "line 7: user_id: must match [A-Za-z0-9_.:@-]{1,128}",
    ]


def test_csv_unterminated_quote_is_an_error() -> None:
    text = 'user_id,name\nz,Zed\na,"Ann\nb,Bob\nc,Cy\n'
    parsed = parse_import_text(text, "csv")

    assert _lines(parsed) == [2]
    assert _errors(parsed) == [
        "line 3: malformed CSV: unterminated quoted cell: the record runs to the end of the file"
    ]


def test_csv_text_after_closing_quote_is_an_error() -> None:
    text = 'user_id,name\na,"Ann" Lee\nb,Bob\n'
    parsed = parse_import_text(text, "csv")

    assert _lines(parsed) == [3]
    assert _errors(parsed) == [
        "line 2: malformed CSV: a closing quote must be followed by ',' or the end of the line"
    ]


def test_csv_space_before_quoted_cell_is_tolerated() -> None:
    parsed = parse_import_text('user_id, name, interests\na, "Lee, Ann", "ml; nlp"\n', "csv")
    assert parsed.ok
    assert parsed.rows[0].profile.name == "Lee, Ann"
    assert parsed.rows[0].profile.interests == ["ml", "nlp"]


def test_csv_quote_closing_late_gets_a_hint() -> None:
    text = 'user_id,name\na,"Ann\nb",Bob\nc,Cy\n'
    parsed = parse_import_text(text, "csv")

    assert _lines(parsed) == [4]
    assert _errors(parsed) == [
        "line 2: expected 2 cells, got 3 (record spans lines 2-3; unbalanced quote?)"
    ]


def test_csv_rows_of_empty_cells_are_skipped() -> None:
    parsed = parse_import_text("user_id,name\n,\n , \na,A\n", "csv")
    assert parsed.ok
    assert _lines(parsed) == [4]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            "user_id,name,intrests",
            "unknown column 'intrests' (expected: user_id, name, company, title, bio, "
            "interests, seeking, offering)",
        ),
        ("id,name", "unknown column 'id'"),
        ("user_id,foo,bar", "unknown columns 'foo', 'bar'"),
        ("name,company", "missing required column 'user_id'"),
        ("user_id,name,name", "duplicate column(s) 'name'"),
        ("user_id,name,", "column(s) 3 have no name"),
    ],
)
def test_csv_bad_header_imports_nothing(header: str, expected: str) -> None:
    text = f"{header}\na,b,c\nd,e,f\n"
    parsed = parse_import_text(text, "csv")

    assert parsed.rows == []
    assert len(parsed.errors) == 1
    assert parsed.errors[0].line == 1
    assert parsed.errors[0].message.startswith(expected)


def test_csv_missing_user_id_column_combined_with_unknown() -> None:
    parsed = parse_import_text("id,name\nx,y\n", "csv")
    assert _errors(parsed) == [
        "line 1: unknown column 'id' (expected: user_id, name, company, title, bio, interests, "
        "seeking, offering); missing required column 'user_id'"
    ]


def test_csv_empty_file_is_an_error() -> None:
    for text in ("", "\n\n", "\ufeff"):
        parsed = parse_import_text(text, "csv")
        assert parsed.rows == []
        assert _errors(parsed) == [
            "line 1: missing header row (expected column names such as 'user_id')"
        ]


def test_csv_header_only_is_ok() -> None:
    parsed = parse_import_text(CSV_HEADER, "csv")
    assert parsed.ok
    assert parsed.rows == []


def test_csv_duplicate_user_id_keeps_first() -> None:
    text = "user_id,name\na,First\nb,\n a ,Second\n"
    parsed = parse_import_text(text, "csv")

    assert [(r.profile.user_id, r.profile.name) for r in parsed.rows] == [("a", "First"), ("b", "")]
    assert _errors(parsed) == ["line 4: duplicate user_id 'a' (first on line 2)"]


def test_csv_invalid_utf8_names_the_cell(tmp_path: Path) -> None:
    content = b"user_id,name\na,ok\nb,bad\xc3(\nc,ok\n"
    parsed = parse_import_file(_write(tmp_path, "p.csv", content))

    assert [r.profile.user_id for r in parsed.rows] == ["a", "c"]
    assert _errors(parsed) == ["line 3: name: invalid UTF-8 (byte 0xC3 at character 4)"]


def test_csv_invalid_utf8_in_header(tmp_path: Path) -> None:
    parsed = parse_import_file(_write(tmp_path, "p.csv", b"user_id,n\xffme\na,b\n"))

    assert parsed.rows == []
    assert _errors(parsed) == ["line 1: column 2: invalid UTF-8 (byte 0xFF at character 2)"]


def test_csv_nul_character_is_an_error() -> None:
    parsed = parse_import_text("user_id,bio\na,x\x00y\nb,\n", "csv")
    assert _lines(parsed) == [3]
    assert _errors(parsed) == ["line 2: bio: NUL character at character 2"]


def test_csv_overlong_line_is_an_error_and_later_rows_still_parse() -> None:
    huge = "x" * (MAX_LINE_BYTES + 1)
    text = (
        "user_id,bio\n"  # 1
        "a,\n"  # 2
        f'b,"start\n{huge}, with a comma\nend"\n'  # 3-5: overlong line inside quotes
        f"c,{huge}\n"  # 6
        "d,\n"  # 7
    )
    parsed = parse_import_text(text, "csv")

    assert [(r.line, r.profile.user_id) for r in parsed.rows] == [(2, "a"), (7, "d")]
    assert [(e.line, e.message.split(" (")[0]) for e in parsed.errors] == [
        (3, "line 4 is longer than 1 MiB"),
        (6, "line is longer than 1 MiB"),
    ]


def test_csv_cell_beyond_csv_field_limit_is_an_error_not_a_crash() -> None:
    text = f'user_id,bio\na,"{"x" * 200_000}"\nb,\n'
    parsed = parse_import_text(text, "csv")

    assert _lines(parsed) == [3]
    assert [e.line for e in parsed.errors] == [2]
    assert parsed.errors[0].message.startswith("malformed CSV: field larger than field limit")


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("name", ["people.txt", "people.json", "people", "people.csv.gz"])
def test_unsupported_extension(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path, name, '{"user_id": "a"}\n')
    with pytest.raises(ImportFormatError, match=r"unsupported import file extension"):
        parse_import_file(path)
    assert issubclass(ImportFormatError, ValueError)


def test_unsupported_extension_checked_before_reading(tmp_path: Path) -> None:
    with pytest.raises(ImportFormatError):
        parse_import_file(tmp_path / "missing.xlsx")


def test_unsupported_text_format() -> None:
    with pytest.raises(ImportFormatError, match="unsupported import format 'xml'"):
        parse_import_text("", "xml")  # type: ignore[arg-type]


def test_parse_import_text_tolerates_bom_and_bytes_api() -> None:
    assert parse_import_text('\ufeff{"user_id": "a"}', "jsonl").rows[0].profile.user_id == "a"
    parsed = parse_import_bytes(b"\xef\xbb\xbfuser_id\na\n", "csv")
    assert parsed.ok
    assert parsed.rows[0].profile.user_id == "a"


# --------------------------------------------------------------------------- messages


def _validation_error(data: object) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        Profile.model_validate(data)
    return info.value


def test_format_validation_error_joins_problems_with_paths() -> None:
    exc = _validation_error({"user_id": "", "interests": ["ok", 3], "colour": "red"})
    assert format_validation_error(exc) == (
        "user_id: must match [A-Za-z0-9_.:@-]{1,128}; "
        "interests.1: Input should be a valid string; "
        "unknown field 'colour'"
    )


def test_format_validation_error_non_object_input() -> None:
    exc = _validation_error([1, 2])
    assert format_validation_error(exc) == (
        "Input should be a valid dictionary or instance of Profile"
    )


def test_format_validation_error_caps_problems_and_echo_length() -> None:
    data = {f"extra_{i}": 1 for i in range(15)} | {"user_id": "a", "k" * 500: 1}
    message = format_validation_error(_validation_error(data), max_problems=3)
    assert message.count(";") == 3
    assert message.endswith("... and 13 more problem(s)")

    long_key = format_validation_error(_validation_error({"user_id": "a", "k" * 500: 1}))
    assert len(long_key) < 100

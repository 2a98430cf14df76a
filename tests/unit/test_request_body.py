"""core.api.request_body on its own: generated JSON round-trips, the depth check agrees with
a reference computed on the parsed value, and arbitrary bytes end in a body or a domain
error, never anything else (no RecursionError, ValueError, UnicodeError)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.api.errors import (
    DomainError,
    InvalidEncodingError,
    InvalidInputError,
    TooLargeError,
)
from core.api.request_body import (
    MAX_BODY_BYTES,
    MAX_DEPTH,
    MAX_INTEGER_DIGITS,
    body_bytes,
    nests_deeper_than,
    parse_object,
)

# Text PostgreSQL can store, with the characters that matter to the depth scan: brackets,
# quotes and backslashes inside strings.
storable = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
    | st.sampled_from('[]{}"\\'),
    max_size=12,
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**19), 10**19)
    | st.floats(allow_nan=False, allow_infinity=False)
    | storable
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(storable, inner, max_size=4),
    max_leaves=30,
)
objects = st.dictionaries(storable, values, max_size=5)


def depth(value: Any) -> int:
    """Reference: how many arrays/objects nest, computed on the parsed value."""
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(body=objects, indent=st.sampled_from([None, 2]))
def test_generated_objects_round_trip(body, indent):
    """Any JSON object within the limits comes back equal (floats compared as floats)."""
    text = json.dumps(body, indent=indent, ensure_ascii=False)
    assert parse_object(text.encode()) == body


@settings(max_examples=300, deadline=None)
@given(value=values)
def test_the_depth_scan_agrees_with_the_parsed_value(value):
    """The scan on the text (no parsing) says "deeper than n" exactly when the parsed
    value nests more than n, for every n around its depth."""
    text = json.dumps(value, ensure_ascii=False)
    actual = depth(value)
    for limit in {0, max(actual - 1, 0), actual, actual + 1}:
        assert nests_deeper_than(text, limit) == (actual > limit), (text, limit)


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_arbitrary_bytes_are_a_body_or_a_domain_error(data):
    """Random bytes and text: a dict, None, or a 400/422 domain error; nothing else."""
    try:
        parsed = parse_object(data)
    except (InvalidInputError, InvalidEncodingError):
        return
    assert parsed is None or isinstance(parsed, dict)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[" * 100_000, "deep"),
        ('{"a": ' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1), "deep"),
        ('{"k": ' + "1" * 50_000 + "}", "50000 digits"),
        ('{"k": -' + "1" * (MAX_INTEGER_DIGITS + 1) + "}", "digits"),
        ('{"k": NaN}', "NaN"),
        ('{"k": [Infinity]}', "Infinity"),
        ('{"k": -Infinity}', "-Infinity"),
        ('{"k": 1e400}', "out of range"),
        ('{"k": -1e400}', "out of range"),
        ('{"k": 1, "k": 1}', "'k' appears twice"),
        ('{"a": {"k": 1, "k": 2}}', "'k' appears twice"),
        ('{"a": ["\\ud800"]}', "surrogate"),
        ('{"a": {"\\udbff\\udbff": 1}}', "a key"),
        ('{"a": "x\\u0000"}', "NUL"),
        ("[]", "not an array"),
        ('"{}"', "not a string"),
        ("1.5", "not a number"),
        ("false", "not a boolean"),
        ("null", "not null"),
        ("{", "malformed JSON"),
        ('{"a": 1} {"b": 2}', "malformed JSON"),
    ],
)
def test_each_limit_is_a_validation_error_saying_what_is_wrong(text, words):
    with pytest.raises(InvalidInputError) as refused:
        parse_object(text.encode())
    assert words in refused.value.message


def test_where_the_problem_is_is_named():
    with pytest.raises(InvalidInputError) as refused:
        parse_object(b'{"settings": {"tags": ["ok", "\\ud800"]}}')
    assert refused.value.field == "settings.tags[1]"


@pytest.mark.parametrize(
    "data",
    [b"\xff", b'{"a": "\xc0\xaf"}', b'{"a": "\xed\xa0\x80"}', b'{"a": "\xe2\x82"}', b"\x80{}"],
    ids=["stray", "overlong", "encoded-surrogate", "truncated", "leading-continuation"],
)
def test_bytes_that_are_not_utf8_are_an_encoding_error(data):
    with pytest.raises(InvalidEncodingError) as refused:
        parse_object(data)
    assert "UTF-8" in refused.value.message


def test_the_limits_hold_at_their_edges():
    """Exactly MAX_DEPTH deep and MAX_INTEGER_DIGITS digits parse; largest finite float too."""
    deepest = '{"a": ' * (MAX_DEPTH - 1) + "[1]" + "}" * (MAX_DEPTH - 1)
    assert depth(parse_object(deepest.encode())) == MAX_DEPTH
    longest = -int("9" * MAX_INTEGER_DIGITS)
    assert parse_object(json.dumps({"k": longest}).encode()) == {"k": longest}
    assert parse_object(b'{"k": 1.7976931348623157e308}') == {"k": 1.7976931348623157e308}
    assert parse_object(b'{"k": 1e-400}') == {"k": 0.0}  # underflows to 0: finite


def test_empty_and_blank_bodies_are_no_body():
    assert parse_object(b"") is None
    assert parse_object(b" \t\r\n") is None
    assert body_bytes(None, False) == b""
    assert body_bytes("", True) == b""


def test_base64_is_decoded_strictly_and_measured_after_decoding():
    data = b'{"name": "Ada"}'
    assert body_bytes(base64.b64encode(data).decode(), True) == data
    for bad in ("e30", "e3 0=", "{}", "e30=!"):
        with pytest.raises(InvalidEncodingError):
            body_bytes(bad, True)
    exactly = base64.b64encode(b" " * MAX_BODY_BYTES).decode()
    assert len(body_bytes(exactly, True)) == MAX_BODY_BYTES
    with pytest.raises(TooLargeError):
        body_bytes(base64.b64encode(b" " * (MAX_BODY_BYTES + 1)).decode(), True)


def test_plain_bodies_are_measured_in_utf8_bytes():
    assert len(body_bytes("é" * (MAX_BODY_BYTES // 2), False)) == MAX_BODY_BYTES
    with pytest.raises(TooLargeError):
        body_bytes("é" * (MAX_BODY_BYTES // 2) + "x", False)
    smuggled = body_bytes('{"a": "\udcff"}', False)  # surrogate-escaped byte: measured...
    with pytest.raises(InvalidEncodingError):  # ...and refused as not UTF-8
        parse_object(smuggled)


def test_a_body_that_is_not_a_string_is_an_encoding_error():
    with pytest.raises(DomainError):
        body_bytes({"code": "x"}, False)

"""A request body, from what API Gateway hands over to a JSON object, with the limits that
API Gateway cannot give: size, strict UTF-8 (and strict base64), nesting depth, integer
length, no NaN/Infinity, no duplicate keys, no text PostgreSQL cannot store, and an object
at the top. Pure: text in, a dict (or None for no body) out, or a domain error.

Every body a route takes is a JSON object. The checks run without recursion and before
json.loads sees the text, so no body can exhaust the stack (RecursionError) or trip
Python's int-string digit limit (ValueError): they are 4xx answers, never 5xx.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections import deque
from typing import Any

from core.api.errors import InvalidEncodingError, InvalidInputError, TooLargeError
from core.models import unstorable_text_problem

MAX_BODY_BYTES = 256 * 1024
# The deepest body a route takes is 3 levels (an event's settings.weights); 32 leaves room
# for any future shape while keeping json.loads far from Python's recursion limit.
MAX_DEPTH = 32
# The largest integer a route takes is k (at most 10); 20 digits covers any int64.
MAX_INTEGER_DIGITS = 20

# A JSON string, escapes included. The closing quote is optional so that an unterminated
# string ends the match instead of being retried from each quote inside it: with the
# unrolled, unambiguous loop that keeps the scan linear on any text.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def body_bytes(body: object, base64_encoded: bool) -> bytes:
    """The bytes the client sent: base64-decoded strictly when API Gateway marked the body
    so; TooLargeError above MAX_BODY_BYTES, InvalidEncodingError for bad base64."""
    if not body:
        return b""
    if not isinstance(body, str):  # a hand-made event (sam local invoke) with a JSON body
        raise InvalidEncodingError("the body must arrive as a string, not parsed JSON")
    if base64_encoded:
        if len(body) > 4 * (MAX_BODY_BYTES // 3 + 1):
            raise _too_large()
        try:
            data = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidEncodingError("the body is marked base64-encoded but is not") from exc
    else:
        # surrogatepass: a body smuggling bytes that are not UTF-8 (surrogate escapes) is
        # measured here and rejected as bad UTF-8 by parse_object, not crashed on.
        data = body.encode("utf-8", "surrogatepass")
    if len(data) > MAX_BODY_BYTES:
        raise _too_large()
    return data


def parse_object(data: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None when there is none (empty or only whitespace).

    InvalidEncodingError when it is not UTF-8; InvalidInputError (with the problem and
    where) when it is not a JSON object within the limits."""
    try:
        text = data.decode("utf-8")  # strict: overlong forms, surrogates, stray bytes fail
    except UnicodeDecodeError as exc:
        raise InvalidEncodingError(
            f"the body is not valid UTF-8 (byte 0x{data[exc.start]:02X} at offset {exc.start});"
            " send JSON encoded as UTF-8"
        ) from exc
    if not text.strip():
        return None
    if nests_deeper_than(text, MAX_DEPTH):
        raise InvalidInputError(f"the body nests arrays and objects more than {MAX_DEPTH} deep")
    try:
        value = json.loads(
            text,
            parse_int=_integer,
            parse_float=_finite_float,
            parse_constant=_no_constant,
            object_pairs_hook=_object_without_duplicates,
        )
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"body: malformed JSON ({exc})", problem="malformed JSON") from exc
    if not isinstance(value, dict):
        raise InvalidInputError(f"the body must be a JSON object, not {_json_type(value)}")
    _check_text(value)
    return value


def nests_deeper_than(text: str, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` deep in JSON text, told without
    parsing it (and without recursion) from the brackets outside strings."""
    if text.count("[") + text.count("{") <= limit:  # most bodies: no scan needed
        return False
    depth = 0
    for match in _BRACKET.finditer(_JSON_STRING.sub("", text)):
        depth += _STEP[match.group()]
        if depth > limit:
            return True
    return False


def _too_large() -> TooLargeError:
    return TooLargeError(f"request body is larger than {MAX_BODY_BYTES} bytes")


def _integer(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise InvalidInputError(
            f"an integer in the body has {len(digits.lstrip('-'))} digits;"
            f" at most {MAX_INTEGER_DIGITS}"
        )
    return int(digits)


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):  # 1e400 is a valid JSON number but no finite double
        raise InvalidInputError(f"the number {literal[:40]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise InvalidInputError(f"{name} is not JSON; send a finite number")


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Parsers disagree on which of two equal keys wins (a proxy may check the first while
    # we would store the last): an ambiguous body is rejected instead.
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise InvalidInputError(f"the key {key!r} appears twice in one object")
        obj[key] = value
    return obj


def _check_text(value: dict[str, Any]) -> None:
    """No key or string anywhere that PostgreSQL text cannot store (an escaped lone
    surrogate "\\ud800", U+0000); iterative, the depth is already bounded."""
    pending: deque[tuple[str, Any]] = deque([("", value)])
    while pending:
        path, item = pending.popleft()
        if isinstance(item, dict):
            for key, child in item.items():
                where = f"{path}.{key}" if path else key
                if problem := unstorable_text_problem(key, "character"):
                    raise InvalidInputError(f"a key in the body: {problem}", field=path or "body")
                pending.append((where, child))
        elif isinstance(item, list):
            pending.extend((f"{path}[{i}]", child) for i, child in enumerate(item))
        elif isinstance(item, str) and (problem := unstorable_text_problem(item, "character")):
            raise InvalidInputError(problem, field=path)


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"

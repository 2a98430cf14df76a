"""Hostile request bodies, path parameters and query strings against the HTTP API handler
(handlers.api.lambda_handler, real PostgreSQL, moto for AWS): every one is a 4xx with the
`{"error", "message"}` shape, never a 5xx, and writes nothing.

Decisions these tests pin down (docs/api.md, Errors):
- every body a route takes is one JSON object; an array (even one whose first element is a
  valid body), a string, a number, null or a boolean is 422;
- duplicate keys in an object are 422 (parsers disagree on which one wins);
- an escaped lone surrogate ("\\ud800") or U+0000 anywhere in the body is 422: PostgreSQL
  text cannot store either;
- bytes that are not UTF-8 (stray, overlong, surrogate-escaped) or a body marked base64 that
  is not, are 400 invalid_encoding; a valid base64 body is read like any other;
- an empty or blank body is no body: 422 on routes that need one;
- routes without a body ignore one that passes the same checks, and reject one that fails.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.api.request_body import MAX_BODY_BYTES, MAX_DEPTH, MAX_INTEGER_DIGITS
from core.data.repository import Conn
from core.models import EventIn, EventRecord, Profile
from core.queue.worker import Matchmaker
from core.settings import Settings
from handlers.api import openapi_document
from tests.integration.api_support import (
    ADA,
    GRACE,
    Api,
    Reply,
    load_event,
    request,
    snapshot,
)
from tooling.local_runs import import_profiles

pytestmark = pytest.mark.filterwarnings("ignore:No application metrics to publish:UserWarning")

GRACE_BODY = {
    "name": "Grace Oyelaran",
    "company": "Tidewater Logistics",
    "interests": ["stream processing", "kafka operations", "postgresql"],
    "seeking": ["recommender systems"],
    "offering": ["kafka operations"],
}

# For every route that takes a body: a valid body that writes something in the seeded state
# (test_each_writing_body_writes proves it), so that "nothing written" means something.
WRITING_BODY: dict[str, dict[str, Any]] = {
    "create_event": {"code": "devsummit-2026", "name": "DevSummit"},
    "put_attendee": {**json.loads(load_event("put_attendee")["body"]), "bio": "Moved to Oslo."},
    "dismiss": {"dismissed_user_id": GRACE},
    "trigger_queue": {"useQueue": True, "user_ids": [ADA, GRACE]},
    "trigger_sync": {"useQueue": False, "user_ids": [ADA, GRACE]},
    "admin_start": {"mode": "everyone", "priority": 2},
    "admin_settings": {"k": 2, "weights": {"bio": 2.0}},
    "trigger_matchmaking_seed": {"eventCode": "techconf-2026", "userIds": [ADA, GRACE]},
    "admin_start_matching_seed": {"eventCode": "techconf-2026", "mode": "everyone"},
}
BODY_ROUTES = sorted(WRITING_BODY)
BODYLESS_ROUTES = [
    "get_event",
    "remove_attendee",
    "get_matches",
    "admin_status",
    "admin_pause",
    "admin_resume",
    "admin_dead_letters",
    "admin_redrive",
]


@pytest.fixture
def seeded(conn: Conn, settings: Settings) -> EventRecord:
    """techconf-2026 (create_event.json) with Ada and Grace, matched: the queue is empty."""
    event = import_profiles(
        conn,
        EventIn(**json.loads(load_event("create_event")["body"])),
        [
            Profile(user_id=ADA, **json.loads(load_event("put_attendee")["body"])),
            Profile(user_id=GRACE, **GRACE_BODY),
        ],
    )
    report = Matchmaker(settings).run(conn, deadline=time.monotonic() + 60)
    assert report.completed == 2
    return event


# --- requests ----------------------------------------------------------------------------


def raw(name: str, body: str | None, **headers: str) -> dict[str, Any]:
    """The route's request with `body` sent as is (None: no body) and extra headers."""
    event = request(name, body=body)
    event["headers"].update(headers)
    return event


def smuggled(name: str, body: str) -> dict[str, Any]:
    """The route's request with a body string that cannot be encoded as UTF-8 (bytes a
    server decoded with surrogateescape), which request() cannot measure."""
    event = request(name, body="")
    event["body"] = body
    return event


def as_type(name: str, content_type: str) -> dict[str, Any]:
    """The route's request without a body, declaring `content_type`."""
    event = raw(name, None)
    event["headers"]["content-type"] = content_type
    return event


def base64_body(name: str, data: bytes) -> dict[str, Any]:
    """The route's request with `data` as API Gateway passes a binary body: base64."""
    event = request(name, body="")
    event["body"] = base64.b64encode(data).decode()
    event["isBase64Encoded"] = True
    return event


def valid(name: str) -> str:
    return json.dumps(WRITING_BODY[name])


def nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


ERROR_OF = {
    400: "invalid_encoding",
    413: "too_large",
    415: "unsupported_media_type",
    422: "validation_error",
}
Build = Callable[[str], dict[str, Any]]


def case(label: str, status: int, words: str, build: Build) -> tuple[str, Build, int, str, str]:
    """A hostile request: how to build it for a route, the status, its error code, and
    words the message must have."""
    return (label, build, status, ERROR_OF[status], words)


HOSTILE = [
    case(
        "array-depth-10000",
        422,
        f"more than {MAX_DEPTH} deep",
        lambda n: raw(n, "[" * 10_000 + "]" * 10_000),
    ),
    case("object-depth-10000", 422, "deep", lambda n: raw(n, nested(10_000))),
    case("depth-10000-unclosed", 422, "deep", lambda n: raw(n, "[" * 10_000)),
    case("int-5000-digits", 422, "5000 digits", lambda n: raw(n, '{"k": ' + "7" * 5000 + "}")),
    case("negative-int-5000-digits", 422, "digits", lambda n: raw(n, '{"k": -' + "7" * 5000 + "}")),
    case(
        "int-in-array-5000-digits",
        422,
        "digits",
        lambda n: raw(n, '{"user_ids": [' + "1" * 5000 + "]}"),
    ),
    case("nan-literal", 422, "NaN", lambda n: raw(n, '{"k": NaN}')),
    case("infinity-literal", 422, "Infinity", lambda n: raw(n, '{"k": Infinity}')),
    case(
        "minus-infinity-literal",
        422,
        "Infinity",
        lambda n: raw(n, '{"weights": {"bio": -Infinity}}'),
    ),
    case("float-overflowing-to-inf", 422, "out of range", lambda n: raw(n, '{"k": 1e400}')),
    case("invalid-utf8-base64", 400, "UTF-8", lambda n: base64_body(n, b'{"name": "Ada \xff"}')),
    case("overlong-utf8-slash", 400, "UTF-8", lambda n: base64_body(n, b'{"name": "\xc0\xaf"}')),
    case("overlong-utf8-nul", 400, "UTF-8", lambda n: base64_body(n, b'{"name": "\xc0\x80"}')),
    case(
        "utf8-encoded-surrogate",
        400,
        "UTF-8",
        lambda n: base64_body(n, b'{"name": "\xed\xa0\x80"}'),
    ),
    case("truncated-utf8", 400, "UTF-8", lambda n: base64_body(n, b'{"name": "\xe2\x82"}')),
    case("surrogate-escaped-bytes", 400, "UTF-8", lambda n: smuggled(n, '{"name": "Ada \udcff"}')),
    case(
        "not-base64", 400, "base64", lambda n: {**raw(n, "{not base64}"), "isBase64Encoded": True}
    ),
    case("lone-surrogate-escape", 422, "surrogate", lambda n: raw(n, '{"name": "lone \\ud800"}')),
    case("lone-surrogate-in-key", 422, "key", lambda n: raw(n, '{"\\udfff": 1}')),
    case("lone-surrogate-in-list", 422, "surrogate", lambda n: raw(n, '{"user_ids": ["\\ud800"]}')),
    case("nul-escape", 422, "NUL", lambda n: raw(n, '{"name": "nul \\u0000"}')),
    case(
        "array-of-a-valid-body",
        422,
        "must be a JSON object",
        lambda n: raw(n, "[" + valid(n) + "]"),
    ),
    case("array-of-two-bodies", 422, "not an array", lambda n: raw(n, "[" + valid(n) + ", {}]")),
    case("top-level-string", 422, "not a string", lambda n: raw(n, json.dumps(valid(n)))),
    case("top-level-number", 422, "not a number", lambda n: raw(n, "42")),
    case("top-level-null", 422, "not null", lambda n: raw(n, "null")),
    case("top-level-true", 422, "not a boolean", lambda n: raw(n, "true")),
    case("no-body", 422, "body", lambda n: raw(n, None)),
    case("empty-body", 422, "body", lambda n: raw(n, "")),
    case("blank-body", 422, "body", lambda n: raw(n, " \r\n\t ")),
    # No body under another media type: never parsed as a form of defaults (or a 415 in
    # the resolver's own shape).
    case(
        "no-body-as-multipart",
        422,
        "needs a JSON object",
        lambda n: as_type(n, "multipart/form-data; boundary=x"),
    ),
    case(
        "no-body-as-form",
        422,
        "needs a JSON object",
        lambda n: as_type(n, "application/x-www-form-urlencoded"),
    ),
    case("no-body-as-text", 422, "needs a JSON object", lambda n: as_type(n, "text/plain")),
    case("duplicate-keys", 422, "twice", lambda n: raw(n, valid(n)[:-1] + ", " + valid(n)[1:])),
    case("malformed-json", 422, "malformed JSON", lambda n: raw(n, valid(n)[:-1])),
    case("trailing-garbage", 422, "malformed JSON", lambda n: raw(n, valid(n) + " x")),
    case("utf8-bom", 422, "BOM", lambda n: base64_body(n, b"\xef\xbb\xbf" + valid(n).encode())),
    case(
        "over-the-limit",
        413,
        str(MAX_BODY_BYTES),
        lambda n: raw(n, valid(n)[:-1] + " " * MAX_BODY_BYTES + "}"),
    ),
    case(
        "over-the-limit-base64",
        413,
        str(MAX_BODY_BYTES),
        lambda n: base64_body(n, valid(n).encode() + b" " * MAX_BODY_BYTES),
    ),
    case("over-the-limit-and-deep", 413, "larger", lambda n: raw(n, "[" * (MAX_BODY_BYTES + 1))),
    case(
        "latin-1-charset",
        415,
        "UTF-8",
        lambda n: raw(n, valid(n), **{"content-type": "application/json; charset=iso-8859-1"}),
    ),
    case(
        "json-lookalike-media-type",
        415,
        "application/json",
        lambda n: raw(n, valid(n), **{"content-type": "application/jsonp"}),
    ),
]


def problems_of(reply: Reply, status: int, code: str, words: str) -> list[str]:
    """What is wrong with an error answer: status, content type, shape, code, message."""
    problems = []
    body = reply.json if reply.text.startswith("{") else None
    if reply.status != status:
        problems.append(f"status {reply.status}, not {status}: {reply.text[:300]}")
    if reply.headers.get("Content-Type") != "application/json":
        problems.append(f"content type {reply.headers.get('Content-Type')}")
    if not isinstance(body, dict) or set(body) - {"error", "message", "details"}:
        problems.append(f"not the error shape: {reply.text[:300]}")
        return problems
    if body.get("error") != code:
        problems.append(f"error {body.get('error')!r}, not {code!r}")
    message = body.get("message")
    if not isinstance(message, str) or words not in message:
        problems.append(f"message {message!r} does not say {words!r}")
    return problems


def rejected(
    api: Api, conn: Conn, event: dict[str, Any], status: int, code: str, words: str
) -> list[str]:
    before = snapshot(conn)
    problems = problems_of(api(event), status, code, words)
    if snapshot(conn) != before:
        problems.append("rows were written")
    if api.invocations:
        problems.append("the matchmaker was invoked")
        api.invocations.clear()
    return problems


# --- the tests ---------------------------------------------------------------------------


def test_the_body_routes_here_are_every_route_the_api_documents_with_a_body():
    """The routes these tests attack are exactly the ones with a request body: a new route
    that takes a body must be added to WRITING_BODY (and so to every hostile case)."""
    documented = {
        f"{method.upper()} {path}"
        for path, operations in openapi_document()["paths"].items()
        for method, operation in operations.items()
        if "requestBody" in operation
    }
    attacked = {load_event(name)["routeKey"] for name in BODY_ROUTES}
    assert attacked == documented


@pytest.mark.parametrize("name", BODY_ROUTES)
def test_each_writing_body_writes(api, conn, seeded, name):
    """Control for the rejections below: the valid body of each route, sent plainly,
    answers 2xx and changes the database (so an unchanged snapshot proves a rejection)."""
    before = snapshot(conn)
    reply = api(raw(name, valid(name)))
    assert 200 <= reply.status < 300, reply
    assert snapshot(conn) != before


@pytest.mark.parametrize("name", BODY_ROUTES)
def test_hostile_bodies_are_the_exact_4xx_and_write_nothing(api, conn, seeded, name):
    """Given the matched event, when a route that takes a body gets a body 10,000 levels
    deep, an integer of 5,000 digits, NaN or Infinity, bytes that are not UTF-8 (stray,
    overlong, truncated, surrogate-escaped, bad base64), an escaped lone surrogate or NUL,
    an array holding a valid body, a top-level string/number/null/boolean, no or a blank
    body, duplicate keys, malformed JSON, a BOM, a body over the limit or a non-UTF-8
    charset, then the exact 4xx with {"error", "message"} saying what is wrong, nothing
    written and the matchmaker not invoked."""
    problems = [
        f"{label}: {problem}"
        for label, build, status, code, words in HOSTILE
        for problem in rejected(api, conn, build(name), status, code, words)
    ]
    assert problems == []


@pytest.mark.parametrize("name", BODY_ROUTES)
def test_a_valid_body_in_base64_or_with_a_utf8_charset_is_accepted(api, conn, seeded, name):
    """Given the matched event, when the route's valid body arrives base64-encoded (as API
    Gateway passes binary media types), then it is read like the plain body: 2xx; and the
    same holds for `application/json; charset=UTF-8`."""
    reply = api(base64_body(name, valid(name).encode()))
    assert 200 <= reply.status < 300, reply
    again = api(raw(name, valid(name), **{"content-type": "application/json; charset=UTF-8"}))
    assert 200 <= again.status < 300, again


def test_integers_up_to_the_digit_limit_reach_the_model(api, conn, seeded):
    """An integer of exactly MAX_INTEGER_DIGITS digits is parsed and judged by the model
    (out of range: 422 from validation, naming the field), one more digit by the parser."""
    longest = raw("admin_settings", '{"k": ' + "9" * MAX_INTEGER_DIGITS + "}")
    assert problems_of(api(longest), 422, "validation_error", "k: ") == []
    too_long = raw("admin_settings", '{"k": ' + "9" * (MAX_INTEGER_DIGITS + 1) + "}")
    assert problems_of(api(too_long), 422, "validation_error", "digits") == []


def test_nesting_up_to_the_limit_reaches_the_model(api, conn, seeded):
    """A body nested exactly MAX_DEPTH deep is parsed and judged by the model (an unknown
    field: 422 naming it), one level more by the parser."""
    assert (
        problems_of(api(raw("admin_settings", nested(MAX_DEPTH))), 422, "validation_error", "a:")
        == []
    )
    deeper = raw("admin_settings", nested(MAX_DEPTH + 1))
    assert problems_of(api(deeper), 422, "validation_error", "deep") == []  # fmt: skip


# The status each route without a body answers in the seeded state.
BODYLESS_SUCCESS = {
    "get_event": 200,
    "remove_attendee": 204,
    "get_matches": 200,
    "admin_status": 200,
    "admin_pause": 204,
    "admin_resume": 204,
    "admin_dead_letters": 200,
    "admin_redrive": 200,
}


@pytest.mark.parametrize("name", sorted(BODYLESS_SUCCESS))
def test_routes_without_a_body_ignore_a_sound_one_and_reject_a_hostile_one(api, conn, seeded, name):
    """Given the matched event, a route that takes no body rejects a body that fails the
    checks every body gets (depth, an array, bad UTF-8) with the same 4xx, writing
    nothing; and it answers as without a body when it gets a JSON object (clients often
    send {})."""
    problems = [
        f"{label}: {problem}"
        for label, event, status, code, words in [
            ("deep", raw(name, "[" * 10_000), 422, "validation_error", "deep"),
            ("array", raw(name, "[{}]"), 422, "validation_error", "not an array"),
            ("bad utf-8", base64_body(name, b'{"a": "\xff"}'), 400, "invalid_encoding", "UTF-8"),
        ]
        for problem in rejected(api, conn, event, status, code, words)
    ]
    assert problems == []
    reply = api(raw(name, '{"mode": "everyone", "ignored": [1, 2]}'))
    assert reply.status == BODYLESS_SUCCESS[name], reply


HOSTILE_PATH_VALUES = [
    ("x" * 100_000, "pattern"),
    ("tech%00conf", "pattern"),  # left percent-encoded
    ("tech\x00conf", "U+0000"),  # decoded, as API Gateway passes the path
    ("techconf-2026\n", "U+000A"),  # the router alone would read it as techconf-2026
    ("tech\u202econf", "U+202E"),  # right-to-left override
    ("techconf\ud800", "U+D800"),
    ("\U0001f600" * 40, "U+1F600"),
    ("..%2F..%2Fadmin", "pattern"),
    ("tech conf", "U+0020"),
]


@pytest.mark.parametrize("name", ["get_event", "put_attendee", "admin_settings", "admin_pause"])
def test_hostile_path_parameters_are_422_and_write_nothing(api, conn, seeded, name):
    """Given the matched event, when {code} (and {user_id} where the route has one) is
    100,000 characters, carries a percent-encoded or raw NUL, a trailing newline, a bidi
    override, a lone surrogate, emoji, an encoded path traversal or a space, then 422 with
    the error shape saying what is wrong, and nothing written."""
    problems = []
    for value, words in HOSTILE_PATH_VALUES:
        cases = [request(name, code=value)]
        if "user_id" in (load_event(name).get("pathParameters") or {}):
            cases.append(request(name, user_id=value))
        for event in cases:
            for problem in rejected(api, conn, event, 422, "validation_error", words):
                problems.append(f"{value[:20]!r}: {problem}")
    assert problems == []


@pytest.mark.parametrize(
    "query",
    [
        "x=" + "%00" * 10_000,
        "k=%FF%FE&k=%ED%A0%80",
        "k=" + "9" * 5000,
        "a[b][c]=" + "[" * 5000,
        "\ud800=\udfff",
    ],
    ids=["nul-10000", "bad-utf8", "long-int", "brackets", "surrogates"],
)
def test_hostile_query_strings_are_ignored(api, conn, seeded, query):
    """No route reads a query string: a hostile one (NULs, bytes that are not UTF-8, a
    5,000-digit number, brackets, lone surrogates) changes nothing in the answer."""
    plain = api(request("get_event"))
    event = request("get_event")
    event["rawQueryString"] = query
    event["queryStringParameters"] = {"x": query, query[:50]: "1"}
    reply = api(event)
    assert (reply.status, reply.json) == (plain.status, plain.json) == (200, plain.json)


ALL_ROUTES = BODY_ROUTES + sorted(BODYLESS_SUCCESS)
CONTENT_TYPES = [
    None,
    "application/json",
    "application/json; charset=utf-8",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/octet-stream",
    "",
]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    name=st.sampled_from(ALL_ROUTES),
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]),
    content_type=st.sampled_from(CONTENT_TYPES),
    data=st.binary(max_size=64)
    | st.text(max_size=64).map(str.encode)
    | st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=8,
    ).map(lambda value: json.dumps(value).encode()),
    encoded=st.booleans(),
)
def test_no_request_is_a_5xx_and_every_error_has_the_shape(
    api, conn, seeded, name, method, content_type, data, encoded
):
    """Generated requests on every route (any method, content type, bytes, JSON value,
    base64 or not): never a 5xx, and every 4xx is JSON with `error` and `message`."""
    event = request(name, body=None)
    event["requestContext"]["http"]["method"] = method
    if content_type is not None:
        event["headers"]["content-type"] = content_type
    if data:
        if encoded:
            event["body"], event["isBase64Encoded"] = base64.b64encode(data).decode(), True
        else:
            event["body"] = data.decode("utf-8", "surrogateescape")
    reply = api(event)
    assert reply.status < 500, reply
    if reply.status >= 400:
        assert reply.is_error(reply.status), reply

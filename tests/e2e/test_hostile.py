"""Hostile input against `matchmaker serve`, over raw sockets.

A corpus generated from tables: every route x {malformed transport, bad tokens, hostile
bodies}. Each request is written byte for byte with `socket.sendall` and its answer read to
the end: a 4xx (the exact one where the transport or the token decides it), a JSON body
{"error": ..., "message": ...}, never a 5xx, a reset or a hang. The server gets a database
of its own; after the whole corpus every table the API, the worker and the queue write
holds byte for byte what it held before. Then an authorization matrix: every route x role
-> status, asserted as one table. The token verifier's clock rules are checked directly.

The corpus is sent once, concurrently (the timeouts it provokes take READ_TIMEOUT_S
each), by a module fixture; each case is then its own test, so a failure names its case.
Keep the module's order: corpus, snapshot check, matrix (the matrix writes).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import select
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.conftest import database_uri
from tests.e2e.test_serve import Server, call, launch, stop, wait_drained
from tests.helpers import APP_TABLES
from tooling import dev_tokens as devauth
from tooling.local_stack import (
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_REQUEST_LINE_BYTES,
    Gateway,
    LocalHTTPServer,
)

READ_TIMEOUT_S = 1.0  # the module's server: `serve --read-timeout-seconds 1`
CLIENT_TIMEOUT_S = 15.0  # longer than any server timeout: reaching it means a hang
MAX_BODY_BYTES = 256 * 1024  # handlers.api.MAX_BODY_BYTES (checked below)
EVENT = "hostile-ev"
USERS = ("hst-a", "hst-b", "hst-c")
SNAPSHOT_TABLES = APP_TABLES


# --- routes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    name: str
    method: str
    path: str
    body: dict[str, Any] | None = None  # a valid body (None: the route takes none)
    with_text: Callable[[str], dict[str, Any]] | None = None  # a valid body around a string


ROUTES = (
    Route(
        "create-event",
        "POST",
        "/events",
        {"code": "hst-new", "name": "New"},
        lambda s: {"code": "hst-new", "name": s},
    ),
    Route("get-event", "GET", f"/events/{EVENT}"),
    Route(
        "put-attendee",
        "PUT",
        f"/events/{EVENT}/attendees/hst-new",
        {"name": "New Person", "interests": ["AI"]},
        lambda s: {"name": s},
    ),
    Route("remove-attendee", "DELETE", f"/events/{EVENT}/attendees/hst-a"),
    Route("get-matches", "GET", f"/events/{EVENT}/attendees/hst-a/matches"),
    Route(
        "dismiss",
        "POST",
        f"/events/{EVENT}/attendees/hst-a/dismissals",
        {"dismissed_user_id": "hst-b"},
        lambda s: {"dismissed_user_id": s},
    ),
    Route(
        "trigger",
        "POST",
        f"/events/{EVENT}/matchmaking",
        {"useQueue": False, "user_ids": ["hst-a"]},
        lambda s: {"user_ids": [s]},
    ),
    Route(
        "admin-start",
        "POST",
        f"/admin/events/{EVENT}/matching",
        {"mode": "everyone", "priority": 1},
        lambda s: {"mode": s},
    ),
    Route("admin-status", "GET", f"/admin/events/{EVENT}/status"),
    Route("admin-pause", "POST", f"/admin/events/{EVENT}/pause"),
    Route("admin-resume", "POST", f"/admin/events/{EVENT}/resume"),
    Route(
        "admin-settings",
        "PATCH",
        f"/admin/events/{EVENT}/settings",
        {"k": 4},
        lambda s: {"embedder": s},
    ),
    Route("admin-dead-letters", "GET", f"/admin/events/{EVENT}/dead-letters"),
    Route("admin-redrive", "POST", f"/admin/events/{EVENT}/dead-letters/redrive"),
    Route(
        "seed-trigger",
        "POST",
        "/trigger-matchmaking",
        {"eventCode": EVENT, "useQueue": False, "userIds": ["hst-a"]},
        lambda s: {"eventCode": s},
    ),
    Route(
        "seed-admin-start",
        "POST",
        "/admin-start-matching",
        {"eventCode": EVENT, "mode": "everyone", "priority": 1},
        lambda s: {"eventCode": EVENT, "mode": s},
    ),
)


# --- building raw requests -------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What the cases need from the running server."""

    secret: bytes
    admin: str

    @property
    def now(self) -> int:  # read when a token is built: the corpus is built after seeding
        return int(time.time())


def valid_body(route: Route) -> bytes:
    return json.dumps(route.body).encode() if route.body is not None else b""


def head(
    route: Route,
    token: str | None,
    *,
    length: int | str | None = None,
    extra: tuple[str, ...] = (),
    host: bool = True,
    line: bytes | None = None,
) -> bytes:
    """A request line and headers (CRLF-terminated, blank line included)."""
    lines = [line if line is not None else f"{route.method} {route.path} HTTP/1.1".encode()]
    if host:
        lines.append(b"Host: 127.0.0.1")
    if token is not None:
        lines.append(f"Authorization: Bearer {token}".encode())
    lines.append(b"Content-Type: application/json")
    if length is not None:
        lines.append(f"Content-Length: {length}".encode())
    lines += [x.encode("latin-1") for x in extra]
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def request(route: Route, token: str | None, body: bytes | None = None, **kw: Any) -> bytes:
    """A well-framed request: Content-Length always (0 when there is no body)."""
    data = valid_body(route) if body is None else body
    return head(route, token, length=len(data), **kw) + data


def sign(secret: bytes, header_json: bytes, payload_json: bytes, *, alg: str = "sha256") -> str:
    header = base64.urlsafe_b64encode(header_json).rstrip(b"=").decode()
    payload = base64.urlsafe_b64encode(payload_json).rstrip(b"=").decode()
    digest = hmac.new(secret, f"{header}.{payload}".encode(), alg).digest()
    return f"{header}.{payload}.{base64.urlsafe_b64encode(digest).rstrip(b'=').decode()}"


DELETE = object()  # a claim override that removes the claim


def claims(ctx: Context, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": devauth.ISSUER,
        "aud": devauth.AUDIENCE,
        "sub": "local-admin",
        "iat": ctx.now,
        "exp": ctx.now + 3600,
        "scope": devauth.ROLE_SCOPES["admin"],
    }
    for key, value in overrides.items():
        if value is DELETE:
            base.pop(key, None)
        else:
            base[key] = value
    return base


def token_with(ctx: Context, header: dict[str, Any] | None = None, **overrides: Any) -> str:
    return devauth.sign(ctx.secret, claims(ctx, **overrides), header)


def raw_token(ctx: Context, payload: bytes, header: bytes = b'{"alg":"HS256","typ":"JWT"}') -> str:
    return sign(ctx.secret, header, payload)


# --- the corpus ------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Context], bytes]
    status: int | None  # the exact 4xx; None: any 4xx (the function decides which)
    half_close: bool = False  # shut our write side after sending (the client is done)


def _b64(text: bytes) -> str:
    return base64.urlsafe_b64encode(text).rstrip(b"=").decode()


def _token_header(value: str) -> Callable[[Route, Context], bytes]:
    """A request whose Authorization header is exactly `value`."""

    def build(route: Route, ctx: Context) -> bytes:
        data = valid_body(route)
        return head(route, None, length=len(data), extra=(f"Authorization: {value}",)) + data

    return build


def _with_token(make: Callable[[Context], str]) -> Callable[[Route, Context], bytes]:
    return lambda route, ctx: request(route, make(ctx))


DEEP = 10_000
ALG_NONE = b'{"alg":"none"}'
BIG_INT = "9" * 5000
TOKEN_CASES: dict[str, Callable[[Route, Context], bytes]] = {
    "no-authorization": lambda route, ctx: request(route, None),
    "empty-authorization": _token_header(""),
    "scheme-only": _token_header("Bearer"),
    "scheme-and-space": _token_header("Bearer "),
    "basic-scheme": _token_header("Basic dXNlcjpwYXNz"),
    "other-scheme": lambda route, ctx: _token_header(f"Token {ctx.admin}")(route, ctx),
    "two-tokens": lambda route, ctx: _token_header(f"Bearer {ctx.admin} {ctx.admin}")(route, ctx),
    "two-authorization-headers": lambda route, ctx: (
        head(
            route,
            ctx.admin,
            length=len(valid_body(route)),
            extra=(f"Authorization: Bearer {ctx.admin}",),
        )
        + valid_body(route)
    ),
    "expired": _with_token(lambda ctx: token_with(ctx, exp=ctx.now - 3600)),
    "expired-past-leeway": _with_token(
        lambda ctx: token_with(ctx, exp=ctx.now - devauth.LEEWAY_S - 5)
    ),
    "lowercase-bearer-expired": lambda route, ctx: _token_header(
        "bearer " + token_with(ctx, exp=ctx.now - 3600)
    )(route, ctx),
    "exp-string": _with_token(lambda ctx: token_with(ctx, exp=str(ctx.now + 3600))),
    "exp-null": _with_token(lambda ctx: token_with(ctx, exp=None)),
    "exp-bool": _with_token(lambda ctx: token_with(ctx, exp=True)),
    "exp-list": _with_token(lambda ctx: token_with(ctx, exp=[ctx.now + 3600])),
    "exp-object": _with_token(lambda ctx: token_with(ctx, exp={"at": ctx.now + 3600})),
    "exp-missing": _with_token(lambda ctx: token_with(ctx, exp=DELETE)),
    "exp-nan": _with_token(lambda ctx: token_with(ctx, exp=float("nan"))),
    "exp-infinity": _with_token(lambda ctx: token_with(ctx, exp=float("inf"))),
    "exp-5000-digits": _with_token(
        lambda ctx: raw_token(
            ctx,
            json.dumps(claims(ctx, exp=0)).replace('"exp": 0', f'"exp": {BIG_INT}').encode(),
        )
    ),
    "exp-twice": _with_token(
        lambda ctx: raw_token(
            ctx,
            json.dumps(claims(ctx, exp=ctx.now - 3600))
            .replace('"exp"', f'"exp": {ctx.now + 3600}, "exp"')
            .encode(),
        )
    ),
    "nbf-future": _with_token(lambda ctx: token_with(ctx, nbf=ctx.now + 3600)),
    "nbf-future-past-leeway": _with_token(
        lambda ctx: token_with(ctx, nbf=ctx.now + devauth.LEEWAY_S + 600)
    ),
    "nbf-string": _with_token(lambda ctx: token_with(ctx, nbf="0")),
    "nbf-null": _with_token(lambda ctx: token_with(ctx, nbf=None)),
    "iat-future": _with_token(lambda ctx: token_with(ctx, iat=ctx.now + 3600)),
    "iat-string": _with_token(lambda ctx: token_with(ctx, iat="yesterday")),
    "iss-wrong": _with_token(lambda ctx: token_with(ctx, iss="someone-else")),
    "iss-missing": _with_token(lambda ctx: token_with(ctx, iss=DELETE)),
    "iss-case": _with_token(lambda ctx: token_with(ctx, iss=devauth.ISSUER.upper())),
    "aud-wrong": _with_token(lambda ctx: token_with(ctx, aud="another-api")),
    "aud-missing": _with_token(lambda ctx: token_with(ctx, aud=DELETE)),
    "aud-list-without-us": _with_token(lambda ctx: token_with(ctx, aud=["another-api"])),
    "sub-missing": _with_token(lambda ctx: token_with(ctx, sub=DELETE)),
    "sub-empty": _with_token(lambda ctx: token_with(ctx, sub="")),
    "sub-number": _with_token(lambda ctx: token_with(ctx, sub=7)),
    "alg-none-unsigned": _with_token(
        lambda ctx: _b64(ALG_NONE) + "." + _b64(json.dumps(claims(ctx)).encode()) + "."
    ),
    "alg-none-signed": _with_token(
        lambda ctx: raw_token(ctx, json.dumps(claims(ctx)).encode(), b'{"alg":"none"}')
    ),
    "alg-hs512": _with_token(
        lambda ctx: sign(
            ctx.secret,
            b'{"alg":"HS512","typ":"JWT"}',
            json.dumps(claims(ctx)).encode(),
            alg="sha512",
        )
    ),
    "alg-missing": _with_token(lambda ctx: token_with(ctx, {"typ": "JWT"})),
    "alg-lowercase": _with_token(lambda ctx: token_with(ctx, {"alg": "hs256"})),
    "alg-rs256": _with_token(lambda ctx: token_with(ctx, {"alg": "RS256"})),
    "kid-header": _with_token(lambda ctx: token_with(ctx, {"alg": "HS256", "kid": "../../x"})),
    "jwk-header": _with_token(
        lambda ctx: sign(
            b"attacker",
            json.dumps({"alg": "HS256", "jwk": {"kty": "oct", "k": _b64(b"attacker")}}).encode(),
            json.dumps(claims(ctx)).encode(),
        )
    ),
    "jku-header": _with_token(
        lambda ctx: token_with(ctx, {"alg": "HS256", "jku": "http://127.0.0.1:9/keys"})
    ),
    "crit-header": _with_token(lambda ctx: token_with(ctx, {"alg": "HS256", "crit": ["exp"]})),
    "typ-other": _with_token(lambda ctx: token_with(ctx, {"alg": "HS256", "typ": "JWE"})),
    "header-array": _with_token(lambda ctx: sign(ctx.secret, b'["HS256"]', b"{}")),
    "wrong-secret": _with_token(lambda ctx: devauth.sign(b"not-the-secret", claims(ctx))),
    "tampered-scope": _with_token(
        lambda ctx: ".".join(
            [
                devauth.mint(ctx.secret, "service", "local-app").split(".")[0],
                _b64(json.dumps(claims(ctx)).encode()),
                devauth.mint(ctx.secret, "service", "local-app").split(".")[2],
            ]
        )
    ),
    "signature-truncated": _with_token(lambda ctx: ctx.admin[:-4]),
    "signature-empty": _with_token(lambda ctx: ctx.admin.rsplit(".", 1)[0] + "."),
    "one-segment": _with_token(lambda ctx: ctx.admin.replace(".", "")),
    "two-segments": _with_token(lambda ctx: ctx.admin.rsplit(".", 1)[0]),
    "four-segments": _with_token(lambda ctx: ctx.admin + ".e30"),
    "bad-base64": _with_token(lambda ctx: ctx.admin.split(".")[0] + ".e30!!!." + "x" * 43),
    "padded-base64": _with_token(
        lambda ctx: ".".join(p + "=" * (-len(p) % 4 or 4) for p in ctx.admin.split("."))
    ),
    "base64-with-junk": _with_token(
        lambda ctx: ".".join(
            [ctx.admin.split(".")[0], "*" + ctx.admin.split(".")[1], ctx.admin.split(".")[2]]
        )
    ),
    "payload-not-json": _with_token(lambda ctx: raw_token(ctx, b"not json at all")),
    "payload-array": _with_token(lambda ctx: raw_token(ctx, json.dumps([claims(ctx)]).encode())),
    "payload-string": _with_token(lambda ctx: raw_token(ctx, b'"admin"')),
    "payload-null": _with_token(lambda ctx: raw_token(ctx, b"null")),
    # 3,000 levels: deeper than the JSON parser's recursion, within the header limit
    "payload-deep": _with_token(lambda ctx: raw_token(ctx, b"[" * 3000 + b"]" * 3000)),
    "payload-not-utf8": _with_token(lambda ctx: raw_token(ctx, b'{"sub": "\xff"}')),
    "payload-nan-literal": _with_token(lambda ctx: raw_token(ctx, b'{"exp": NaN}')),
    "token-with-space": _with_token(lambda ctx: ctx.admin[:20] + " " + ctx.admin[20:]),
    "token-non-ascii": lambda route, ctx: (
        head(route, None, length=len(valid_body(route))).replace(
            b"Connection:", b"Authorization: Bearer \xe9\xe9.\xe9.\xe9\r\nConnection:"
        )
        + valid_body(route)
    ),
}


def _transport_cases(route: Route) -> list[tuple[str, Callable[[Context], bytes], int, bool]]:
    """(name, build, status, half_close) for one route; the token is the admin's, so only
    the transport is wrong."""
    body = valid_body(route) or b"{}"
    r = route
    cases: list[tuple[str, Callable[[Context], bytes], int, bool]] = []

    def add(name: str, build: Callable[[Context], bytes], status: int, half: bool = False) -> None:
        cases.append((name, build, status, half))

    for name, value in [
        ("cl-alpha", "abc"),
        ("cl-negative", "-1"),
        ("cl-plus-sign", f"+{len(body)}"),
        ("cl-inner-space", f"{len(body)} 0"),
        ("cl-hex", f"0x{len(body):x}"),
        ("cl-decimal-point", f"{len(body)}.0"),
        ("cl-empty", ""),
        ("cl-list-disagrees", f"{len(body)}, {len(body) + 1}"),
        ("cl-unicode-digits", "\u0662"),
    ]:
        add(
            name,
            lambda ctx, v=value: head(r, ctx.admin, length=v) + body,
            400,
        )
    add(
        "cl-twice-disagrees",
        lambda ctx: (
            head(r, ctx.admin, length=len(body), extra=(f"Content-Length: {len(body) + 3}",)) + body
        ),
        400,
    )
    add("cl-over-limit", lambda ctx: head(r, ctx.admin, length=MAX_BODY_BYTES + 1), 413)
    add("cl-5000-digits", lambda ctx: head(r, ctx.admin, length=BIG_INT), 413)
    add("cl-longer-than-body-stall", lambda ctx: head(r, ctx.admin, length=500) + body, 408)
    add("cl-longer-than-body-eof", lambda ctx: head(r, ctx.admin, length=500) + body, 400, True)
    add(
        "te-chunked",
        lambda ctx: (
            head(r, ctx.admin, extra=("Transfer-Encoding: chunked",))
            + f"{len(body):x}\r\n".encode()
            + body
            + b"\r\n0\r\n\r\n"
        ),
        411,
    )
    add(
        "te-and-cl",
        lambda ctx: (
            head(r, ctx.admin, length=len(body), extra=("Transfer-Encoding: chunked",)) + body
        ),
        400,
    )
    add(
        "te-gzip",
        lambda ctx: head(r, ctx.admin, extra=("Transfer-Encoding: gzip, chunked",)) + body,
        411,
    )
    if r.method in ("POST", "PUT", "PATCH"):
        add("cl-missing", lambda ctx: head(r, ctx.admin) + body, 411)
    target = r.path.encode()
    method = r.method.encode()
    long_path = target + b"?" + b"x" * MAX_REQUEST_LINE_BYTES
    add(
        "line-too-long",
        lambda ctx: request(r, ctx.admin, line=method + b" " + long_path + b" HTTP/1.1"),
        414,
    )
    add(
        "header-too-long",
        lambda ctx: request(r, ctx.admin, extra=("X-Padding: " + "p" * MAX_HEADER_BYTES,)),
        431,
    )
    add(
        "headers-too-large-together",
        lambda ctx: request(r, ctx.admin, extra=tuple(f"X-P{i}: {'p' * 400}" for i in range(60))),
        431,
    )
    add(
        "too-many-headers",
        lambda ctx: request(
            r, ctx.admin, extra=tuple(f"X-H{i}: 1" for i in range(MAX_HEADERS + 1))
        ),
        431,
    )
    for name, line in [
        ("http-0.9", method + b" " + target),
        ("http-2.0", method + b" " + target + b" HTTP/2.0"),
        ("http-1.2", method + b" " + target + b" HTTP/1.2"),
        ("version-lowercase", method + b" " + target + b" http/1.1"),
        ("version-garbage", method + b" " + target + b" HTTP/1.1x"),
        ("no-version-trailing-space", method + b" " + target + b" "),
        ("double-space", method + b"  " + target + b" HTTP/1.1"),
        ("tab-separator", method + b"\t" + target + b" HTTP/1.1"),
        ("absolute-target", method + b" http://127.0.0.1" + target + b" HTTP/1.1"),
        ("asterisk-target", method + b" *" + target + b" HTTP/1.1"),
        ("relative-target", method + b" " + target[1:] + b" HTTP/1.1"),
        ("non-ascii-target", method + b" " + target + b"\xc3\xa9 HTTP/1.1"),
        ("nul-in-target", method + b" " + target + b"\x00 HTTP/1.1"),
        ("method-with-at", method[:1] + b"@" + method[1:] + b" " + target + b" HTTP/1.1"),
        ("lowercase-and-junk-line", b"\x16\x03\x01" + method.lower() + b" " + target),
    ]:
        add(name, lambda ctx, ln=line: request(r, ctx.admin, line=ln), 400)
    for name, extra in [
        ("header-without-colon", "X-Broken header"),
        ("space-before-colon", "X-Spaced : 1"),
        ("empty-header-name", ": nameless"),
        ("folded-header", "X-Fold: a\r\n b"),
        ("control-char-in-value", "X-Ctl: a\x01b"),
        ("nul-in-value", "X-Nul: a\x00b"),
        ("cr-in-value", "X-Cr: a\rb"),
        ("two-hosts", "Host: elsewhere"),
    ]:
        add(name, lambda ctx, x=extra: request(r, ctx.admin, extra=(x,)), 400)
    add("missing-host", lambda ctx: request(r, ctx.admin, host=False), 400)
    add(
        "stall-after-request-line",
        lambda ctx: f"{r.method} {r.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode(),
        408,
    )
    add("stall-mid-request-line", lambda ctx: f"{r.method} {r.path}".encode(), 408)
    add(
        "eof-mid-headers",
        lambda ctx: f"{r.method} {r.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode(),
        400,
        True,
    )
    add("eof-mid-request-line", lambda ctx: f"{r.method} {r.path}".encode(), 400, True)
    return cases


def _body_cases(route: Route) -> list[tuple[str, bytes, int | None]]:
    """(name, body, status) for a route that takes a body; admin token, good framing."""
    assert route.body is not None and route.with_text is not None
    valid = route.body
    first = next(iter(valid))
    text = route.with_text
    return [
        ("deep-array", b"[" * DEEP + b"]" * DEEP, None),
        ("deep-object", b'{"a":' * DEEP + b"1" + b"}" * DEEP, None),
        (
            "deep-in-field",
            json.dumps(valid)
            .replace(json.dumps(valid[first]), "[" * DEEP + "]" * DEEP, 1)
            .encode(),
            None,
        ),
        ("int-5000-digits", BIG_INT.encode(), None),
        (
            "int-5000-digits-in-field",
            json.dumps(valid).replace(json.dumps(valid[first]), BIG_INT, 1).encode(),
            None,
        ),
        ("nan-in-field", json.dumps({**valid, first: float("nan")}).encode(), None),
        ("infinity-in-field", json.dumps({**valid, first: float("inf")}).encode(), None),
        ("minus-infinity-in-field", json.dumps({**valid, first: float("-inf")}).encode(), None),
        ("nan-top-level", b"NaN", None),
        (
            "invalid-utf8",
            json.dumps(text("Ada@MARK@")).encode().replace(b"@MARK@", b"\xff\xfe"),
            None,
        ),
        (
            "overlong-utf8",
            json.dumps(text("Ada@MARK@")).encode().replace(b"@MARK@", b"\xc0\xaf"),
            None,
        ),
        (
            "lone-surrogate-escape",
            json.dumps(text("Ada@MARK@")).encode().replace(b"@MARK@", b"\\ud800"),
            None,
        ),
        ("nul-escape", json.dumps(text("Ada\u0000Lovelace")).encode(), None),
        ("array-of-valid", json.dumps([valid]).encode(), None),
        ("array-of-two-valid", json.dumps([valid, valid]).encode(), None),
        ("top-level-string", json.dumps(json.dumps(valid)).encode(), None),
        ("top-level-number", b"1", None),
        ("top-level-null", b"null", None),
        ("top-level-true", b"true", None),
        ("unknown-field", json.dumps({**valid, "favourite_colour": "teal"}).encode(), None),
        ("wrong-type-list", json.dumps({**valid, first: [valid[first]]}).encode(), None),
        ("wrong-type-object", json.dumps({**valid, first: {"v": valid[first]}}).encode(), None),
        ("truncated-json", json.dumps(valid).encode()[:-1], None),
        ("trailing-garbage-json", json.dumps(valid).encode() + b" x", None),
        ("utf16-body", json.dumps(valid).encode("utf-16"), None),
        ("over-limit", json.dumps(text("x" * (MAX_BODY_BYTES + 1))).encode(), 413),
        ("text-plain", b"plain text", 415),
    ]


def build_corpus() -> list[Case]:
    corpus: list[Case] = []
    for route in ROUTES:
        for name, build, status, half in _transport_cases(route):
            corpus.append(Case(f"{route.name}/transport/{name}", build, status, half))
        for name, make in TOKEN_CASES.items():
            corpus.append(
                Case(f"{route.name}/token/{name}", lambda ctx, r=route, m=make: m(r, ctx), 401)
            )
        if route.body is not None:
            for name, data, status in _body_cases(route):
                build_body = (
                    (
                        lambda ctx, r=route, d=data: (
                            head(r, ctx.admin, length=len(d)).replace(
                                b"application/json", b"text/plain"
                            )
                            + d
                        )
                    )
                    if name == "text-plain"
                    else (lambda ctx, r=route, d=data: request(r, ctx.admin, d))
                )
                corpus.append(Case(f"{route.name}/body/{name}", build_body, status))
    corpus.append(Case("any/transport/silent-client", lambda ctx: b"", 408))
    corpus.append(
        Case(
            "any/transport/tls-client-hello",
            lambda ctx: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
            408,
        )
    )
    corpus.append(
        Case(
            "any/transport/tls-client-hello-eof",
            lambda ctx: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
            400,
            True,
        )
    )
    corpus.append(Case("any/transport/blank-line", lambda ctx: b"\r\n\r\n", 400))
    corpus.append(Case("any/transport/binary-garbage", lambda ctx: bytes(range(256)) + b"\n", 400))
    return corpus


CORPUS = build_corpus()


# --- a raw-socket client -----------------------------------------------------------------


@dataclass
class Answer:
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    problem: str | None = None  # a hang, a reset, no or a truncated reply
    elapsed_s: float = 0.0

    def json(self) -> Any:
        return json.loads(self.body)


STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?")


def exchange(port: int, data: bytes, *, half_close: bool = False) -> Answer:
    """Sends the bytes, then reads until the server closes (CLIENT_TIMEOUT_S at most)."""
    answer = Answer()
    started = time.monotonic()
    raw = b""
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_S) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server answered early and stopped reading: its answer is still there
        deadline = started + CLIENT_TIMEOUT_S
        try:
            while True:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                raw += chunk
        except TimeoutError:
            answer.problem = f"hang: no end of the reply in {CLIENT_TIMEOUT_S:g}s"
        except OSError as exc:
            answer.problem = f"connection dropped: {exc!r}"
    answer.elapsed_s = time.monotonic() - started
    head_bytes, sep, body = raw.partition(b"\r\n\r\n")
    lines = head_bytes.split(b"\r\n")
    match = STATUS_LINE.fullmatch(lines[0]) if sep else None
    if match is None:
        answer.problem = answer.problem or f"no HTTP reply: {raw[:80]!r}"
        return answer
    answer.status = int(match.group(1))
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        answer.headers[name.strip().lower()] = value.strip()
    answer.body = body
    if answer.headers.get("content-length") != str(len(body)):
        answer.problem = answer.problem or "the body does not match its Content-Length"
    return answer


def assert_error_shape(answer: Answer, status: int | None) -> None:
    assert answer.problem is None, answer
    assert answer.status is not None and 400 <= answer.status < 500, answer
    if status is not None:
        assert answer.status == status, answer
    assert answer.headers.get("content-type", "").startswith("application/json"), answer
    body = answer.json()
    assert isinstance(body, dict), answer
    assert isinstance(body.get("error"), str) and body["error"], answer
    assert isinstance(body.get("message"), str) and body["message"], answer


# --- the server and its database ---------------------------------------------------------


@dataclass
class Hostile:
    server: Server
    url: str  # its database
    port: int
    ctx: Context
    before: bytes = b""
    answers: dict[str, Answer] = field(default_factory=dict)


def table_contents(url: str) -> bytes:
    """Every row of every table a request, the worker or the queue writes, in a fixed order."""
    parts = []
    with psycopg.connect(url) as conn:
        for table in SNAPSHOT_TABLES:
            query = sql.SQL("SELECT to_jsonb(t)::text FROM {} AS t ORDER BY 1").format(
                sql.Identifier(table)
            )
            rows = [row[0] for row in conn.execute(query).fetchall()]
            parts.append(f"-- {table} ({len(rows)})\n" + "\n".join(rows))
    return "\n".join(parts).encode()


@pytest.fixture(scope="module")
def hostile(pg_server_uri: str, template_db: str) -> Iterator[Hostile]:
    name = f"mm_hostile_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server_uri, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template_db)
            )
        )
    url = database_uri(pg_server_uri, name)
    workdir = Path(tempfile.mkdtemp(prefix="matchmaker-hostile-"))
    env = {**os.environ, "DATABASE_URL": url, "MATCHMAKER_API_WORKERS": "2"}
    server = launch(env, workdir, "--read-timeout-seconds", str(READ_TIMEOUT_S))
    try:
        secret = devauth.load_secret(devauth.default_secret_path(server.env))
        ctx = Context(secret, server.admin)
        port = int(server.url.rsplit(":", 1)[1])
        yield Hostile(server, url, port, ctx)
    finally:
        stop(server)
        with psycopg.connect(pg_server_uri, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        shutil.rmtree(workdir, ignore_errors=True)


def seed(server: Server) -> None:
    """An event with three matched attendees: the corpus aims at real rows."""
    reply = call(server, "POST", "/events", server.service, {"code": EVENT, "name": "Hostile"})
    assert reply.status == 201, reply.text
    for user_id in USERS:
        body = {"name": user_id, "interests": ["AI", "sailing"], "company": user_id}
        path = f"/events/{EVENT}/attendees/{user_id}"
        assert call(server, "PUT", path, server.service, body).status == 200
    reply = call(
        server, "POST", f"/events/{EVENT}/matchmaking", server.service, {"useQueue": False}
    )
    assert reply.status == 200, reply.text
    wait_drained(server, EVENT)


def stable_contents(url: str) -> bytes:
    """The tables once two reads a scheduler tick apart agree (a run may be finishing)."""
    previous = table_contents(url)
    for _ in range(20):
        time.sleep(1.5)
        current = table_contents(url)
        if current == previous:
            return current
        previous = current
    pytest.fail("the database kept changing with nothing queued")


@pytest.fixture(scope="module")
def corpus_answers(hostile: Hostile) -> Hostile:
    """Seeds, takes the snapshot, then sends the whole corpus (8 at a time)."""
    seed(hostile.server)
    hostile.before = stable_contents(hostile.url)
    requests = {case.id: (case.build(hostile.ctx), case.half_close) for case in CORPUS}
    with ThreadPoolExecutor(8) as pool:
        futures = {
            case_id: pool.submit(exchange, hostile.port, data, half_close=half)
            for case_id, (data, half) in requests.items()
        }
        hostile.answers = {case_id: future.result() for case_id, future in futures.items()}
    return hostile


# --- the corpus ---------------------------------------------------------------------------


def test_corpus_is_large_and_distinct(hostile: Hostile) -> None:
    assert len({case.id for case in CORPUS}) == len(CORPUS)
    distinct = {(case.build(hostile.ctx), case.half_close) for case in CORPUS}
    assert len(distinct) >= 300, len(distinct)
    assert len(distinct) == len(CORPUS)  # no case is another under a second name
    routes = {case.id.split("/")[0] for case in CORPUS}
    assert routes >= {route.name for route in ROUTES}


@pytest.mark.parametrize("case", CORPUS, ids=[case.id for case in CORPUS])
def test_hostile_request_gets_a_json_4xx(case: Case, corpus_answers: Hostile) -> None:
    answer = corpus_answers.answers[case.id]
    assert_error_shape(answer, case.status)
    if case.status == 408:  # after the read timeout, not the old minute
        assert answer.elapsed_s < READ_TIMEOUT_S + 5, answer


def test_corpus_wrote_nothing(corpus_answers: Hostile) -> None:
    after = stable_contents(corpus_answers.url)
    assert after == corpus_answers.before


# --- framing details ----------------------------------------------------------------------


def test_bytes_after_the_body_are_not_a_second_request(hostile: Hostile) -> None:
    route = Route("admin-status", "GET", f"/admin/events/{EVENT}/status")
    trailing = request(route, hostile.ctx.admin) + b"DELETE /events HTTP/1.1\r\n\r\ngarbage"
    answer = exchange(hostile.port, trailing)
    assert answer.problem is None and answer.status == 200, answer
    assert answer.json()["event"] == EVENT
    assert answer.body.count(b"HTTP/1.") == 0  # one reply, then the connection closed


def test_accepted_authorization_forms(hostile: Hostile) -> None:
    """API Gateway takes the token alone or after `Bearer `; the scheme is case-insensitive
    (RFC 9110), so `bearer` and `BEARER` work too."""
    route = Route("admin-status", "GET", f"/admin/events/{EVENT}/status")
    for value in (
        f"Bearer {hostile.ctx.admin}",
        f"bearer {hostile.ctx.admin}",
        f"BEARER {hostile.ctx.admin}",
        hostile.ctx.admin,
    ):
        data = head(route, None, length=0, extra=(f"Authorization: {value}",))
        answer = exchange(hostile.port, data)
        assert answer.status == 200, (value[:10], answer)


def test_identical_content_lengths_and_utf8_text_are_accepted(hostile: Hostile) -> None:
    """A Content-Length list of one value (RFC 9112 allows it) and non-ASCII UTF-8 text:
    accepted as sent (the server frames, the function decides)."""
    route = Route("put", "PUT", f"/events/{EVENT}/attendees/hst-c")
    body = json.dumps({"name": "Zoë Ørsted", "interests": ["AI"]}, ensure_ascii=False).encode()
    data = head(route, hostile.ctx.admin, length=f"{len(body)}, {len(body)}") + body
    answer = exchange(hostile.port, data)
    assert answer.status == 200, answer
    assert answer.json()["status"] == "updated"
    again = exchange(hostile.port, data)
    assert again.status == 200 and again.json()["status"] == "unchanged", again


def test_server_limits_match_the_api() -> None:
    import handlers.api  # noqa: PLC0415

    assert handlers.api.MAX_BODY_BYTES == MAX_BODY_BYTES


# --- in-process: slow clients against short limits ------------------------------------------


@pytest.fixture
def quick_server() -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """The gateway alone, with a recording function and short timeouts."""
    seen: list[dict[str, Any]] = []

    def invoke(event: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        seen.append(event)
        return {
            "statusCode": 200,
            "headers": {"Content-Type": "application/json"},
            "body": "{}",
        }, False

    gateway = Gateway(b"secret", invoke, lambda: None, MAX_BODY_BYTES)
    server = LocalHTTPServer(
        ("127.0.0.1", 0), 4, gateway, read_timeout_s=0.5, request_timeout_s=1.5
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


def test_a_trickling_client_meets_the_request_deadline(quick_server: tuple[int, list[Any]]) -> None:
    port, seen = quick_server
    token = devauth.mint(b"secret", "admin", "a")
    data = f"GET /events/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    started = time.monotonic()
    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for byte in data[:-2]:  # never the final blank line
            sock.sendall(bytes([byte]))
            # a pause under the read timeout, so only the whole-request deadline stops it
            readable, _, _ = select.select([sock], [], [], 0.3)
            if readable or time.monotonic() - started > 5:
                break
        answered = time.monotonic()
        while chunk := sock.recv(4096):
            reply += chunk
    elapsed = answered - started
    assert reply.startswith(b"HTTP/1.0 408 "), reply
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"] == "request_timeout"
    assert 1.4 < elapsed < 3.0, elapsed
    assert seen == []


def test_valid_and_non_utf8_bodies_reach_the_function_as_sent(
    quick_server: tuple[int, list[dict[str, Any]]],
) -> None:
    port, seen = quick_server
    token = devauth.mint(b"secret", "admin", "a")
    route = Route("x", "POST", "/events")
    for body in (b'{"name": "Zo\xc3\xab"}', b'{"name": "\xff"}'):
        answer = exchange(port, head(route, token, length=len(body)) + body)
        assert answer.status == 200, answer
    text, binary = seen
    assert (text["body"], text["isBase64Encoded"]) == ('{"name": "Zoë"}', False)
    assert base64.b64decode(binary["body"]) == b'{"name": "\xff"}' and binary["isBase64Encoded"]
    assert text["requestContext"]["authorizer"]["jwt"]["claims"]["sub"] == "a"


# --- tokens: the verifier's rules directly ---------------------------------------------------


def test_token_clock_rules_with_leeway() -> None:
    secret, now = b"s", 1_800_000_000
    leeway = devauth.LEEWAY_S
    ok = {"iss": devauth.ISSUER, "aud": devauth.AUDIENCE, "sub": "u", "exp": now + 60}

    def verdict(**claims_: Any) -> bool:
        try:
            devauth.verify(secret, devauth.sign(secret, {**ok, **claims_}), now=now)
        except devauth.TokenError:
            return False
        return True

    assert verdict()
    assert verdict(exp=now - leeway + 1) and not verdict(exp=now - leeway)
    assert verdict(nbf=now + leeway) and not verdict(nbf=now + leeway + 1)
    assert verdict(iat=now + leeway) and not verdict(iat=now + leeway + 1)
    assert verdict(exp=now + 60.5, nbf=now - 0.5)  # NumericDate may be fractional
    assert not verdict(exp=str(now + 60)) and not verdict(nbf=True) and not verdict(iat=None)
    assert verdict(aud=["other", devauth.AUDIENCE]) and not verdict(aud=["other"])


def test_minted_tokens_verify_and_carry_their_role(tmp_path: Path) -> None:
    secret = devauth.load_secret(tmp_path / "dev-token-secret")
    assert devauth.load_secret(tmp_path / "dev-token-secret") == secret  # kept, not renewed
    assert (tmp_path / "dev-token-secret").stat().st_mode & 0o777 == 0o600
    for role, scope in devauth.ROLE_SCOPES.items():
        claims_ = devauth.verify(secret, devauth.mint(secret, role, f"{role}-sub"))
        assert claims_["scope"] == scope and claims_["sub"] == f"{role}-sub"
        assert claims_["iss"] == devauth.ISSUER and claims_["aud"] == devauth.AUDIENCE
    with pytest.raises(devauth.TokenError):
        devauth.verify(secret, devauth.mint(secret, "admin", "x", ttl_s=-3600))
    hs = hashlib.sha256  # the signature is HMAC-SHA256 over header.payload
    token = devauth.mint(secret, "service", "s")
    signing_input, _, signature = token.rpartition(".")
    expected = hmac.new(secret, signing_input.encode(), hs).digest()
    assert base64.urlsafe_b64encode(expected).rstrip(b"=").decode() == signature


# --- the authorization matrix (writes: keep after the snapshot check) -------------------------

MX_EVENT = "mx-event"
ROLES = (
    "admin",
    "service",
    "attendee-self",
    "attendee-other",
    "admin-unknown-event",
    "expired",
    "wrong-audience",
    "wrong-issuer",
    "future-nbf",
    "no-token",
)
VALID_ROLES = ROLES[:5]
#: route -> expected status per valid role (admin, service, self, other, unknown event);
#: None: not asked. Every other role is 401 on every route. Run top to bottom.
MATRIX: list[tuple[str, str, str, dict[str, Any] | None, tuple[int | None, ...]]] = [
    ("create-event", "POST", "/events", {}, (201, 201, 403, 403, None)),
    ("get-event", "GET", "/events/{code}", None, (200, 200, 403, 403, 404)),
    (
        "put-attendee",
        "PUT",
        "/events/{code}/attendees/{user}",
        {"name": "X"},
        (200, 200, 403, 403, 404),
    ),
    (
        "get-matches",
        "GET",
        "/events/{code}/attendees/{user}/matches",
        None,
        (200, 200, 200, 403, 404),
    ),
    (
        "dismiss",
        "POST",
        "/events/{code}/attendees/{user}/dismissals",
        {"dismissed_user_id": "mx-p1"},
        (204, 204, 204, 403, 404),
    ),
    ("trigger", "POST", "/events/{code}/matchmaking", {}, (202, 202, 403, 403, 404)),
    ("admin-start", "POST", "/admin/events/{code}/matching", {}, (202, 403, 403, 403, 404)),
    ("admin-status", "GET", "/admin/events/{code}/status", None, (200, 403, 403, 403, 404)),
    ("admin-pause", "POST", "/admin/events/{code}/pause", None, (204, 403, 403, 403, 404)),
    ("admin-resume", "POST", "/admin/events/{code}/resume", None, (204, 403, 403, 403, 404)),
    (
        "admin-settings",
        "PATCH",
        "/admin/events/{code}/settings",
        {"k": 4},
        (200, 403, 403, 403, 404),
    ),
    (
        "admin-dead-letters",
        "GET",
        "/admin/events/{code}/dead-letters",
        None,
        (200, 403, 403, 403, 404),
    ),
    (
        "admin-redrive",
        "POST",
        "/admin/events/{code}/dead-letters/redrive",
        None,
        (200, 403, 403, 403, 404),
    ),
    (
        "seed-trigger",
        "POST",
        "/trigger-matchmaking",
        {"eventCode": "{code}"},
        (202, 202, 403, 403, 404),
    ),
    (
        "seed-admin-start",
        "POST",
        "/admin-start-matching",
        {"eventCode": "{code}"},
        (202, 403, 403, 403, 404),
    ),
    (
        "remove-attendee",
        "DELETE",
        "/events/{code}/attendees/{user}",
        None,
        (204, 204, 403, 403, 404),
    ),
]


def _role_token(ctx: Context, role: str) -> str | None:
    admin = devauth.ROLE_SCOPES["admin"]
    return {
        "admin": devauth.mint(ctx.secret, "admin", "local-admin"),
        "service": devauth.mint(ctx.secret, "service", "local-app"),
        "attendee-self": devauth.mint(ctx.secret, "attendee", "mx-self"),
        "attendee-other": devauth.mint(ctx.secret, "attendee", "mx-other"),
        "admin-unknown-event": devauth.mint(ctx.secret, "admin", "local-admin"),
        "expired": token_with(ctx, exp=int(time.time()) - 3600, scope=admin),
        "wrong-audience": token_with(ctx, aud="another-api", scope=admin),
        "wrong-issuer": token_with(ctx, iss="someone-else", scope=admin),
        "future-nbf": token_with(ctx, nbf=int(time.time()) + 3600, scope=admin),
        "no-token": None,
    }[role]


def test_corpus_and_matrix_cover_every_route_of_the_api() -> None:
    """A route added to the API without hostile cases or a row in the matrix fails here."""
    openapi = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
    document = json.loads(openapi.read_text())
    documented = {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }

    def template(path: str) -> str:
        for value, name in ((EVENT, "{code}"), ("hst-new", "{user_id}"), ("hst-a", "{user_id}")):
            path = path.replace(value, name)
        return path

    assert {(r.method, template(r.path)) for r in ROUTES} == documented
    matrix = {(m, t.replace("{user}", "{user_id}")) for _, m, t, _, _ in MATRIX}
    assert matrix == documented


def test_authorization_matrix(hostile: Hostile) -> None:
    server = hostile.server
    assert call(server, "POST", "/events", server.service, {"code": MX_EVENT}).status in (200, 201)
    for user_id in ("mx-self", "mx-other", "mx-p1"):
        path = f"/events/{MX_EVENT}/attendees/{user_id}"
        assert call(server, "PUT", path, server.service, {"name": user_id}).status == 200
    users = {"admin": "mx-admin-u", "service": "mx-service-u"}  # created by their own PUT
    expected: dict[tuple[str, str], int | None] = {}
    actual: dict[tuple[str, str], int | None] = {}
    for role in ROLES:
        token = _role_token(hostile.ctx, role)
        code = "mx-nope" if role == "admin-unknown-event" else MX_EVENT
        user = users.get(role, "mx-self")
        for name, method, template, body, statuses in MATRIX:
            status = statuses[VALID_ROLES.index(role)] if role in VALID_ROLES else 401
            if status is None:
                continue
            payload = body
            if name == "create-event":
                payload = {"code": f"mx-new-{role}"}
            if name == "dismiss" and role == "attendee-self":
                payload = {"dismissed_user_id": "mx-p1"}
            if payload is not None and payload.get("eventCode") == "{code}":
                payload = {"eventCode": code}  # the seed routes name the event in the body
            path = template.format(code=code, user=user)
            expected[(name, role)] = status
            actual[(name, role)] = call(server, method, path, token, payload).status
    assert actual == expected

"""`matchmaker serve`: the whole stack on a laptop, without Docker.

Each HTTP request becomes the API Gateway HTTP API (payload 2.0) event the real API
would send to the same handler, with the JWT authorizer's claims taken from a verified
development token; the matchmaker handler runs every few seconds (the schedule) and at
once when a write sends a wake: the API workers send it to the wake queue on moto's
threaded SQS server, and a consumer hands the batch to the handler as Lambda's event source
mapping does (one run at a time; wakes arriving during a run join the next one).
PostgreSQL is the embedded one unless DATABASE_URL is set. Listens on 127.0.0.1 unless
told otherwise.

Requests are served concurrently the way Lambda scales the API: by containers. Each of
MATCHMAKER_API_WORKERS worker processes (default 8) is one warm API container with its own
database connection, handling one request at a time, exactly as in AWS. They are processes,
not threads, because the handler's per-request state is process-wide (Powertools keeps the
current event on the resolver class), so two threads in one process would see each other's
callers. A bounded pool of HTTP threads reads requests and waits for the workers.

In front of the workers stands what API Gateway does before the function runs
(GatewayHandler): strict HTTP/1.x parsing under size limits and timeouts (the MAX_* and
*_TIMEOUT_S constants), the JWT check (tooling.dev_tokens) and the 256 KiB body limit. Every
answer it makes itself has the API's error shape, {"error": code, "message": what to fix},
with a 4xx status; each connection carries one request.
"""

from __future__ import annotations

import base64
import functools
import io
import ipaddress
import json
import logging
import multiprocessing
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from core import aws
from core.api.request_body import MAX_BODY_BYTES
from core.data.connections import DatabaseUnavailableError, embedded_server_uri
from core.observability import logger
from core.settings import Settings, get_settings
from tooling import dev_tokens as devauth

API_TIMEOUT_MS = 29_000  # the API function's timeout
HTTP_THREADS_PER_WORKER = 4  # threads reading requests and writing replies per worker
WORKER_START_TIMEOUT_S = 60.0
# Transport limits. A client that breaks one gets a JSON 4xx and the connection is closed.
MAX_REQUEST_LINE_BYTES = 8 * 1024  # 414 above (the line with its CRLF)
MAX_HEADER_BYTES = 16 * 1024  # 431 above: every header line together
MAX_HEADERS = 100  # 431 above
READ_TIMEOUT_S = 5.0  # 408 when a started request sends nothing for this long
REQUEST_TIMEOUT_S = 20.0  # 408 when the whole request has not arrived by then (slow clients)
LINGER_S = 2.0  # after the reply, unread input is drained this long so no RST eats the reply
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # these need a Content-Length (else 411)
# The wake queue's event source mapping (template.yaml: WakeBatchingWindowSeconds,
# WakeBatchSize): wait this long after a first wake for more, hand over at most this many.
WAKE_BATCHING_WINDOW_S = 1.0
WAKE_BATCH_SIZE = 100
WAKE_POLL_S = 1  # SQS long poll of the consumer


@dataclass
class FakeContext:
    """The parts of a Lambda context the handlers read."""

    function_name: str
    remaining_ms: int
    memory_limit_in_mb: int = 1024
    invoked_function_arn: str = "arn:aws:lambda:local:000000000000:function:matchmaker"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started: float = field(default_factory=time.monotonic)

    def get_remaining_time_in_millis(self) -> int:
        return max(0, self.remaining_ms - int((time.monotonic() - self.started) * 1000))


def api_event(
    method: str,
    target: str,
    *,
    headers: dict[str, str],
    body: bytes | None,
    claims: dict[str, str] | None,
    source_ip: str,
) -> dict[str, Any]:
    """What API Gateway's HTTP API hands the Lambda (payload format 2.0)."""
    parts = urlsplit(target)
    now = datetime.now(UTC)
    context: dict[str, Any] = {
        "accountId": "000000000000",
        "apiId": "local",
        "domainName": headers.get("host", ""),
        "domainPrefix": "local",
        "http": {
            "method": method,
            "path": parts.path,
            "protocol": "HTTP/1.1",
            "sourceIp": source_ip,
            "userAgent": headers.get("user-agent", ""),
        },
        "requestId": str(uuid.uuid4()),
        "routeKey": "$default",
        "stage": "$default",
        "time": now.strftime("%d/%b/%Y:%H:%M:%S +0000"),
        "timeEpoch": int(now.timestamp() * 1000),
    }
    if claims is not None:
        scopes = claims.get("scope", "").split()
        context["authorizer"] = {"jwt": {"claims": claims, "scopes": scopes or None}}
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": parts.path,
        "rawQueryString": parts.query,
        "headers": headers,
        "requestContext": context,
        **_event_body(body),
    }


def _event_body(body: bytes | None) -> dict[str, Any]:
    """The body untouched: as text when it is UTF-8, else base64 (as API Gateway passes a
    payload it cannot pass as text)."""
    if not body:
        return {"body": None, "isBase64Encoded": False}
    try:
        return {"body": body.decode("utf-8"), "isBase64Encoded": False}
    except UnicodeDecodeError:
        return {"body": base64.b64encode(body).decode(), "isBase64Encoded": True}


# --- inside an API worker process ----------------------------------------------------------

_invoked: list[dict[str, Any]] = []  # async invokes of the matchmaker during this request


def _api_worker_start(environment: dict[str, str]) -> None:
    """Cold start of one API container: its environment, the handler and its connection."""
    # Ctrl-C signals the whole process group; the parent stops the workers in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(environment)
    get_settings.cache_clear()
    import handlers.api  # noqa: PLC0415 - after the environment is set

    aws.local_invoke = _invoked.append  # the parent wakes its scheduler
    try:
        handlers.api.connections.get(get_settings())
    except DatabaseUnavailableError:
        logger.warning("API worker started without a database connection; retrying per request")


def _api_worker_ready() -> int:
    return os.getpid()


def _api_invoke(event: dict[str, Any], timeout_ms: int) -> tuple[dict[str, Any], bool]:
    """One API Lambda invocation; also says whether it asked for a matchmaker run."""
    import handlers.api  # noqa: PLC0415 - imported by _api_worker_start

    _invoked.clear()
    result: dict[str, Any] = handlers.api.lambda_handler(
        event, FakeContext("matchmaker-ApiFunction", timeout_ms)
    )
    return result, bool(_invoked)


class ApiWorkers:
    """A fixed number of API worker processes (one request at a time each), replaced as a
    whole if one of them dies, as Lambda replaces a crashed container."""

    def __init__(self, workers: int, environment: dict[str, str]) -> None:
        self.workers = workers
        self.environment = environment
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers,
            # spawn: a fork of this process would copy the HTTP, moto and scheduler threads
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_api_worker_start,
            initargs=(self.environment,),
        )

    def start(self) -> None:
        """Starts every worker (one task each, submitted at once, spawns all of them) and
        waits until they answer, so a first burst of requests meets warm containers."""
        with self._lock:
            self._pool = pool = self._new_pool()
        ready = [pool.submit(_api_worker_ready) for _ in range(self.workers)]
        for future in ready:
            future.result(timeout=WORKER_START_TIMEOUT_S)

    def invoke(self, event: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        with self._lock:
            pool = self._pool
        if pool is None:
            raise BrokenProcessPool("the API workers are stopped")
        try:
            future = pool.submit(_api_invoke, event, API_TIMEOUT_MS)
            try:
                return future.result(timeout=API_TIMEOUT_MS / 1000 + 5)
            except FutureTimeoutError:
                future.cancel()  # still queued behind busy workers: it never runs
                raise
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:  # the first to notice replaces the pool
                    logger.error("an API worker died; starting new workers")
                    pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = self._new_pool()
            raise

    def stop(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


# --- HTTP ----------------------------------------------------------------------------------


class PooledHTTPServer(HTTPServer):
    """An HTTPServer whose requests run on a fixed pool of threads. (socketserver's
    ThreadingMixIn starts a thread per connection, without bound.) While every thread is
    busy, new connections wait in the listen backlog."""

    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        threads: int,
    ) -> None:
        self._slots = threading.BoundedSemaphore(threads)
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="matchmaker-http")
        self._closing = threading.Event()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        while not self._slots.acquire(timeout=0.5):
            if self._closing.is_set():
                self.shutdown_request(request)
                return
        try:
            self._threads.submit(self._process, request, client_address)
        except RuntimeError:  # the pool is shutting down
            self._slots.release()
            self.shutdown_request(request)

    def _process(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):  # the client went away
            logger.info("client %s disconnected before the reply", client_address)
        else:
            logger.exception("request from %s failed", client_address)

    def shutdown(self) -> None:
        self._closing.set()
        super().shutdown()

    def server_close(self) -> None:
        super().server_close()
        self._threads.shutdown(wait=True)


# --- the front door: what API Gateway does before the function runs -------------------------

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token (methods, field names)
_TARGET = re.compile(r"/[\x21-\x7e]*")  # origin-form: a path (and query), visible ASCII only
_FIELD_VALUE_FORBIDDEN = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # controls other than HTAB
_DIGITS = re.compile(r"[0-9]+")
_MAX_LENGTH_DIGITS = 15  # a longer Content-Length is over any limit (and int() of it is slow)


class HttpError(Exception):
    """A request the local server answers itself, with the API's error shape."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Gateway:
    """What stands in front of the API function: the token check and the invocation."""

    secret: bytes
    invoke: Callable[[dict[str, Any]], tuple[dict[str, Any], bool]]
    on_matchmaker_invoked: Callable[[], None]
    max_body_bytes: int


@dataclass
class RequestHead:
    method: str
    target: str
    version: str
    fields: dict[str, list[str]]  # lower-case name -> every value, in order


class LocalHTTPServer(PooledHTTPServer):
    """The pooled server with the API Gateway stand-in and the transport's time limits.

    Each connection carries one request (HTTP/1.0 replies, `Connection: close`)."""

    read_timeout_s = READ_TIMEOUT_S
    request_timeout_s = REQUEST_TIMEOUT_S

    def __init__(
        self,
        address: tuple[str, int],
        threads: int,
        gateway: Gateway,
        *,
        read_timeout_s: float | None = None,
        request_timeout_s: float | None = None,
    ) -> None:
        self.gateway = gateway
        if read_timeout_s is not None:
            self.read_timeout_s = read_timeout_s
        if request_timeout_s is not None:
            self.request_timeout_s = request_timeout_s
        super().__init__(address, GatewayHandler, threads)


class GatewayHandler(BaseHTTPRequestHandler):
    """Reads one raw HTTP request under strict limits, checks its token and hands it to
    the API function. Every answer it makes itself is JSON in the API's error shape
    (never BaseHTTPRequestHandler's HTML), and the body reaches the function untouched."""

    server: LocalHTTPServer
    server_version = "matchmaker-local"
    sys_version = ""

    def handle(self) -> None:
        self.close_connection = True
        self.command, self.path, self.request_version = "", "", "HTTP/1.0"
        self._deadline = time.monotonic() + self.server.request_timeout_s
        try:
            head = self._read_head()
            if head is not None:
                self._serve(head)
        except HttpError as exc:
            self._send_error_reply(exc.status, exc.code, exc.message)
        except TimeoutError:
            self._send_error_reply(
                408,
                "request_timeout",
                f"the request did not arrive in time: send it whole within "
                f"{self.server.request_timeout_s:g}s, with no pause over "
                f"{self.server.read_timeout_s:g}s",
            )
        except ConnectionError:
            logger.info("client %s disconnected mid-request", self.client_address)
        finally:
            self._linger()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Never HTML: whatever calls this gets the JSON shape."""
        phrase = _phrase(code) or "Error"
        self._send_error_reply(code, phrase.lower().replace(" ", "_"), message or phrase)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug(format % args)

    # --- reading -------------------------------------------------------------------------

    def _arm(self) -> None:
        """The next wait on the socket: at most read_timeout_s, and never past the deadline."""
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request deadline")
        self.connection.settimeout(min(self.server.read_timeout_s, remaining))

    def _read_line(self, limit: int, too_long: HttpError) -> bytes:
        """One line with its LF, at most `limit` bytes; b"" when the client sent nothing.
        Reads what has arrived (peek), so a client trickling bytes meets the deadline."""
        line = bytearray()
        while True:
            self._arm()
            chunk = cast(io.BufferedReader, self.rfile).peek(1)
            if not chunk:
                if line:
                    raise HttpError(400, "bad_request", "the request ended mid-line")
                return b""
            end = chunk.find(b"\n")
            take = len(chunk) if end < 0 else end + 1
            take = min(take, limit + 1 - len(line))
            line += self.rfile.read(take)
            if len(line) > limit:
                raise too_long
            if line.endswith(b"\n"):
                return bytes(line)

    def _read_head(self) -> RequestHead | None:
        raw = self._read_line(
            MAX_REQUEST_LINE_BYTES,
            HttpError(
                414, "uri_too_long", f"the request line is over {MAX_REQUEST_LINE_BYTES} bytes"
            ),
        )
        if not raw:
            return None  # connected and closed: nothing to answer
        method, target, version = _request_line(raw)
        self.command, self.path, self.request_version = method, target, version
        fields: dict[str, list[str]] = {}
        too_large = HttpError(
            431, "headers_too_large", f"the headers are over {MAX_HEADER_BYTES} bytes"
        )
        budget, count = MAX_HEADER_BYTES, 0
        while True:
            line = self._read_line(budget, too_large)
            if not line:
                raise HttpError(400, "bad_request", "the request ended inside its headers")
            budget -= len(line)
            if line in (b"\r\n", b"\n"):
                break
            count += 1
            if count > MAX_HEADERS:
                raise HttpError(431, "headers_too_large", f"more than {MAX_HEADERS} headers")
            name, value = _header_field(line)
            fields.setdefault(name, []).append(value)
        head = RequestHead(method, target, version, fields)
        hosts = fields.get("host", [])
        if len(hosts) > 1 or (version == "HTTP/1.1" and not hosts):
            raise HttpError(400, "bad_request", "send exactly one Host header")
        return head

    def _body_length(self, head: RequestHead) -> int:
        if "transfer-encoding" in head.fields:
            if "content-length" in head.fields:
                raise HttpError(
                    400, "bad_request", "send Content-Length or Transfer-Encoding, not both"
                )
            raise HttpError(
                411,
                "length_required",
                "Transfer-Encoding is not supported by the local server: send the body "
                "with a Content-Length",
            )
        values = [
            part.strip()
            for value in head.fields.get("content-length", [])
            for part in value.split(",")
        ]
        if not values:
            if head.method in BODY_METHODS:
                raise HttpError(
                    411, "length_required", f"{head.method} needs a Content-Length (0 for no body)"
                )
            return 0
        if not all(_DIGITS.fullmatch(value) for value in values):
            raise HttpError(
                400, "bad_request", "Content-Length must be a non-negative decimal integer"
            )
        lengths = {int(v) if len(v) <= _MAX_LENGTH_DIGITS else sys.maxsize for v in values}
        if len(lengths) > 1:
            raise HttpError(400, "bad_request", "the Content-Length values disagree")
        return lengths.pop()

    def _read_body(self, length: int) -> bytes:
        body = bytearray()
        while len(body) < length:
            self._arm()
            chunk = self.rfile.read1(min(length - len(body), 64 * 1024))
            if not chunk:
                raise HttpError(
                    400,
                    "bad_request",
                    f"the body ended after {len(body)} of its {length} bytes (Content-Length)",
                )
            body += chunk
        return bytes(body)

    # --- the gateway -----------------------------------------------------------------------

    def _claims(self, head: RequestHead) -> dict[str, str]:
        """The verified claims; 401 otherwise, before the function runs, as API Gateway's
        JWT authorizer answers. Like it, takes the token alone or after `Bearer ` (the
        scheme in any case, RFC 9110)."""
        values = head.fields.get("authorization")
        if values is None:
            raise HttpError(401, "unauthorized", "send a token: Authorization: Bearer <token>")
        if len(values) > 1:
            raise HttpError(401, "unauthorized", "send one Authorization header")
        scheme, space, credentials = values[0].partition(" ")
        if space and scheme.lower() != "bearer":
            raise HttpError(401, "unauthorized", "use the Bearer scheme: Bearer <token>")
        token = credentials.strip() if space else scheme
        if not token or " " in token:
            raise HttpError(401, "unauthorized", "the Authorization header holds no token")
        try:
            return devauth.verify(self.server.gateway.secret, token)
        except devauth.TokenError as exc:
            raise HttpError(
                401, "unauthorized", f"invalid token ({exc}); get one with `matchmaker token`"
            ) from exc

    def _serve(self, head: RequestHead) -> None:
        gateway = self.server.gateway
        length = self._body_length(head)
        claims = self._claims(head)  # API Gateway's authorizer runs before the body counts
        if length > gateway.max_body_bytes:
            raise HttpError(
                413, "too_large", f"request body is larger than {gateway.max_body_bytes} bytes"
            )
        body = self._read_body(length)
        headers = {name: ",".join(values) for name, values in head.fields.items()}
        event = api_event(
            head.method,
            head.target,
            headers=headers,
            body=body,
            claims=claims,
            source_ip=self.client_address[0],
        )
        try:
            result, invoked = gateway.invoke(event)
        except FutureTimeoutError:  # API Gateway's answer when the function times out
            self._send_error_reply(503, "unavailable", "the API function timed out; retry")
            return
        except Exception:  # ... and when it fails or its container dies
            logger.exception("API invocation failed")
            self._send_error_reply(500, "internal", "the API function failed; see the server log")
            return
        if invoked:
            gateway.on_matchmaker_invoked()
        data = result.get("body") or ""
        payload = base64.b64decode(data) if result.get("isBase64Encoded") else str(data).encode()
        self._send_reply(int(result.get("statusCode", 500)), payload, result.get("headers") or {})

    # --- writing ---------------------------------------------------------------------------

    def _send_error_reply(self, status: int, code: str, message: str) -> None:
        logger.info("answered %s %s to %s", status, code, self.client_address[0])
        body = json.dumps({"error": code, "message": message}).encode()
        self._send_reply(status, body, {"Content-Type": "application/json"})

    def _send_reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        lines = [f"HTTP/1.0 {status} {_phrase(status)}".rstrip()]
        lines += [
            f"{key}: {value}"
            for key, value in headers.items()
            if key.lower() not in ("content-length", "connection", "transfer-encoding")
        ]
        lines += [
            f"Server: {self.server_version}",
            f"Date: {formatdate(usegmt=True)}",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", errors="replace")
        try:
            self.connection.settimeout(self.server.read_timeout_s)
            self.wfile.write(head if self.command == "HEAD" else head + body)
        except OSError:
            logger.info("client %s went away before the reply", self.client_address[0])

    def _linger(self) -> None:
        """Half-close, then read and drop what the client still sends for LINGER_S: a
        close with unread input sends a reset, which can destroy the reply in flight."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            until = time.monotonic() + LINGER_S
            while (left := until - time.monotonic()) > 0:
                self.connection.settimeout(left)
                if not self.connection.recv(64 * 1024):
                    break
        except OSError:
            pass


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _request_line(raw: bytes) -> tuple[str, str, str]:
    line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
    parts = line.split(b" ")
    if len(parts) == 2:
        raise HttpError(
            400, "bad_request", "HTTP/0.9 requests are not served: send METHOD /path HTTP/1.1"
        )
    if len(parts) != 3:
        raise HttpError(
            400, "bad_request", "the request line must be METHOD /path HTTP/1.1 (single spaces)"
        )
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HttpError(400, "bad_request", "the method is not a valid HTTP token")
    try:
        path = target.decode("ascii")
    except UnicodeDecodeError:
        path = ""
    if not _TARGET.fullmatch(path):
        raise HttpError(
            400, "bad_request", "the target must be a path starting with / in visible ASCII"
        )
    if version not in (b"HTTP/1.0", b"HTTP/1.1"):
        raise HttpError(400, "bad_request", "the protocol must be HTTP/1.0 or HTTP/1.1")
    return method.decode("ascii"), path, version.decode("ascii")


def _header_field(raw: bytes) -> tuple[str, str]:
    line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
    if line[:1] in (b" ", b"\t"):
        raise HttpError(400, "bad_request", "folded header lines are not accepted")
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN.fullmatch(name):
        raise HttpError(400, "bad_request", "a header line is not `Name: value`")
    value = value.strip(b" \t")
    if _FIELD_VALUE_FORBIDDEN.search(value):
        raise HttpError(400, "bad_request", "a header value holds control characters")
    return name.decode("ascii").lower(), value.decode("latin-1")


class Scheduler:
    """Runs the matchmaker handler every `interval_s`, and at once when woken: by a batch
    of wake records (handed over as the SQS event Lambda would get) or by a fan-out's
    async invoke. One run at a time, like a reserved concurrency of 1: whatever arrives
    during a run is served by the next one, in one invocation. A woken run lingers after
    the queue ran dry (WAKE_LINGER_SECONDS) exactly as in Lambda: it is the real handler."""

    def __init__(self, interval_s: float, run: Callable[[dict[str, Any]], None]) -> None:
        self.interval_s = interval_s
        self.run = run
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._records: list[dict[str, Any]] = []
        self._done: list[Callable[[], None]] = []
        self.runs: dict[str, int] = {}  # runs started, by source (the latency benchmark)
        self.busy = False  # a run is going (a woken one may be lingering)
        self.thread = threading.Thread(target=self._loop, name="matchmaker-schedule", daemon=True)

    def wake(self) -> None:
        self._wake.set()

    def wake_with(self, records: list[dict[str, Any]], done: Callable[[], None]) -> None:
        """Queue SQS records for the next run; `done` runs after it (deletes them)."""
        with self._lock:
            self._records.extend(records)
            self._done.append(done)
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.thread.join(timeout=90)

    def _loop(self) -> None:
        source = "schedule"
        while not self._stop.is_set():
            with self._lock:
                records, self._records = self._records, []
                done, self._done = self._done, []
            event: dict[str, Any] = {"Records": records} if records else {"source": source}
            kind = "wake" if records else source
            # Counted as it starts: a woken run may linger past the moment a caller counts.
            self.runs[kind] = self.runs.get(kind, 0) + 1
            self.busy = True
            try:
                self.run(event)
                for finished in done:
                    finished()
            except Exception:  # keep serving: the next tick retries, like the real schedule
                logger.exception("scheduled matchmaker run failed")
            finally:
                self.busy = False
            woken = self._wake.wait(self.interval_s)
            self._wake.clear()
            source = "trigger" if woken else "schedule"


class WakeConsumer:
    """The wake queue's event source mapping: long-polls the queue, gathers a batch for up
    to `window_s` after the first message, and hands it to the scheduler, which deletes
    the messages once its run has succeeded (a failed run leaves them to come back)."""

    def __init__(
        self,
        queue_url: str,
        scheduler: Scheduler,
        window_s: float = WAKE_BATCHING_WINDOW_S,
        batch_size: int = WAKE_BATCH_SIZE,
    ) -> None:
        self.queue_url = queue_url
        self.scheduler = scheduler
        self.window_s = window_s
        self.batch_size = batch_size
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="matchmaker-wake", daemon=True)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=WAKE_POLL_S + 5)

    def _receive(self, wait_s: int) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = (
            aws.sqs_client()
            .receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=wait_s,
                VisibilityTimeout=120,
            )
            .get("Messages", [])
        )
        return messages

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self._receive(WAKE_POLL_S)
                closes = time.monotonic() + self.window_s
                while batch and len(batch) < self.batch_size and time.monotonic() < closes:
                    more = self._receive(0)
                    if not more:
                        time.sleep(min(0.05, max(0.0, closes - time.monotonic())))
                    batch.extend(more)
            except Exception:
                if not self._stop.is_set():
                    logger.exception("wake queue not readable")
                    time.sleep(1)
                continue
            if batch:
                handles = [m["ReceiptHandle"] for m in batch]
                self.scheduler.wake_with(
                    [
                        {
                            "messageId": m["MessageId"],
                            "receiptHandle": m["ReceiptHandle"],
                            "body": m["Body"],
                            "eventSource": "aws:sqs",
                        }
                        for m in batch
                    ],
                    functools.partial(self._delete, handles),
                )

    def _delete(self, handles: list[str]) -> None:
        for start in range(0, len(handles), 10):
            aws.sqs_client().delete_message_batch(
                QueueUrl=self.queue_url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": handle}
                    for i, handle in enumerate(handles[start : start + 10])
                ],
            )


def exposure_warning(host: str) -> str | None:
    """A warning when `serve --host` listens beyond this machine's loopback interface, None
    when every address the host name resolves to is a loopback one."""
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        addresses = set()
    if addresses and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        return None
    return (
        f"WARNING: serving on {host}, beyond loopback: anyone who can reach this port can "
        "call the API with a dev token, and the local server has no TLS. Use it only on a "
        "network you trust; the default, 127.0.0.1, is local only."
    )


class LocalStack:
    def __init__(
        self,
        settings: Settings,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        schedule_s: float = 5.0,
        secret_path: Path | None = None,
        api_workers: int | None = None,
        read_timeout_s: float = READ_TIMEOUT_S,
        wake_window_s: float = WAKE_BATCHING_WINDOW_S,
    ) -> None:
        self.wake_window_s = wake_window_s
        self.wake_consumer: WakeConsumer | None = None
        self.settings = settings
        self.read_timeout_s = read_timeout_s
        self.host = host
        self.port = port
        self.schedule_s = schedule_s
        # in the user's state directory, never beside MATCHMAKER_PGDATA (which may be /tmp)
        self.secret = devauth.load_secret(secret_path or devauth.default_secret_path())
        self.api_workers = api_workers or settings.api_workers
        self.moto: Any = None
        self.http: LocalHTTPServer | None = None
        self.scheduler: Scheduler | None = None
        self.api: ApiWorkers | None = None

    @property
    def url(self) -> str:
        assert self.http is not None
        return f"http://{self.host}:{self.http.server_address[1]}"

    def start(self) -> None:
        # Metrics go to CloudWatch as log lines in AWS; on a terminal they are noise.
        os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")
        self._start_sqs()
        # The handlers read settings and the database from here on.
        from tooling.local_runs import open_database  # noqa: PLC0415 - after the environment is set

        get_settings.cache_clear()
        settings = get_settings()
        open_database(settings).close()  # migrate once, before serving

        self.scheduler = Scheduler(self.schedule_s, self._run_matchmaker)
        aws.local_invoke = lambda _payload: self.scheduler.wake() if self.scheduler else None
        self.api = ApiWorkers(self.api_workers, self._worker_environment(settings))
        gateway = Gateway(
            secret=self.secret,
            invoke=self.api.invoke,
            on_matchmaker_invoked=self.scheduler.wake,
            max_body_bytes=MAX_BODY_BYTES,
        )
        self.http = LocalHTTPServer(  # bind first: a taken port fails before any worker starts
            (self.host, self.port),
            self.api_workers * HTTP_THREADS_PER_WORKER,
            gateway,
            read_timeout_s=self.read_timeout_s,
        )
        self.api.start()
        self.scheduler.thread.start()
        if settings.wake_queue_url:
            self.wake_consumer = WakeConsumer(
                settings.wake_queue_url, self.scheduler, self.wake_window_s
            )
            self.wake_consumer.thread.start()
        threading.Thread(
            target=self.http.serve_forever, name="matchmaker-http", daemon=True
        ).start()

    def stop(self) -> None:
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()  # waits for the requests in flight
        if self.api is not None:
            self.api.stop()
        if self.wake_consumer is not None:
            self.wake_consumer.stop()
        if self.scheduler is not None:
            self.scheduler.stop()
        aws.local_invoke = None
        if self.moto is not None:
            self.moto.stop()

    @staticmethod
    def _worker_environment(settings: Settings) -> dict[str, str]:
        """What the API workers need beyond this process's environment: the embedded
        server's URL (this process owns that server; the workers only connect to it)."""
        if settings.database_url is None and not settings.db_secret_arn:
            return {"DATABASE_URL": embedded_server_uri(settings.pgdata)}
        return {}

    def _start_sqs(self) -> None:
        try:
            from moto.server import ThreadedMotoServer  # noqa: PLC0415 - a dev dependency
        except ImportError:
            logger.warning("moto[server] is not installed: no SQS dead-letter queue locally")
            return
        # The wake consumer polls every second: moto's request log would drown the output.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        _, port = self.moto.get_host_and_port()
        os.environ.update(
            {
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                "AWS_ACCESS_KEY_ID": "local",
                "AWS_SECRET_ACCESS_KEY": "local",
                "POWERTOOLS_TRACE_DISABLED": "true",
            }
        )
        aws.sqs_client.cache_clear()
        queue = aws.sqs_client().create_queue(QueueName="matchmaker-dead-letters")
        os.environ["DEAD_LETTER_QUEUE_URL"] = queue["QueueUrl"]
        wake = aws.sqs_client().create_queue(QueueName="matchmaker-wake")
        os.environ["WAKE_QUEUE_URL"] = wake["QueueUrl"]

    def _run_matchmaker(self, event: dict[str, Any]) -> None:
        import handlers.matchmaker  # noqa: PLC0415

        summary = handlers.matchmaker.lambda_handler(
            event, FakeContext("matchmaker-MatchmakerFunction", 60_000)
        )
        if summary.get("completed") or summary.get("failed"):
            logger.info("matchmaker", extra=summary)

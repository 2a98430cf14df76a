"""`matchmaker serve`: the whole stack on a laptop, without Docker.

Each HTTP request becomes the API Gateway HTTP API (payload 2.0) event the real API
would send to the same handler, with the JWT authorizer's claims taken from a verified
development token; the matchmaker handler runs every few seconds (the schedule) and at
once when a trigger asks (the async invoke); SQS is moto's threaded server; PostgreSQL is
the embedded one unless DATABASE_URL is set. Listens on 127.0.0.1 unless told otherwise.

Requests are served concurrently the way Lambda scales the API: by containers. Each of
MATCHMAKER_API_WORKERS worker processes (default 8) is one warm API container with its own
database connection, handling one request at a time, exactly as in AWS. They are processes,
not threads, because the handler's per-request state is process-wide (Powertools keeps the
current event on the resolver class), so two threads in one process would see each other's
callers. A bounded pool of HTTP threads reads requests and waits for the workers.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
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
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from core import aws
from core.data.connections import DatabaseUnavailableError, embedded_server_uri
from core.observability import logger
from core.settings import Settings, get_settings
from tooling import dev_tokens as devauth

MAX_REQUEST_BYTES = 1024 * 1024  # API Gateway's own limit is higher; ours rejects > 256 KiB
API_TIMEOUT_MS = 29_000  # the API function's timeout
HTTP_THREADS_PER_WORKER = 4  # threads reading requests and writing replies per worker
SOCKET_TIMEOUT_S = 60.0  # a client that stalls mid-request frees its thread
WORKER_START_TIMEOUT_S = 60.0


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
        "body": body.decode("utf-8", errors="replace") if body else None,
        "isBase64Encoded": False,
    }


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


class Scheduler:
    """Runs the matchmaker handler every `interval_s`, and at once when woken."""

    def __init__(self, interval_s: float, run: Callable[[str], None]) -> None:
        self.interval_s = interval_s
        self.run = run
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="matchmaker-schedule", daemon=True)

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.thread.join(timeout=90)

    def _loop(self) -> None:
        source = "schedule"
        while not self._stop.is_set():
            try:
                self.run(source)
            except Exception:  # keep serving: the next tick retries, like the real schedule
                logger.exception("scheduled matchmaker run failed")
            woken = self._wake.wait(self.interval_s)
            self._wake.clear()
            source = "trigger" if woken else "schedule"


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
    ) -> None:
        self.settings = settings
        self.host = host
        self.port = port
        self.schedule_s = schedule_s
        self.secret = devauth.load_secret(
            secret_path or settings.pgdata.parent / "dev-token-secret"
        )
        self.api_workers = api_workers or settings.api_workers
        self.moto: Any = None
        self.http: PooledHTTPServer | None = None
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
        import handlers.matchmaker  # noqa: F401, PLC0415 - fails the start, not the first run

        self.scheduler = Scheduler(self.schedule_s, self._run_matchmaker)
        aws.local_invoke = lambda _payload: self.scheduler.wake() if self.scheduler else None
        self.api = ApiWorkers(self.api_workers, self._worker_environment(settings))
        self.http = PooledHTTPServer(  # bind first: a taken port fails before any worker starts
            (self.host, self.port),
            self._handler_class(self.api),
            self.api_workers * HTTP_THREADS_PER_WORKER,
        )
        self.api.start()
        self.scheduler.thread.start()
        threading.Thread(
            target=self.http.serve_forever, name="matchmaker-http", daemon=True
        ).start()

    def stop(self) -> None:
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()  # waits for the requests in flight
        if self.api is not None:
            self.api.stop()
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

    def _run_matchmaker(self, source: str) -> None:
        import handlers.matchmaker  # noqa: PLC0415

        summary = handlers.matchmaker.lambda_handler(
            {"source": source}, FakeContext("matchmaker-MatchmakerFunction", 60_000)
        )
        if summary.get("completed") or summary.get("failed"):
            logger.info("matchmaker", extra=summary)

    def _handler_class(self, api: ApiWorkers) -> type[BaseHTTPRequestHandler]:
        stack = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "matchmaker-local"
            timeout = SOCKET_TIMEOUT_S

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug(format % args)

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length > MAX_REQUEST_BYTES:
                    self._reply(413, {"error": "too_large", "message": "request too large"})
                    return
                body = self.rfile.read(length) if length else None
                headers = {k.lower(): v for k, v in self.headers.items()}
                claims = None
                token = headers.get("authorization", "").removeprefix("Bearer ").strip()
                if token:
                    try:
                        claims = devauth.verify(stack.secret, token)
                    except devauth.TokenError:
                        # API Gateway answers 401 itself for a bad token.
                        self._reply(401, {"message": "Unauthorized"})
                        return
                event = api_event(
                    self.command,
                    self.path,
                    headers=headers,
                    body=body,
                    claims=claims,
                    source_ip=self.client_address[0],
                )
                try:
                    result, invoked = api.invoke(event)
                except FutureTimeoutError:  # API Gateway's answer when the function times out
                    self._reply(503, {"message": "Service Unavailable"})
                    return
                except Exception:  # ... and when it fails or its container dies
                    logger.exception("API invocation failed")
                    self._reply(500, {"message": "Internal Server Error"})
                    return
                if invoked and stack.scheduler is not None:
                    stack.scheduler.wake()
                self._reply(
                    result.get("statusCode", 500),
                    result.get("body") or "",
                    result.get("headers") or {},
                )

            def _reply(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
                text = body if isinstance(body, str) else json.dumps(body)
                data = text.encode()
                self.send_response(status)
                for key, value in (headers or {"Content-Type": "application/json"}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def __getattr__(self, name: str) -> Any:
                # Every method (GET ... and TRACE, QUERY, anything) goes to the API, which
                # answers routes it does not have with its JSON 404, as API Gateway would.
                if name.startswith("do_"):
                    return self._serve
                raise AttributeError(name)

        return Handler

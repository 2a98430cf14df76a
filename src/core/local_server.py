"""`matchmaker serve`: the whole stack on a laptop, without Docker.

Each HTTP request becomes the API Gateway HTTP API (payload 2.0) event the real API
would send to the same handler, with the JWT authorizer's claims taken from a verified
development token; the matchmaker handler runs every few seconds (the schedule) and at
once when a trigger asks (the async invoke); SQS is moto's threaded server; PostgreSQL is
the embedded one unless DATABASE_URL is set. Listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from core import aws, devauth
from core.observability import logger
from core.settings import Settings, get_settings

MAX_REQUEST_BYTES = 1024 * 1024  # API Gateway's own limit is higher; ours rejects > 256 KiB


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
    ) -> None:
        self.settings = settings
        self.host = host
        self.port = port
        self.schedule_s = schedule_s
        self.secret = devauth.load_secret(
            secret_path or settings.pgdata.parent / "dev-token-secret"
        )
        self.moto: Any = None
        self.http: HTTPServer | None = None
        self.scheduler: Scheduler | None = None
        self._api_lock = threading.Lock()

    @property
    def url(self) -> str:
        assert self.http is not None
        return f"http://{self.host}:{self.http.server_address[1]}"

    def start(self) -> None:
        # Metrics go to CloudWatch as log lines in AWS; on a terminal they are noise.
        os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")
        self._start_sqs()
        # The handlers read settings and the database from here on.
        from core.runner import open_database  # noqa: PLC0415 - after the environment is set

        get_settings.cache_clear()
        open_database(get_settings()).close()  # migrate once, before serving
        import handlers.api  # noqa: PLC0415
        import handlers.matchmaker  # noqa: PLC0415

        self.scheduler = Scheduler(self.schedule_s, self._run_matchmaker)
        aws.local_invoke = lambda _payload: self.scheduler.wake() if self.scheduler else None
        self.http = HTTPServer((self.host, self.port), self._handler_class(handlers.api))
        self.scheduler.thread.start()
        threading.Thread(
            target=self.http.serve_forever, name="matchmaker-http", daemon=True
        ).start()

    def stop(self) -> None:
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        if self.scheduler is not None:
            self.scheduler.stop()
        aws.local_invoke = None
        if self.moto is not None:
            self.moto.stop()

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

    def _handler_class(self, api: Any) -> type[BaseHTTPRequestHandler]:
        stack = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "matchmaker-local"

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
                with stack._api_lock:  # one database connection, one request at a time
                    result = api.lambda_handler(
                        event, FakeContext("matchmaker-ApiFunction", 29_000)
                    )
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

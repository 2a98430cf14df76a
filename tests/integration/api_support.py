"""Support for the HTTP API handler tests: the events/api/*.json requests, a fake Lambda
context, moto for SQS and Lambda (with a recorder of the async invokes) and database
snapshots that prove a rejected request wrote nothing."""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws
from psycopg.conninfo import conninfo_to_dict

import core.aws
import core.settings
import handlers.api
import handlers.matchmaker
import handlers.redrive
from core.data.repository import Conn

EVENTS_API = Path(__file__).resolve().parents[2] / "events" / "api"

CODE = "techconf-2026"
ADA = "u-48151623"  # the attendee of put_attendee.json, get_matches.json, dismiss.json
GRACE = "u-42424242"  # the person dismissed in dismiss.json
WORKER_FUNCTION = "matchmaker-MatchmakerFunction"
REGION = "us-east-1"

# Every table a request can write to; a rejected request must leave all of them unchanged.
TABLES = (
    "events",
    "profiles",
    "attendees",
    "matchmaking_queue",
    "matchmaking_jobs",
    "user_matches",
    "dismissals",
)

_KEEP: Any = object()


# --- Lambda context ----------------------------------------------------------------------


@dataclass
class FakeLambdaContext:
    """What Powertools and the handler read from the Lambda context."""

    remaining_ms: int = 29_000  # an API Lambda with a 30 s timeout, just started
    function_name: str = "matchmaker-ApiFunction"
    function_version: str = "$LATEST"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = (
        "arn:aws:lambda:us-east-1:123456789012:function:matchmaker-ApiFunction"
    )
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    log_group_name: str = "/aws/lambda/matchmaker-ApiFunction"
    log_stream_name: str = "2026/03/12/[$LATEST]4c1f0e9a2b7d4e8f9a6b3c2d1e0f9a8b"

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


# --- requests ----------------------------------------------------------------------------


def load_event(name: str) -> dict[str, Any]:
    """A fresh copy of events/api/<name>.json."""
    event: dict[str, Any] = json.loads((EVENTS_API / f"{name}.json").read_text())
    return event


def claims_of(name: str) -> dict[str, Any]:
    """The JWT claims of the token in events/api/<name>.json."""
    claims: dict[str, Any] = load_event(name)["requestContext"]["authorizer"]["jwt"]["claims"]
    return claims


def request(
    name: str,
    *,
    code: str = _KEEP,
    user_id: str = _KEEP,
    body: Any = _KEEP,
    claims: dict[str, Any] | None = _KEEP,
    scopes: list[str] | None = _KEEP,
) -> dict[str, Any]:
    """events/api/<name>.json with other path parameters, body or token claims.

    The path is rebuilt from the routeKey, as API Gateway does (rawPath arrives decoded);
    `body` may be a JSON-able value, a raw string (sent as is) or None (no body).
    """
    event = load_event(name)
    params = dict(event.get("pathParameters") or {})
    if code is not _KEEP:
        params["code"] = code
    if user_id is not _KEEP:
        params["user_id"] = user_id
    if params:
        path = event["routeKey"].split(" ", 1)[1]
        for key, value in params.items():
            path = path.replace("{" + key + "}", value)
        event["pathParameters"] = params
        event["rawPath"] = path
        event["requestContext"]["http"]["path"] = path
    if body is not _KEEP:
        if body is None:
            event.pop("body", None)
            event["headers"].pop("content-length", None)
        else:
            raw = body if isinstance(body, str) else json.dumps(body)
            event["body"] = raw
            event["headers"]["content-type"] = "application/json"
            event["headers"]["content-length"] = str(len(raw.encode()))
    jwt = event["requestContext"].get("authorizer", {}).get("jwt")
    if claims is not _KEEP:
        assert jwt is not None, f"{name} has no authorizer context"
        jwt["claims"] = claims
    if scopes is not _KEEP:
        assert jwt is not None, f"{name} has no authorizer context"
        jwt["scopes"] = scopes
    return event


def _with_token_of(event: dict[str, Any], source_name: str) -> dict[str, Any]:
    source = load_event(source_name)
    event["requestContext"]["authorizer"] = source["requestContext"]["authorizer"]
    event["headers"]["authorization"] = source["headers"]["authorization"]
    return event


def as_attendee(event: dict[str, Any], user_id: str) -> dict[str, Any]:
    """The same request made with an attendee's token (subject user_id, no API scope)."""
    event = _with_token_of(event, "get_matches_attendee_self")
    event["requestContext"]["authorizer"]["jwt"]["claims"]["sub"] = user_id
    return event


def as_service(event: dict[str, Any]) -> dict[str, Any]:
    """The same request made with the event app's backend token (matchmaker/service)."""
    return _with_token_of(event, "get_event")


def as_admin(event: dict[str, Any]) -> dict[str, Any]:
    """The same request made with an operator's token (matchmaker/admin)."""
    return _with_token_of(event, "admin_status")


def without_authorizer(event: dict[str, Any]) -> dict[str, Any]:
    """The same request as if API Gateway had passed it on without a JWT authorizer."""
    event["requestContext"].pop("authorizer", None)
    event["headers"].pop("authorization", None)
    return event


# --- responses ---------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str

    @property
    def json(self) -> Any:
        return json.loads(self.text) if self.text else None

    def is_error(self, status: int, error: str | None = None) -> bool:
        """The status, a JSON content type and a body with `error` and `message`."""
        body = self.json
        return (
            self.status == status
            and self.headers.get("Content-Type") == "application/json"
            and isinstance(body, dict)
            and isinstance(body.get("error"), str)
            and isinstance(body.get("message"), str)
            and bool(body["message"])
            and (error is None or body["error"] == error)
        )


@dataclass
class Invocation:
    function_name: str
    invocation_type: str
    payload: Any
    status_code: int | None = None


@dataclass
class Api:
    """Calls handlers.api.lambda_handler as Lambda would; sees the AWS fakes."""

    dlq_url: str
    invocations: list[Invocation]

    def __call__(self, event: dict[str, Any], context: Any = None) -> Reply:
        result = handlers.api.lambda_handler(event, context or FakeLambdaContext())
        assert isinstance(result, dict)
        assert not result.get("isBase64Encoded")
        return Reply(result["statusCode"], result.get("headers") or {}, result.get("body") or "")

    def put_dead_letters(self, count: int) -> None:
        for i in range(count):
            core.aws.sqs_client().send_message(
                QueueUrl=self.dlq_url,
                MessageBody=json.dumps({"type": "matchmaking.dead", "user_id": f"dl-{i}"}),
            )


def _worker_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("app.py", "def lambda_handler(event, context):\n    return event\n")
    return buffer.getvalue()


def _record_invokes(client: Any, invocations: list[Invocation]) -> None:
    """Record every Invoke the real boto3 client sends (to moto), with its status code."""

    def before(params: dict[str, Any], **_: Any) -> None:
        payload = params.get("Payload")
        invocations.append(
            Invocation(
                params["FunctionName"],
                params.get("InvocationType", "RequestResponse"),
                json.loads(payload) if payload else None,
            )
        )

    def after(parsed: dict[str, Any], **_: Any) -> None:
        invocations[-1].status_code = parsed.get("StatusCode")

    client.meta.events.register("before-parameter-build.lambda.Invoke", before)
    client.meta.events.register("after-call.lambda.Invoke", after)


def reset_caches() -> None:
    core.settings.get_settings.cache_clear()
    core.aws.sqs_client.cache_clear()
    core.aws.lambda_client.cache_clear()
    handlers.api.connections.discard()


def reset_handler_state() -> None:
    """What a new Lambda container starts without: the caches above, the scheduled and
    redrive handlers' connections and the warm matchmaker."""
    reset_caches()
    handlers.matchmaker.connections.discard()
    handlers.redrive.connections.discard()
    handlers.matchmaker._matchmaker = None


def database_behind_secrets(monkeypatch: pytest.MonkeyPatch, db_url: str) -> str:
    """Inside mock_aws: the test database reached as in the stack (credentials in Secrets
    Manager, DB_* variables) and the dead-letter queue; returns the queue's URL."""
    params = conninfo_to_dict(db_url)
    secret = boto3.client("secretsmanager").create_secret(
        Name="matchmaker/db",
        SecretString=json.dumps(
            {"username": params.get("user", "postgres"), "password": "not-used-by-trust-auth"}
        ),
    )
    dlq: str = boto3.client("sqs").create_queue(QueueName="matchmaker-dead-letters")["QueueUrl"]
    monkeypatch.setenv("DB_SECRET_ARN", secret["ARN"])
    monkeypatch.setenv("DB_HOST", str(params["host"]))
    monkeypatch.setenv("DB_PORT", str(params.get("port", "5432")))
    monkeypatch.setenv("DB_NAME", str(params["dbname"]))
    monkeypatch.setenv("DEAD_LETTER_QUEUE_URL", dlq)
    return dlq


@dataclass
class AwsFakes:
    """moto's matchmaker Lambda (and its recorded invokes), shared by a test module."""

    function_name: str
    invocations: list[Invocation]


AWS_ENV = {
    "AWS_DEFAULT_REGION": REGION,
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "POWERTOOLS_TRACE_DISABLED": "true",
    "POWERTOOLS_METRICS_NAMESPACE": "Matchmaker",
}


@contextmanager
def aws_fakes() -> Iterator[AwsFakes]:
    """moto (Lambda without Docker) with the matchmaker function to invoke.

    Created once per module: setting moto up costs more than a whole API test."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in AWS_ENV.items():
            env.setenv(name, value)
        with mock_aws(config={"lambda": {"use_docker": False}}):
            role = boto3.client("iam").create_role(
                RoleName="matchmaker-worker-role",
                AssumeRolePolicyDocument=json.dumps(
                    {
                        "Version": "2012-10-17",
                        "Statement": [
                            {
                                "Effect": "Allow",
                                "Principal": {"Service": "lambda.amazonaws.com"},
                                "Action": "sts:AssumeRole",
                            }
                        ],
                    }
                ),
            )["Role"]["Arn"]
            boto3.client("lambda").create_function(
                FunctionName=WORKER_FUNCTION,
                Runtime="python3.11",
                Role=role,
                Handler="app.lambda_handler",
                Code={"ZipFile": _worker_zip()},
            )
            reset_caches()
            invocations: list[Invocation] = []
            _record_invokes(core.aws.lambda_client(), invocations)
            yield AwsFakes(WORKER_FUNCTION, invocations)
            reset_caches()


@contextmanager
def api_for(monkeypatch: pytest.MonkeyPatch, db_url: str, fakes: AwsFakes) -> Iterator[Api]:
    """handlers.api configured (environment, fresh settings and connection) for one test."""
    # A queue of its own: moto, like SQS, allows one PurgeQueue a minute.
    dlq_url = core.aws.sqs_client().create_queue(QueueName=f"matchmaker-dlq-{uuid.uuid4().hex}")[
        "QueueUrl"
    ]
    for name, value in {
        **AWS_ENV,
        "DATABASE_URL": db_url,
        "CONNECT_TIMEOUT_S": "1",
        "DEAD_LETTER_QUEUE_URL": dlq_url,
        "MATCHMAKER_FUNCTION_NAME": fakes.function_name,
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("DB_SECRET_ARN", "SYNC_MATCH_MAX_ATTENDEES", "MAX_RUNTIME_MS"):
        monkeypatch.delenv(name, raising=False)
    core.settings.get_settings.cache_clear()
    handlers.api.connections.discard()
    fakes.invocations.clear()
    try:
        yield Api(dlq_url, fakes.invocations)
    finally:
        handlers.api.connections.discard()
        core.settings.get_settings.cache_clear()


# --- database ----------------------------------------------------------------------------


def snapshot(conn: Conn) -> dict[str, list[str]]:
    """Every row of every table a request can write, as text."""
    return {
        table: [row[0] for row in conn.execute(f"SELECT t::text FROM {table} t ORDER BY 1")]
        for table in TABLES
    }


def scalar(conn: Conn, sql: str, params: Any = None) -> Any:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row[0]

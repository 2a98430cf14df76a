"""AWS adapters: the wake queue, the dead-letter queue, async invocation of the
matchmaker, queue depth, secrets.

Clients come from botocore directly, not boto3: boto3 adds nothing we use and costs 30 to
55 ms of cold start (it imports s3transfer and multiprocessing). Clients are created
lazily, from one session, and reused across warm invocations.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from functools import cache
from typing import Any

import botocore.session
from aws_lambda_powertools.metrics import MetricUnit
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from core.data import repository as repo
from core.data.repository import Conn, QueueOutcome
from core.observability import MetricName, logger, metrics

SQS_BATCH = 10  # SendMessageBatch takes at most 10 entries

# `matchmaker serve` sets this: an "async invoke" then wakes the local scheduler.
local_invoke: Callable[[dict[str, Any]], None] | None = None


SECRET_MAX_AGE_S = 300.0  # as Powertools Parameters: a rotated secret is seen within 5 min


@cache
def session() -> Any:
    # Region, credentials and AWS_ENDPOINT_URL come from the environment, as for boto3.
    return botocore.session.get_session()


@cache
def sqs_client() -> Any:
    return session().create_client("sqs")


# A wake is sent while the user waits for their answer: it must fail fast, not hang for
# botocore's 60 s default timeouts, when SQS cannot be reached.
WAKE_CLIENT_CONFIG = Config(
    connect_timeout=1, read_timeout=2, retries={"max_attempts": 2, "mode": "standard"}
)


@cache
def wake_client() -> Any:
    return session().create_client("sqs", config=WAKE_CLIENT_CONFIG)


@cache
def lambda_client() -> Any:
    return session().create_client("lambda")


@cache
def secrets_client() -> Any:
    return session().create_client("secretsmanager")


def reset_clients() -> None:
    """Forget the session, the clients and the cached secrets (tests: a new container)."""
    for cached in (session, sqs_client, wake_client, lambda_client, secrets_client):
        cached.cache_clear()
    secrets.clear()


class SecretCache:
    """Secrets Manager values kept for max_age_s across warm invocations: one
    GetSecretValue per secret per cold start, and again once the value is older."""

    def __init__(
        self, max_age_s: float = SECRET_MAX_AGE_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_age_s = max_age_s
        self._clock = clock
        self._values: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def get(self, secret_id: str) -> str:
        """The secret's string (a binary secret decoded as UTF-8). Raises botocore's
        ClientError / BotoCoreError when it cannot be read."""
        with self._lock:
            cached = self._values.get(secret_id)
            if cached is not None and self._clock() - cached[0] < self.max_age_s:
                return cached[1]
        # AWSCURRENT, named: during a rotation the AWSPENDING version is not in use yet
        response = secrets_client().get_secret_value(SecretId=secret_id, VersionStage="AWSCURRENT")
        value = response.get("SecretString")
        if value is None:
            value = bytes(response["SecretBinary"]).decode("utf-8")
        with self._lock:
            self._values[secret_id] = (self._clock(), value)
        return str(value)

    def get_json(self, secret_id: str) -> Any:
        return json.loads(self.get(secret_id))

    def invalidate(self, secret_id: str) -> None:
        with self._lock:
            self._values.pop(secret_id, None)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


secrets = SecretCache()


def send_dead_letters(conn: Conn, queue_url: str, outcomes: list[QueueOutcome]) -> int:
    """One message per dead user: what an operator needs to see, and what the redrive
    consumer needs to re-queue it (event id + profile id; replaying twice is harmless)."""
    described = repo.describe_queue_outcomes(conn, outcomes)
    sent = 0
    for start in range(0, len(described), SQS_BATCH):
        chunk = described[start : start + SQS_BATCH]
        entries = [
            {"Id": str(i), "MessageBody": json.dumps(message, default=str)}
            for i, message in enumerate(chunk)
        ]
        response = sqs_client().send_message_batch(QueueUrl=queue_url, Entries=entries)
        if response.get("Failed"):
            # The rows stay dead in the database (visible in admin status): not lost.
            logger.error("dead letters not sent", extra={"failed": response["Failed"]})
        sent += len(response.get("Successful", []))
    return sent


def invoke_matchmaker(
    function_name: str | None, event_code: str | None, source: str = "trigger"
) -> bool:
    """Start a matchmaker run now instead of at the next scheduled tick. Best effort: the
    work is already queued, so a failed invoke only delays it by one tick."""
    payload = {"source": source, "event_code": event_code}
    if local_invoke is not None:
        local_invoke(payload)
        return True
    if not function_name:
        return False
    try:
        lambda_client().invoke(
            FunctionName=function_name,
            InvocationType="Event",
            Payload=json.dumps(payload).encode(),
        )
    except (BotoCoreError, ClientError):
        logger.exception("async invoke of the matchmaker failed", extra=payload)
        return False
    return True


WAKE_MESSAGE_TYPE = "matchmaking.wake"


def send_wake(queue_url: str | None, event_code: str, reason: str) -> bool:
    """Tell the matchmaker that `event_code` has queued work (sent after the commit that
    queued it). Best effort: a wake that cannot be sent never fails the caller's request,
    since the rows are queued and the next schedule tick serves them; it is logged
    (event code and reason only, never profile data) and counted."""
    if not queue_url:
        return False
    body = {"type": WAKE_MESSAGE_TYPE, "event_code": event_code, "reason": reason}
    try:
        wake_client().send_message(QueueUrl=queue_url, MessageBody=json.dumps(body))
    except (BotoCoreError, ClientError):
        logger.exception("wake not sent", extra={"event_code": event_code, "reason": reason})
        metrics.add_metric(name=MetricName.WAKE_FAILURES, unit=MetricUnit.Count, value=1)
        return False
    metrics.add_metric(name=MetricName.WAKES_SENT, unit=MetricUnit.Count, value=1)
    return True


def queue_depth(queue_url: str | None) -> int | None:
    if not queue_url:
        return None
    try:
        attributes = sqs_client().get_queue_attributes(
            QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages"]
        )["Attributes"]
    except (BotoCoreError, ClientError):
        logger.exception("cannot read the dead-letter queue depth")
        return None
    return int(attributes["ApproximateNumberOfMessages"])

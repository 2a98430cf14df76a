"""AWS adapters: the dead-letter queue, async invocation of the matchmaker, queue depth.

Clients are created lazily and reused across warm invocations.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from core.data import repository as repo
from core.data.repository import Conn, QueueOutcome
from core.observability import logger

SQS_BATCH = 10  # SendMessageBatch takes at most 10 entries

# `matchmaker serve` sets this: an "async invoke" then wakes the local scheduler.
local_invoke: Callable[[dict[str, Any]], None] | None = None


@cache
def sqs_client() -> Any:
    return boto3.client("sqs")


@cache
def lambda_client() -> Any:
    return boto3.client("lambda")


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

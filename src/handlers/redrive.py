"""Replays dead letters: consumes the redrive queue (fed from the dead-letter queue by
SQS's DLQ redrive, or by an operator) and puts each user back into matchmaking_queue.

Idempotent: a message whose user is no longer dead (already redriven, or re-queued by a
newer change) changes nothing. Failures are reported per message (partial batch
response), so one bad record never makes SQS retry the whole batch."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict

from core.data import repository as repo
from core.data.connections import ConnectionCache
from core.observability import MetricName, logger, metrics, tracer
from core.settings import get_settings

processor = BatchProcessor(event_type=EventType.SQS)
connections = ConnectionCache("matchmaker-redrive")


class DeadLetter(BaseModel):
    """The message the matchmaker sends for a dead user (core.aws.send_dead_letters)."""

    model_config = ConfigDict(extra="ignore")
    type: str = "matchmaking.dead"
    event_id: int
    profile_id: int


@tracer.capture_method
def redrive_record(record: SQSRecord) -> int:
    letter = DeadLetter.model_validate_json(record.body)
    conn = connections.get(get_settings())
    requeued = repo.redrive_dead(conn, letter.event_id, [letter.profile_id])
    metrics.add_metric(name=MetricName.DEAD_LETTERS_REDRIVEN, unit=MetricUnit.Count, value=requeued)
    logger.info(
        "redrive",
        extra={"event_id": letter.event_id, "profile_id": letter.profile_id, "requeued": requeued},
    )
    return requeued


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    response = process_partial_response(
        event=event, record_handler=redrive_record, processor=processor, context=context
    )
    return dict(response)

"""CloudFormation custom resource: apply db/migrations on every deploy.

Create and Update run the migration runner (the same one the CLI and the tests use);
Delete is a no-op (the database outlives the stack's custom resource). A failed
migration answers FAILED with the error, which fails the deploy."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext

from core.data.connections import connect, resolve_database_url
from core.data.migrations import migrate
from core.observability import logger
from core.settings import get_settings

PHYSICAL_ID = "matchmaker-migrations"
RESPONSE_TIMEOUT_S = 30


def _respond(event: dict[str, Any], status: str, reason: str, data: dict[str, Any]) -> None:
    body = json.dumps(
        {
            "Status": status,
            "Reason": reason[:3000],
            "PhysicalResourceId": event.get("PhysicalResourceId") or PHYSICAL_ID,
            "StackId": event["StackId"],
            "RequestId": event["RequestId"],
            "LogicalResourceId": event["LogicalResourceId"],
            "Data": data,
        }
    ).encode()
    request = urllib.request.Request(  # noqa: S310 - CloudFormation's pre-signed https URL
        event["ResponseURL"],
        data=body,
        method="PUT",
        headers={"Content-Type": "", "Content-Length": str(len(body))},
    )
    with urllib.request.urlopen(request, timeout=RESPONSE_TIMEOUT_S):  # noqa: S310
        pass


def apply_migrations() -> dict[str, Any]:
    settings = get_settings()
    with connect(resolve_database_url(settings), settings, "matchmaker-migrate") as conn:
        report = migrate(conn)
    if report.drift:
        logger.warning("applied migrations were edited since", extra={"drift": report.drift})
    return {"Applied": len(report.applied), "Drift": ",".join(report.drift)}


@logger.inject_lambda_context(log_event=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> None:
    try:
        data = {} if event["RequestType"] == "Delete" else apply_migrations()
    except Exception as exc:
        logger.exception("migration failed")
        _respond(event, "FAILED", f"{type(exc).__name__}: {exc}", {})
        return
    _respond(event, "SUCCESS", "ok", data)

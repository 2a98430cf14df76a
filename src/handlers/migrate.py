"""CloudFormation custom resource: apply db/migrations on every deploy.

Create and Update run the migration runner (the same one the CLI and the tests use), then
create or update the API's and the worker's login users from their secrets (this function
alone reads the master secret);
Delete is a no-op (the database outlives the stack's custom resource). A failed
migration answers FAILED with the error, which fails the deploy. A watchdog answers
FAILED shortly before the function's own timeout, so a stuck migration fails the deploy
at once instead of leaving CloudFormation waiting for an answer for an hour.

The answer goes to the event's pre-signed ResponseURL (a credential: never logged); an
event without one (`sam local invoke` with events/migrate/*.json) gets it returned.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from typing import Any, Literal

from aws_lambda_powertools.utilities.data_classes import CloudFormationCustomResourceEvent
from aws_lambda_powertools.utilities.typing import LambdaContext

from core import aws
from core.data.connections import connect, resolve_database_url
from core.data.migrations import ensure_login_user, migrate
from core.observability import logger
from core.settings import get_settings

PHYSICAL_ID = "matchmaker-migrations"
RESPONSE_TIMEOUT_S = 30
WATCHDOG_MARGIN_MS = 5_000  # room left to send FAILED before Lambda stops the run

Status = Literal["SUCCESS", "FAILED"]


class Responder:
    """Answers one request exactly once: the first answer (the outcome, or the watchdog's
    FAILED) stands, later ones are dropped."""

    def __init__(self, request: CloudFormationCustomResourceEvent) -> None:
        self.request = request
        self.answer: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def send(self, status: Status, reason: str, data: dict[str, Any]) -> dict[str, Any]:
        """Answer, unless answered already; returns the answer that stands."""
        with self._lock:
            if self.answer is not None:
                logger.warning("already answered; dropping this outcome", extra={"status": status})
                return self.answer
            self.answer = {
                "Status": status,
                "Reason": reason[:3000],
                "PhysicalResourceId": self.request.physical_resource_id or PHYSICAL_ID,
                "StackId": self.request.stack_id,
                "RequestId": self.request.request_id,
                "LogicalResourceId": self.request.logical_resource_id,
                "Data": data,
            }
        url = self.request.get("ResponseURL")
        if url:
            _put(url, self.answer)
            logger.info("answered CloudFormation", extra={"status": status})
        else:
            logger.info("no ResponseURL: answered locally", extra={"status": status})
        return self.answer

    def time_out(self) -> None:
        """The watchdog: the migration is still running as the function's time runs out."""
        try:
            self.send("FAILED", "migrations did not finish before the function's timeout", {})
        except Exception:  # a thread's exception would go unseen in the logs otherwise
            logger.exception("could not answer FAILED after the timeout")


def _put(url: str, answer: dict[str, Any]) -> None:
    body = json.dumps(answer).encode()
    request = urllib.request.Request(  # noqa: S310 - CloudFormation's pre-signed https URL
        url, data=body, method="PUT", headers={"Content-Type": "", "Content-Length": str(len(body))}
    )
    with urllib.request.urlopen(request, timeout=RESPONSE_TIMEOUT_S):  # noqa: S310
        pass


def apply_migrations() -> dict[str, Any]:
    settings = get_settings()
    logins = {
        "matchmaker_api": settings.db_api_secret_arn,
        "matchmaker_worker": settings.db_worker_secret_arn,
    }
    with connect(resolve_database_url(settings), settings, "matchmaker-migrate") as conn:
        report = migrate(conn)
        # the functions' own login users, from their secrets (a rotation converges here)
        for group, secret_arn in logins.items():
            if secret_arn:
                secret = aws.secrets.get_json(secret_arn)
                ensure_login_user(conn, str(secret["username"]), str(secret["password"]), group)
    if report.drift:
        logger.warning("applied migrations were edited since", extra={"drift": report.drift})
    return {"Applied": len(report.applied), "Drift": ",".join(report.drift)}


@logger.inject_lambda_context(log_event=False)  # the event holds the pre-signed URL
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = CloudFormationCustomResourceEvent(event)
    logger.info(
        "custom resource request",
        extra={
            "request_type": request.request_type,
            "logical_resource_id": request.logical_resource_id,
            "request_id": request.request_id,
        },
    )
    responder = Responder(request)
    budget_s = max(0, context.get_remaining_time_in_millis() - WATCHDOG_MARGIN_MS) / 1000
    watchdog = threading.Timer(budget_s, responder.time_out)
    watchdog.daemon = True
    watchdog.start()
    try:
        data = {} if request.request_type == "Delete" else apply_migrations()
    except Exception as exc:
        logger.exception("migration failed")
        outcome: tuple[Status, str, dict[str, Any]] = ("FAILED", f"{type(exc).__name__}: {exc}", {})
    else:
        outcome = ("SUCCESS", "ok", data)
    watchdog.cancel()
    return responder.send(*outcome)

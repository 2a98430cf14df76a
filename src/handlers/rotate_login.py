"""Secrets Manager rotation function of the API's and the worker's database logins
(ApiDbSecret, WorkerDbSecret): one step per invocation, see core.data.login_rotation.

An unhandled error fails the step; Secrets Manager retries it and, while it fails, leaves
AWSCURRENT (the working password) in place. The event holds no secret, but it is not
logged anyway: only the step, the secret's ARN and the outcome are.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import ValidationError

from core import aws
from core.data.login_rotation import RotationError, RotationRequest, rotate
from core.observability import logger
from core.settings import get_settings


@logger.inject_lambda_context(log_event=False)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, str]:
    try:
        request = RotationRequest.model_validate(event)
    except ValidationError as exc:
        raise RotationError(
            f"not a rotation event: {exc.error_count()} field(s) invalid "
            f"({', '.join(str(e['loc'][0]) for e in exc.errors())})"
        ) from None
    log = {"step": request.step.value, "secret_id": request.secret_id, "token": request.token}
    logger.info("rotation step", extra=log)
    try:
        outcome = rotate(aws.secrets_client(), request, get_settings())
    except Exception:
        logger.exception("rotation step failed", extra=log)
        raise
    logger.info("rotation step done", extra={**log, "outcome": outcome})
    return {"step": request.step.value, "outcome": outcome}

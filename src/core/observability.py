"""The one place that configures logging and metrics for the core and the handlers."""

from __future__ import annotations

import logging

from aws_lambda_powertools import Logger, Metrics, Tracer

from core.settings import get_settings

SERVICE_NAME = "matchmaker"

logger = Logger(service=SERVICE_NAME, level=get_settings().log_level)
metrics = Metrics(namespace="Matchmaker", service=SERVICE_NAME)
# Only what the code calls: botocore (SQS, Lambda, Secrets Manager) and, below, psycopg.
# The default, patch_all, also tries a dozen libraries we never use (sqlite3 among them).
tracer = Tracer(service=SERVICE_NAME, patch_modules=("botocore",))
if not tracer.disabled:
    # SQL subsegments for queries run through conn.cursor(). X-Ray's psycopg patcher wraps
    # psycopg.connect, then fails on psycopg_pool (not installed): tolerated, as patch_all
    # always did, so that a deployed function traces exactly what it traced before.
    tracer.provider.patch(["psycopg"], raise_errors=False)  # type: ignore[call-arg]


def quiet_for_cli(level: int = logging.WARNING) -> None:
    """Command-line runs print their own progress; JSON logs would drown it."""
    logger.setLevel(level)

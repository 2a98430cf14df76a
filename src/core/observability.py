"""The one place that configures logging and metrics for the core and the handlers."""

from __future__ import annotations

import logging

from aws_lambda_powertools import Logger, Metrics, Tracer

from core.settings import get_settings

SERVICE_NAME = "matchmaker"

logger = Logger(service=SERVICE_NAME, level=get_settings().log_level)
metrics = Metrics(namespace="Matchmaker", service=SERVICE_NAME)
tracer = Tracer(service=SERVICE_NAME)


def quiet_for_cli(level: int = logging.WARNING) -> None:
    """Command-line runs print their own progress; JSON logs would drown it."""
    logger.setLevel(level)

"""The deployed stack in one process for the reliability tests: the scheduled matchmaker,
the redrive consumer and the admin API handlers, with the database reached through
Secrets Manager and the dead-letter queue in moto (as tests/integration/
test_worker_handlers.py does), and the OpenAI key in Secrets Manager pointing at the fake
OpenAI server (tests/fake_openai.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from moto import mock_aws

import core.aws
import core.settings
import handlers.api
import handlers.matchmaker
import handlers.redrive
from core.settings import Settings
from tests.integration.api_support import (
    AWS_ENV,
    FakeLambdaContext,
    database_behind_secrets,
    request,
    reset_handler_state,
)
from tests.integration.test_worker_handlers import FakeContext, load_event

if TYPE_CHECKING:
    from tests.fake_openai import FakeOpenAI

OPENAI_KEY = "sk-reliability-from-secrets-manager"


@dataclass
class Stack:
    dlq_url: str

    @property
    def settings(self) -> Settings:
        return core.settings.get_settings()

    def run_matchmaker(self, remaining_ms: int = 60_000) -> dict[str, Any]:
        """One scheduled invocation (events/matchmaker/scheduled.json)."""
        summary: dict[str, Any] = handlers.matchmaker.lambda_handler(
            load_event("matchmaker/scheduled.json"), FakeContext(remaining_ms=remaining_ms)
        )
        return summary

    def redrive(self, bodies: list[str]) -> dict[str, Any]:
        """One redrive-consumer invocation with these message bodies as SQS records."""
        batch = load_event("redrive/sqs_batch.json")
        template = batch["Records"][0]
        batch["Records"] = [
            {**template, "messageId": f"redrive-{i}", "body": body} for i, body in enumerate(bodies)
        ]
        response: dict[str, Any] = handlers.redrive.lambda_handler(batch, FakeContext())
        return response

    def admin(self, route: str, code: str) -> Any:
        """GET an admin route (events/api/<route>.json) through the API handler: 200 JSON."""
        result = handlers.api.lambda_handler(request(route, code=code), FakeLambdaContext())
        assert result["statusCode"] == 200, result
        return json.loads(result["body"])

    def receive_dead_letters(self) -> list[dict[str, Any]]:
        """Every message now visible in the dead-letter queue (received, left in flight)."""
        sqs = boto3.client("sqs")
        found: list[dict[str, Any]] = []
        while True:
            batch = sqs.receive_message(
                QueueUrl=self.dlq_url, MaxNumberOfMessages=10, VisibilityTimeout=60
            ).get("Messages", [])
            if not batch:
                return found
            found.extend(batch)

    def delete_dead_letters(self, messages: list[dict[str, Any]]) -> None:
        """What the SQS event source does with messages the consumer handled."""
        sqs = boto3.client("sqs")
        for message in messages:
            sqs.delete_message(QueueUrl=self.dlq_url, ReceiptHandle=message["ReceiptHandle"])


@contextmanager
def lambda_stack(
    monkeypatch: pytest.MonkeyPatch, db_url: str, fake: FakeOpenAI, env: dict[str, str]
) -> Iterator[Stack]:
    """moto (Secrets Manager: database credentials and the OpenAI key; SQS: the
    dead-letter queue) and the handlers' environment, with `env` on top."""
    for name, value in {**AWS_ENV, **env}.items():
        monkeypatch.setenv(name, value)
    for name in ("DATABASE_URL", "OPENAI_API_KEY", "MAX_RUNTIME_MS", "WORKER_SAFETY_MS"):
        if name not in env:
            monkeypatch.delenv(name, raising=False)
    with mock_aws():
        dlq = database_behind_secrets(monkeypatch, db_url)
        openai_secret = boto3.client("secretsmanager").create_secret(
            Name="matchmaker/openai", SecretString=json.dumps({"api_key": OPENAI_KEY})
        )
        monkeypatch.setenv("OPENAI_SECRET_ARN", openai_secret["ARN"])
        monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
        reset_handler_state()
        try:
            yield Stack(dlq)
        finally:
            reset_handler_state()

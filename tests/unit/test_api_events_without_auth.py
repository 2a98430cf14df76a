"""Every route's events/api/*_no_auth.json (what reaches the Lambda if API Gateway's
authorizer were bypassed) is refused with 401 before anything else is looked at: no
database, no AWS call is needed to say no."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

import handlers.api

EVENTS = Path(__file__).resolve().parents[2] / "events" / "api"
NO_AUTH = sorted(EVENTS.glob("*_no_auth.json"))


@dataclass
class Context:
    function_name: str = "matchmaker-ApiFunction"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:api"
    aws_request_id: str = "5e0c1d2a-0000-4000-8000-000000000001"

    def get_remaining_time_in_millis(self) -> int:
        return 29_000


def test_every_route_has_an_event_without_auth():
    routes = {json.loads(p.read_text())["routeKey"] for p in EVENTS.glob("*.json")}
    unauthenticated = {json.loads(p.read_text())["routeKey"] for p in NO_AUTH}
    assert routes == unauthenticated
    assert len(routes) == 16


@pytest.mark.parametrize("path", NO_AUTH, ids=lambda p: p.stem)
def test_an_event_without_authorizer_context_is_401(path, monkeypatch):
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "true")
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    reply = handlers.api.lambda_handler(json.loads(path.read_text()), Context())
    assert reply["statusCode"] == 401
    assert json.loads(reply["body"]) == {
        "error": "unauthorized",
        "message": "missing or invalid authorization",
    }

"""Fixtures the API's handler-level tests share: moto for the module, and handlers.api on
the test's own database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.api_support import Api, AwsFakes, api_for, aws_fakes


@pytest.fixture(scope="module")
def fakes() -> Iterator[AwsFakes]:
    with aws_fakes() as shared:
        yield shared


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch, db_url: str, fakes: AwsFakes) -> Iterator[Api]:
    """handlers.api on this test's database: DATABASE_URL set, the settings cache and the
    handler's cached connection cleared before and after, moto for SQS and Lambda."""
    with api_for(monkeypatch, db_url, fakes) as configured:
        yield configured

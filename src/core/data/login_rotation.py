"""Automatic rotation of a function's database login (ApiDbSecret, WorkerDbSecret): the
Secrets Manager rotation contract, single-user strategy.

Secrets Manager calls the rotation function four times per rotation, with one
ClientRequestToken that names the new version (staged AWSPENDING):

- createSecret: put a new password in the AWSPENDING version (once per token);
- setSecret: log in as the login user with its current password and change its own
  password (`ALTER ROLE CURRENT_USER PASSWORD <SCRAM verifier>`);
- testSecret: log in with the AWSPENDING password;
- finishSecret: move AWSCURRENT to the new version (Secrets Manager makes the old one
  AWSPREVIOUS).

Every step is idempotent: a retried step finds its work done and does nothing. Single
user, not alternating users: the login changes its own password, so the rotation function
never holds the master secret (least privilege), and the username never changes.

The database is reached directly (DB_HOST: the DB instance, never the RDS Proxy, which
only knows AWSCURRENT and would refuse the AWSPENDING password in testSecret). Passwords
never reach a log line, an exception message or the server: the server gets a SCRAM
verifier, and a failed login is reported by its SQLSTATE only.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from pydantic import BaseModel, ConfigDict, Field

from core.data.connections import DatabaseUnavailableError, connect, is_authentication_failure
from core.data.migrations import scram_verifier
from core.observability import logger
from core.settings import Settings

CURRENT = "AWSCURRENT"
PENDING = "AWSPENDING"
PREVIOUS = "AWSPREVIOUS"
PASSWORD_LENGTH = 40  # as the template's GenerateSecretString
PASSWORD_ALPHABET = string.ascii_letters + string.digits  # nothing to escape anywhere
APPLICATION_NAME = "matchmaker-rotate-login"


class RotationStep(StrEnum):
    CREATE = "createSecret"
    SET = "setSecret"
    TEST = "testSecret"
    FINISH = "finishSecret"


class RotationError(RuntimeError):
    """The rotation cannot go on; the message says why and never holds a password."""


class RotationRequest(BaseModel):
    """The event Secrets Manager sends for each step (extra keys, e.g. RotationToken, are
    ignored)."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    secret_id: str = Field(alias="SecretId", min_length=1)
    token: str = Field(alias="ClientRequestToken", min_length=1, max_length=64)
    step: RotationStep = Field(alias="Step")


class LoginCredentials(BaseModel):
    """The part of a login secret the rotation uses; other keys of the secret are kept as
    they are when the new version is written."""

    model_config = ConfigDict(extra="allow", frozen=True)

    username: str = Field(min_length=1, max_length=63)
    password: str = Field(min_length=1, repr=False)


# Who connects: (settings, username, password) -> an open connection. Tests may replace it.
Connector = Callable[[Settings, str, str], psycopg.Connection[Any]]


def connect_as(settings: Settings, username: str, password: str) -> psycopg.Connection[Any]:
    """A connection to DB_HOST/DB_PORT/DB_NAME as `username`, TLS as for every function
    (verify-full on AWS, against DB_SSLROOTCERT)."""
    url = make_conninfo(
        "",
        host=settings.db_host or "",
        port=str(settings.db_port),
        dbname=settings.db_name,
        user=username,
        password=password,
        sslmode=settings.db_sslmode or "verify-full",
    )
    return connect(url, settings, APPLICATION_NAME)


def rotate(
    client: Any, request: RotationRequest, settings: Settings, connector: Connector = connect_as
) -> str:
    """Run one step for one secret (`client`: a Secrets Manager client). Returns what was
    done, for the log; raises RotationError when the step cannot be done."""
    metadata = client.describe_secret(SecretId=request.secret_id)
    if not metadata.get("RotationEnabled"):
        raise RotationError(f"secret {metadata.get('Name')} is not enabled for rotation")
    versions: dict[str, list[str]] = metadata.get("VersionIdsToStages", {})
    stages = versions.get(request.token)
    if stages is None:
        raise RotationError(f"version {request.token} of the secret does not exist")
    if CURRENT in stages:
        return "already current"
    if PENDING not in stages:
        raise RotationError(f"version {request.token} of the secret is not staged {PENDING}")
    if request.step is RotationStep.CREATE:
        return create_secret(client, request)
    if request.step is RotationStep.SET:
        return set_secret(client, request, settings, connector)
    if request.step is RotationStep.TEST:
        return test_secret(client, request, settings, connector)
    return finish_secret(client, request, versions)


def new_password(length: int = PASSWORD_LENGTH) -> str:
    """Letters and digits from the OS's CSPRNG (40 characters: about 238 bits), made here
    rather than by GetRandomPassword, an action IAM grants only on Resource "*"."""
    return "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(length))


def create_secret(client: Any, request: RotationRequest) -> str:
    """A new password in the AWSPENDING version, unless this token already has one."""
    current = _credentials(client, request.secret_id, stage=CURRENT)
    try:
        _credentials(client, request.secret_id, stage=PENDING, version=request.token)
    except client.exceptions.ResourceNotFoundException:
        pass
    else:
        return "pending version already created"
    password = new_password()
    client.put_secret_value(
        SecretId=request.secret_id,
        ClientRequestToken=request.token,
        SecretString=json.dumps({**current.model_dump(), "password": password}),
        VersionStages=[PENDING],
    )
    return "pending version created"


def set_secret(
    client: Any, request: RotationRequest, settings: Settings, connector: Connector
) -> str:
    """The login user's password becomes the AWSPENDING one, set by the user itself with
    its current (or, after a half-finished rotation, its previous) password."""
    pending = _credentials(client, request.secret_id, stage=PENDING, version=request.token)
    current = _credentials(client, request.secret_id, stage=CURRENT)
    if pending.username != current.username:
        raise RotationError(
            f"the pending version names user {pending.username}, the current one "
            f"{current.username}: single-user rotation never changes the user"
        )
    conn = _try_login(settings, connector, pending)
    if conn is not None:
        conn.close()
        return "password already set"
    conn = _try_login(settings, connector, current)
    if conn is None:
        previous = _previous_credentials(client, request.secret_id)
        conn = _try_login(settings, connector, previous) if previous is not None else None
    if conn is None:
        raise RotationError(
            f"user {current.username} can log in with neither the {CURRENT} nor the "
            f"{PREVIOUS} password: the password was changed outside the rotation (a deploy "
            "sets it from AWSCURRENT again)"
        )
    with conn:
        # A verifier, not the password: the server (and its statement log) never sees it.
        conn.execute(
            sql.SQL("ALTER ROLE CURRENT_USER PASSWORD {}").format(
                sql.Literal(scram_verifier(pending.password))
            )
        )
    return "password set"


def test_secret(
    client: Any, request: RotationRequest, settings: Settings, connector: Connector
) -> str:
    """The AWSPENDING password logs in, as its user."""
    pending = _credentials(client, request.secret_id, stage=PENDING, version=request.token)
    conn = _try_login(settings, connector, pending)
    if conn is None:
        raise RotationError(f"user {pending.username} cannot log in with the {PENDING} password")
    with conn:
        row = conn.execute("SELECT current_user").fetchone()
    if row is None or row[0] != pending.username:
        raise RotationError(f"the {PENDING} password logged in as another user")
    return "pending password logs in"


def finish_secret(client: Any, request: RotationRequest, versions: dict[str, list[str]]) -> str:
    """AWSCURRENT moves to the new version."""
    current_version = next((v for v, stages in versions.items() if CURRENT in stages), None)
    if current_version == request.token:
        return "already current"
    client.update_secret_version_stage(
        SecretId=request.secret_id,
        VersionStage=CURRENT,
        MoveToVersionId=request.token,
        RemoveFromVersionId=current_version,
    )
    return "rotation finished"


def _credentials(
    client: Any, secret_id: str, *, stage: str, version: str | None = None
) -> LoginCredentials:
    arguments = {"SecretId": secret_id, "VersionStage": stage}
    if version is not None:
        arguments["VersionId"] = version
    value = client.get_secret_value(**arguments).get("SecretString")
    try:
        return LoginCredentials.model_validate_json(value or "")
    except ValueError:
        # the validation error would quote the input: the secret
        raise RotationError(
            f"the {stage} version of the secret is not JSON with a username and a password"
        ) from None


def _previous_credentials(client: Any, secret_id: str) -> LoginCredentials | None:
    try:
        return _credentials(client, secret_id, stage=PREVIOUS)
    except client.exceptions.ResourceNotFoundException:
        return None


def _try_login(
    settings: Settings, connector: Connector, credentials: LoginCredentials
) -> psycopg.Connection[Any] | None:
    """A connection as the user with this password, or None when the server refuses the
    password. Any other failure (network, TLS, a missing CA file) is raised: it says
    nothing about the password."""
    try:
        return connector(settings, credentials.username, credentials.password)
    except DatabaseUnavailableError as exc:
        if is_authentication_failure(exc):
            logger.info("login refused", extra={"user": credentials.username})
            return None
        raise

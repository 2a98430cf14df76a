"""The one settings object: where the database comes from, and the variables it reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.data.connections import DatabaseUnavailableError, resolve_database_url
from core.settings import Settings

LOCAL_URL = "postgresql://someone:secret@127.0.0.1:5432/matchmaker"


def settings_from(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    """Settings read from exactly these variables (the ones under test start unset)."""
    for name in (
        "DATABASE_URL",
        "DB_SECRET_ARN",
        "AWS_LAMBDA_FUNCTION_NAME",
        "AWS_SAM_LOCAL",
        "MIGRATIONS_DIR",
        "MATCHMAKER_API_WORKERS",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def test_a_deployed_function_refuses_database_url_without_a_secret(monkeypatch):
    """In Lambda on AWS, DATABASE_URL is never used: without DB_SECRET_ARN the function
    says what is missing instead of connecting somewhere a variable points to."""
    settings = settings_from(
        monkeypatch, AWS_LAMBDA_FUNCTION_NAME="matchmaker-api", DATABASE_URL=LOCAL_URL
    )
    assert settings.deployed
    with pytest.raises(DatabaseUnavailableError, match="DB_SECRET_ARN is not set"):
        resolve_database_url(settings)


def test_a_deployed_function_reads_the_secret_even_when_database_url_is_set(monkeypatch):
    """DB_SECRET_ARN wins in a deployed function: the secret is what gets read."""
    settings = settings_from(
        monkeypatch,
        AWS_LAMBDA_FUNCTION_NAME="matchmaker-api",
        DATABASE_URL=LOCAL_URL,
        DB_SECRET_ARN="arn:aws:secretsmanager:us-east-1:123456789012:secret:db",
    )
    read: list[str] = []

    def fake_secret(settings: Settings) -> str:
        read.append(settings.db_secret_arn or "")
        return "postgresql://from-the-secret"

    monkeypatch.setattr("core.data.connections._url_from_secret", fake_secret)
    assert resolve_database_url(settings) == "postgresql://from-the-secret"
    assert read == ["arn:aws:secretsmanager:us-east-1:123456789012:secret:db"]


def test_sam_local_invoke_honours_database_url(monkeypatch):
    """Under `sam local invoke` (AWS_SAM_LOCAL=true) the function is not deployed, so the
    --env-vars file's DATABASE_URL is used (the template's secret cannot be read there)."""
    settings = settings_from(
        monkeypatch,
        AWS_LAMBDA_FUNCTION_NAME="ApiFunction",
        AWS_SAM_LOCAL="true",
        DATABASE_URL=LOCAL_URL,
        DB_SECRET_ARN="",
    )
    assert not settings.deployed
    assert resolve_database_url(settings) == LOCAL_URL


def test_outside_lambda_database_url_is_used(monkeypatch):
    settings = settings_from(monkeypatch, DATABASE_URL=LOCAL_URL)
    assert not settings.deployed
    assert resolve_database_url(settings) == LOCAL_URL


def test_tooling_and_migration_variables_go_through_the_settings_object(monkeypatch, tmp_path):
    settings = settings_from(monkeypatch, MIGRATIONS_DIR=str(tmp_path), MATCHMAKER_API_WORKERS="3")
    assert settings.migrations_dir == Path(tmp_path)
    assert settings.api_workers == 3
    with pytest.raises(ValueError, match=r"api_workers|MATCHMAKER_API_WORKERS"):
        settings_from(monkeypatch, MATCHMAKER_API_WORKERS="many")
    with pytest.raises(ValueError, match="less than or equal to 32"):
        settings_from(monkeypatch, MATCHMAKER_API_WORKERS="33")


def test_empty_values_mean_unset(monkeypatch):
    """The template declares DATABASE_URL (and the ARNs) as "" so sam local invoke may set
    them: empty must read as unset, not as an empty connection string."""
    settings = settings_from(monkeypatch, DATABASE_URL="", DB_SECRET_ARN="")
    assert settings.database_url is None
    assert settings.db_secret_arn is None

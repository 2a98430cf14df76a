"""One typed settings object, read from the environment (pydantic-settings)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_pgdata() -> Path:
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "matchmaker" / "pgdata"


class Settings(BaseSettings):
    """Every knob of the service. Environment variable names are the upper-case field names."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False, frozen=True)

    # Where the data lives: DATABASE_URL, or an embedded PostgreSQL in MATCHMAKER_PGDATA.
    database_url: SecretStr | None = None
    pgdata: Path = Field(
        default_factory=_default_pgdata,
        validation_alias=AliasChoices("MATCHMAKER_PGDATA", "pgdata"),
    )

    # Worker: the legacy system processed batches of 20 within 45 s.
    batch_size: Annotated[int, Field(ge=1, le=5000)] = 20
    max_runtime_ms: Annotated[int, Field(ge=1000, le=900_000)] = 45_000
    lease_seconds: Annotated[float, Field(gt=0, le=3600)] = 120.0
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 5
    # A backlog (a full batch came back) is claimed in one bulk batch sized to take about
    # BULK_BATCH_SECONDS: one matrix pass over thousands of users instead of hundreds of
    # small batches. 0 turns bulk batches off.
    bulk_batch_seconds: Annotated[float, Field(ge=0, le=600)] = 10.0
    bulk_max_rows: Annotated[int, Field(ge=1, le=200_000)] = 25_000
    # Fan-out: a run that finds more than FANOUT_BACKLOG_PER_WORKER queued users per
    # running worker starts more runs, up to MAX_PARALLEL_WORKERS in all (the template
    # sets it to the reserved concurrency; each run holds one database connection).
    max_parallel_workers: Annotated[int, Field(ge=1, le=1000)] = 1
    fanout_backlog_per_worker: Annotated[int, Field(ge=1)] = 5_000
    backoff_base_s: Annotated[float, Field(ge=0, le=3600)] = 2.0
    backoff_max_s: Annotated[float, Field(ge=0, le=86_400)] = 300.0

    # Database session limits: a statement never outlives the lease of the rows it serves.
    statement_timeout_ms: Annotated[int, Field(ge=100, le=3_600_000)] = 30_000
    connect_timeout_s: Annotated[int, Field(ge=1, le=120)] = 5

    log_level: str = "INFO"
    # db/migrations of the checkout unless set (the Lambda artifact sets it).
    migrations_dir: Path | None = None

    # AWS: the database credentials come from Secrets Manager, never from a plain variable.
    db_secret_arn: str | None = None
    # Migrate function only: the secrets of the API's and the worker's login users, which
    # it creates or updates (with DB_SECRET_ARN being the master secret).
    db_api_secret_arn: str | None = None
    db_worker_secret_arn: str | None = None
    db_host: str | None = None
    db_port: Annotated[int, Field(ge=1, le=65535)] = 5432
    db_name: str = "matchmaker"
    # TLS to the database. Unset: verify-full (certificate chain and host name) for a
    # connection made from DB_SECRET_ARN, libpq's default for DATABASE_URL; a deployed
    # function refuses disable/allow/prefer. Unix sockets never use TLS.
    db_sslmode: (
        Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None
    ) = None
    # The CA certificates that verify the server: unset, the Amazon root CAs shipped with
    # the code (RDS Proxy); a DB instance reached directly needs the RDS CA bundle here.
    db_sslrootcert: Path | None = None
    dead_letter_queue_url: str | None = None
    matchmaker_function_name: str | None = None
    # The API sends the event code here after a write that queued work; the matchmaker
    # consumes it (an event source mapping) and serves that event first.
    wake_queue_url: str | None = None
    # A run woken by the wake queue lingers after the queue ran dry: it polls for new rows
    # every WAKE_POLL_SECONDS until it has found nothing for WAKE_LINGER_SECONDS (0: it
    # exits at once). While it lingers it holds a presence lease of
    # WAKE_PRESENCE_LEASE_SECONDS, renewed at every poll, and the API sends no wakes.
    wake_linger_seconds: Annotated[float, Field(ge=0, le=60)] = 1.5
    wake_poll_seconds: Annotated[float, Field(gt=0, le=5)] = 0.1
    wake_presence_lease_seconds: Annotated[float, Field(gt=0, le=60)] = 3.0
    # The Lambda's own limit minus this is the latest a worker may still be working.
    worker_safety_ms: Annotated[int, Field(ge=0, le=120_000)] = 15_000
    # OpenAI embeddings for events whose embedder is "openai": the key from Secrets Manager
    # (OPENAI_SECRET_ARN, in AWS) or OPENAI_API_KEY (local runs); without one, the local
    # embedder serves every event.
    openai_secret_arn: str | None = None
    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    openai_embedding_model: str = "text-embedding-3-small"
    openai_embedding_dimensions: Annotated[int, Field(ge=16, le=3072)] = 256
    openai_chat_model: str = "gpt-4o-mini"
    # Icebreakers are extras: at most this many chat calls per worker run.
    icebreakers_per_run: Annotated[int, Field(ge=0, le=10_000)] = 200
    # The provider's circuit breaker: transient faults for this long open it (a bad key,
    # a 403 or an unknown model open it at once); open, its events are matched with the
    # local embedder, and one probe per interval checks whether it is back.
    provider_breaker_window_s: Annotated[float, Field(ge=0, le=86_400)] = 120.0
    provider_probe_interval_s: Annotated[float, Field(ge=0, le=86_400)] = 60.0
    # Users of a batch the provider failed (before the breaker opens) wait this long, and
    # at least until the run ends, before they are claimed again; the attempt does not
    # count.
    provider_defer_s: Annotated[float, Field(ge=0, le=3600)] = 10.0

    # Legacy synchronous trigger (useQueue: false) only for events up to this size.
    sync_match_max_attendees: Annotated[int, Field(ge=1, le=5000)] = 500

    # Where the code runs: Lambda sets AWS_LAMBDA_FUNCTION_NAME, `sam local invoke` also
    # AWS_SAM_LOCAL=true. A deployed function never honours DATABASE_URL (its credentials
    # come from Secrets Manager); under sam local invoke it does.
    aws_lambda_function_name: str | None = None
    aws_sam_local: bool = False

    # Local tooling (`matchmaker serve`, `matchmaker smoke`); never read in Lambda.
    api_workers: Annotated[int, Field(ge=1, le=32)] = Field(
        default=8, validation_alias=AliasChoices("MATCHMAKER_API_WORKERS", "api_workers")
    )
    service_token: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("MATCHMAKER_SERVICE_TOKEN", "service_token"),
    )
    admin_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("MATCHMAKER_ADMIN_TOKEN", "admin_token")
    )

    @property
    def deployed(self) -> bool:
        """Running in a Lambda on AWS (not under sam local invoke)."""
        return bool(self.aws_lambda_function_name) and not self.aws_sam_local

    @field_validator(
        "database_url",
        "db_secret_arn",
        "openai_secret_arn",
        "db_api_secret_arn",
        "db_worker_secret_arn",
        "db_sslmode",
        "db_sslrootcert",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # The template declares these as "" so that `sam local invoke --env-vars` may set
        # them: an empty value means "not set", never an empty connection string or ARN.
        return None if value == "" else value

    @model_validator(mode="after")
    def _presence_outlives_a_poll(self) -> Settings:
        if self.wake_presence_lease_seconds <= 2 * self.wake_poll_seconds:
            raise ValueError(
                "WAKE_PRESENCE_LEASE_SECONDS must exceed twice WAKE_POLL_SECONDS, or a "
                "lingering run's lease would lapse between its polls (and wakes be sent)"
            )
        return self

    @model_validator(mode="after")
    def _timeouts_fit_the_lease(self) -> Settings:
        if self.statement_timeout_ms >= self.lease_seconds * 1000:
            raise ValueError(
                "STATEMENT_TIMEOUT_MS must be below LEASE_SECONDS, or a slow statement could "
                "outlive the lease of the rows it is working on"
            )
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()

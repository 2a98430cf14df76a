"""Which embedder serves an event: OpenAI when the event asks for it, a key is configured
and the provider's circuit breaker (core.embedding.breaker) is closed; the local embedder
otherwise. All vectors of an event come from one embedder (the worker re-embeds the event
when its effective embedder changes)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
from botocore.exceptions import BotoCoreError, ClientError

from core import aws
from core.embedding.local import LocalEmbedder
from core.models import EventRecord, Profile
from core.observability import logger
from core.settings import Settings

if TYPE_CHECKING:
    import openai

    from core.embedding.openai_provider import OpenAIEmbedder

DEFAULT_BASE_URL = "https://api.openai.com/v1"


class BreakerView(Protocol):
    """What the status needs of the provider's circuit breaker (core.queue.breaker)."""

    @property
    def state(self) -> str: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def failing_since(self) -> datetime | None: ...

    @property
    def opened_at(self) -> datetime | None: ...


def openai_embedder_key(model: str, dimensions: int) -> str:
    """The vectors' embedder key (quantisation is part of it: vectors from another scheme
    must not mix)."""
    return f"openai:{model}:d{dimensions}:q1"


def configured_breaker_key(settings: Settings) -> str | None:
    """The circuit breaker of this deployment's OpenAI configuration, without loading the
    SDK; None without a key."""
    key = openai_api_key(settings)
    if not key:
        return None
    return provider_config_key(
        settings.openai_embedding_model,
        settings.openai_embedding_dimensions,
        settings.openai_base_url,
        key,
    )


def provider_config_key(model: str, dimensions: int, base_url: str | None, api_key: str) -> str:
    """A provider configuration, whose circuit breaker is kept apart: model, dimensions,
    endpoint and a fingerprint of the key (never the key itself), so a new key starts
    with a fresh, closed breaker."""
    fingerprint = hashlib.sha256(api_key.encode()).hexdigest()[:12]
    endpoint = (base_url or DEFAULT_BASE_URL).rstrip("/")
    return f"openai:{model}:d{dimensions}@{endpoint}#key-{fingerprint}"


class Embedder(Protocol):
    """What the worker needs of an embedder."""

    @property
    def key(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(
        self, profiles: list[Profile], deadline: float | None = None
    ) -> npt.NDArray[np.int16]: ...


class OpenAISecretError(RuntimeError):
    """OPENAI_SECRET_ARN cannot be read, or holds JSON that is malformed."""


def openai_api_key(settings: Settings) -> str | None:
    """OPENAI_API_KEY, else the key in the secret OPENAI_SECRET_ARN (a plain key or
    {"api_key": "..."}), else None. Raises OpenAISecretError when the secret cannot be read."""
    if settings.openai_api_key is not None:
        return settings.openai_api_key.get_secret_value()
    if not settings.openai_secret_arn:
        return None
    try:
        # core.aws reads it with botocore (no boto3) and keeps it 5 minutes across warm
        # invocations, as it does the database secret.
        secret: Any = aws.secrets.get(settings.openai_secret_arn)
        if secret.strip().startswith("{"):
            secret = json.loads(secret)
    except (BotoCoreError, ClientError) as exc:
        raise OpenAISecretError(f"cannot read the secret ({type(exc).__name__})") from exc
    except json.JSONDecodeError as exc:
        raise OpenAISecretError("the secret is not valid JSON") from exc
    if isinstance(secret, dict):
        secret = secret.get("api_key")
    return str(secret) if secret else None


@cache
def openai_client(api_key: str, base_url: str | None) -> openai.OpenAI:
    # Imported here: the SDK costs ~0.5 s at cold start, and only OpenAI events need it.
    import openai  # noqa: PLC0415

    # Retries are ours (they honour the run's deadline), so the client's are off.
    return openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=0)


def configured_openai_embedder(settings: Settings) -> OpenAIEmbedder | None:
    """The OpenAI embedder of this deployment, or None without a key."""
    key = openai_api_key(settings)
    if not key:
        return None
    from core.embedding.openai_provider import OpenAIEmbedder  # noqa: PLC0415

    return OpenAIEmbedder(
        openai_client(key, settings.openai_base_url),
        model=settings.openai_embedding_model,
        dimensions=settings.openai_embedding_dimensions,
    )


def embedder_for_event(event: EventRecord, settings: Settings) -> Embedder:
    """The embedder that effective_embedder (the one rule) chooses for the event, built; the
    worker swaps in the local embedder while the provider's circuit breaker is open.
    Raises OpenAISecretError when the event asks for OpenAI and the secret cannot be read
    (its batches fail until it can)."""
    choice = effective_embedder(event, settings)
    if choice.unreadable is not None:
        raise choice.unreadable
    if choice.effective == "openai":
        embedder = configured_openai_embedder(settings)
        if embedder is not None:
            return embedder
    if choice.configured == "openai":
        logger.warning(
            "event asks for OpenAI embeddings but no key is configured; using the local embedder",
            extra={"event": event.code},
        )
    return LocalEmbedder()


@dataclass(frozen=True)
class EmbedderChoice:
    """Which embedder serves an event and why (effective_embedder), told without building
    it; embedder_for_event builds it."""

    configured: Literal["local", "openai"]
    effective: Literal["local", "openai"] | None  # None: the OpenAI secret cannot be read
    reason: str
    # the provider's circuit breaker, when the event asks for OpenAI and a key is set
    breaker: Literal["closed", "open"] | None = None
    since: datetime | None = None  # when the breaker opened
    # why the secret cannot be read (effective None): embedder_for_event raises it
    unreadable: OpenAISecretError | None = field(default=None, repr=False, compare=False)


def effective_embedder(
    event: EventRecord,
    settings: Settings,
    breaker_of: Callable[[str], BreakerView | None] | None = None,
) -> EmbedderChoice:
    """Report (read-only) which embedder serves the event and why, by the same rule as
    the worker: OpenAI when the event asks for it, a key is configured and (given
    `breaker_of`, which reads a configuration's breaker) the provider's circuit breaker
    is closed."""
    configured = event.settings.embedder
    if configured != "openai":
        return EmbedderChoice(configured, "local", "the event asks for the local embedder")
    source = (
        "OPENAI_API_KEY"
        if settings.openai_api_key is not None
        else "the secret OPENAI_SECRET_ARN"
        if settings.openai_secret_arn
        else None
    )
    try:
        key = openai_api_key(settings)
    except OpenAISecretError as exc:
        return EmbedderChoice(
            configured,
            None,
            f"the event asks for OpenAI but {source} cannot be read "
            f"({exc}): its batches fail until it can",
            unreadable=exc,
        )
    if key and breaker_of is not None:
        breaker = breaker_of(
            provider_config_key(
                settings.openai_embedding_model,
                settings.openai_embedding_dimensions,
                settings.openai_base_url,
                key,
            )
        )
        if breaker is not None and breaker.state == "open":
            return EmbedderChoice(
                configured,
                "local",
                "the event asks for OpenAI but the provider's circuit breaker is open "
                f"({breaker.reason}): the local embedder serves the whole event until a "
                f"probe (every {settings.provider_probe_interval_s:g} s) succeeds",
                breaker="open",
                since=breaker.opened_at,
            )
        if breaker is not None and breaker.failing_since is not None:
            return EmbedderChoice(
                configured,
                "openai",
                f"the event asks for OpenAI; the provider has been failing since "
                f"{breaker.failing_since.isoformat(timespec='seconds')} ({breaker.reason}); "
                f"the breaker opens after {settings.provider_breaker_window_s:g} s of faults",
                breaker="closed",
            )
    if key:
        return EmbedderChoice(
            configured,
            "openai",
            f"the event asks for OpenAI ({settings.openai_embedding_model}, "
            f"{settings.openai_embedding_dimensions} dimensions) and {source} holds a key",
            breaker="closed" if breaker_of is not None else None,
        )
    missing = (
        f"{source} holds no key"
        if source
        else "no OpenAI key is configured (OPENAI_API_KEY or OPENAI_SECRET_ARN)"
    )
    reason = f"the event asks for OpenAI but {missing}: the local embedder serves it"
    return EmbedderChoice(configured, "local", reason)

"""Which embedder serves an event: OpenAI when the event asks for it and a key is
configured, the local embedder otherwise. All vectors of an event come from one embedder
(the worker re-embeds the event when its effective embedder changes)."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
from aws_lambda_powertools.utilities import parameters

from core.embedding.local import LocalEmbedder
from core.models import EventRecord, Profile
from core.observability import logger
from core.settings import Settings

if TYPE_CHECKING:
    import openai


class Embedder(Protocol):
    """What the worker needs of an embedder."""

    @property
    def key(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(
        self, profiles: list[Profile], deadline: float | None = None
    ) -> npt.NDArray[np.int16]: ...


def openai_api_key(settings: Settings) -> str | None:
    if settings.openai_api_key is not None:
        return settings.openai_api_key.get_secret_value()
    if settings.openai_secret_arn:
        # Cached for 5 minutes across warm invocations; a plain key or {"api_key": "..."}.
        secret: Any = parameters.get_secret(settings.openai_secret_arn, max_age=300)
        if isinstance(secret, str) and secret.strip().startswith("{"):
            secret = parameters.get_secret(
                settings.openai_secret_arn, transform="json", max_age=300
            )
        if isinstance(secret, dict):
            secret = secret.get("api_key")
        return str(secret) if secret else None
    return None


@cache
def openai_client(api_key: str, base_url: str | None) -> openai.OpenAI:
    # Imported here: the SDK costs ~0.5 s at cold start, and only OpenAI events need it.
    import openai  # noqa: PLC0415

    # Retries are ours (they honour the run's deadline), so the client's are off.
    return openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=0)


def embedder_for_event(event: EventRecord, settings: Settings) -> Embedder:
    if event.settings.embedder == "openai":
        key = openai_api_key(settings)
        if key:
            from core.embedding.openai_provider import OpenAIEmbedder  # noqa: PLC0415

            return OpenAIEmbedder(
                openai_client(key, settings.openai_base_url),
                model=settings.openai_embedding_model,
                dimensions=settings.openai_embedding_dimensions,
            )
        logger.warning(
            "event asks for OpenAI embeddings but no key is configured; using the local embedder",
            extra={"event": event.code},
        )
    return LocalEmbedder()

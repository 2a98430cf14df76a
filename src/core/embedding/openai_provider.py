"""OpenAI embeddings for the four profile blocks, with the same int16 output as the local
embedder (so scores stay exact and symmetric whatever produced the vectors).

Cheap: a profile is four short texts (interests, seeking, offering, title + bio); empty
texts cost no call; identical texts in a batch are sent once; many texts go in one
request. Unchanged profiles are never re-embedded at all: vectors are stored per
(profile, embedder key, content hash). Bounded: every request has a timeout, 429 / 5xx /
timeouts are retried with backoff that honours Retry-After, and nothing is attempted
past the caller's deadline, so one worker run cannot outlive its Lambda waiting on the
API.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import openai
from aws_lambda_powertools.metrics import MetricUnit

from core.embedding.errors import EmbeddingError, ProviderUnavailableError
from core.embedding.vectors import BLOCKS, quantize_blocks
from core.models import Profile
from core.observability import MetricName, logger, metrics

DEFAULT_MODEL = "text-embedding-3-small"
DEFAULT_DIMENSIONS = 256
# The embeddings endpoint takes up to 2,048 inputs and ~300k tokens per request; our
# texts are short (tags, a bio of at most 4,000 characters ≈ 1,000 tokens).
MAX_INPUTS_PER_REQUEST = 512
MAX_CHARS_PER_REQUEST = 600_000
MAX_RETRY_AFTER_S = 30.0
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 8.0


def profile_texts(profile: Profile) -> list[str]:
    """The four texts of a profile, in BLOCKS order ('' for an empty block)."""
    texts = [
        "; ".join(profile.interests),
        "; ".join(profile.seeking),
        "; ".join(profile.offering),
        " — ".join(part for part in (profile.title, profile.bio) if part),
    ]
    assert len(texts) == len(BLOCKS)
    return texts


class OpenAIEmbedder:
    def __init__(
        self,
        client: openai.OpenAI,
        *,
        model: str = DEFAULT_MODEL,
        dimensions: int = DEFAULT_DIMENSIONS,
        max_attempts: int = 4,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.model = model
        self.dimensions = dimensions
        self.max_attempts = max_attempts
        self.clock = clock
        self.sleep = sleep
        self.requests = 0
        self.tokens = 0

    @property
    def key(self) -> str:
        # Quantisation is part of the key: vectors from another scheme must not mix.
        return f"openai:{self.model}:d{self.dimensions}:q1"

    @property
    def dim(self) -> int:
        return len(BLOCKS) * self.dimensions

    def embed(
        self, profiles: Sequence[Profile], deadline: float | None = None
    ) -> npt.NDArray[np.int16]:
        texts = [profile_texts(p) for p in profiles]
        unique = sorted({t for row in texts for t in row if t.strip()})
        vectors = self._embed_texts(unique, deadline)
        dense = np.zeros((len(profiles), len(BLOCKS), self.dimensions), dtype=np.float64)
        for i, row in enumerate(texts):
            for b, text in enumerate(row):
                if text.strip():
                    dense[i, b] = vectors[text]
        return quantize_blocks(dense)

    def _embed_texts(self, texts: list[str], deadline: float | None) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for chunk in _chunks(texts):
            for text, vector in zip(chunk, self._request(chunk, deadline), strict=True):
                out[text] = vector
        return out

    def _request(self, texts: list[str], deadline: float | None) -> list[np.ndarray]:
        try:
            return self._attempts(texts, deadline)
        except EmbeddingError:
            metrics.add_metric(name=MetricName.PROVIDER_FAULTS, unit=MetricUnit.Count, value=1)
            raise

    def _attempts(self, texts: list[str], deadline: float | None) -> list[np.ndarray]:
        for attempt in range(1, self.max_attempts + 1):
            timeout = self._timeout(deadline)
            try:
                self.requests += 1
                response = self.client.with_options(
                    timeout=timeout, max_retries=0
                ).embeddings.create(model=self.model, input=texts, dimensions=self.dimensions)
                return self._vectors(response, len(texts))
            except (
                openai.RateLimitError,
                openai.InternalServerError,
                openai.APITimeoutError,
                openai.APIConnectionError,
            ) as exc:
                wait = _wait_before_retry(exc, attempt)
                if attempt == self.max_attempts or not self._has_time(deadline, wait):
                    raise ProviderUnavailableError(
                        f"embeddings API unavailable after {attempt} attempt(s): "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                logger.warning("embeddings API retry", extra={"attempt": attempt, "wait_s": wait})
                metrics.add_metric(name=MetricName.PROVIDER_RETRIES, unit=MetricUnit.Count, value=1)
                self.sleep(wait)
            except openai.APIStatusError as exc:  # 4xx other than 429: retrying will not help
                raise EmbeddingError(f"embeddings API rejected the request: {exc}") from exc
            except (openai.APIResponseValidationError, ValueError) as exc:
                # ValueError covers invalid JSON and "No embedding data received"
                raise EmbeddingError(f"malformed answer from the embeddings API: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _vectors(self, response: Any, expected: int) -> list[np.ndarray]:
        data = sorted(response.data, key=lambda item: item.index)
        if len(data) != expected:
            raise EmbeddingError(
                f"embeddings API returned {len(data)} vectors for {expected} texts"
            )
        usage = getattr(response, "usage", None)
        self.tokens += int(getattr(usage, "total_tokens", 0) or 0)
        vectors = []
        for item in data:
            vector = np.asarray(item.embedding, dtype=np.float64)
            if vector.shape != (self.dimensions,) or not np.all(np.isfinite(vector)):
                raise EmbeddingError(
                    f"embeddings API returned a vector of {vector.size} dimensions, "
                    f"expected {self.dimensions}"
                )
            vectors.append(vector)
        return vectors

    def _timeout(self, deadline: float | None) -> float:
        per_request = 20.0
        if deadline is None:
            return per_request
        left = deadline - self.clock()
        if left <= 0.5:
            raise EmbeddingError("no time left in this run for the embeddings API")
        return min(per_request, left)

    def _has_time(self, deadline: float | None, wait: float) -> bool:
        return deadline is None or self.clock() + wait + 1.0 < deadline


def _wait_before_retry(exc: Exception, attempt: int) -> float:
    """Retry-After as the provider asked (never earlier; a little later to spread
    clients), else capped exponential backoff with full jitter."""
    asked = _retry_after(exc)
    if asked is not None:
        return asked * (1 + random.random() / 10)  # noqa: S311 - jitter, not cryptography
    backoff = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2.0 ** (attempt - 1))
    return float(backoff * (0.5 + random.random() / 2))  # noqa: S311


def _retry_after(exc: Exception) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    value = headers.get("retry-after")
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None


def _chunks(texts: list[str]) -> list[list[str]]:
    chunks: list[list[str]] = []
    current: list[str] = []
    chars = 0
    for text in texts:
        if current and (
            len(current) >= MAX_INPUTS_PER_REQUEST or chars + len(text) > MAX_CHARS_PER_REQUEST
        ):
            chunks.append(current)
            current, chars = [], 0
        current.append(text)
        chars += len(text)
    if current:
        chunks.append(current)
    return chunks

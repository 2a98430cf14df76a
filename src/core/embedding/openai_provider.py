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

from core.embedding.errors import (
    EmbeddingError,
    InputRejectedError,
    MalformedAnswerError,
    OutOfTimeError,
    ProviderRejectedError,
    ProviderUnavailableError,
)
from core.embedding.selection import openai_embedder_key, provider_config_key
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
        return openai_embedder_key(self.model, self.dimensions)

    @property
    def breaker_key(self) -> str:
        """The provider configuration whose circuit breaker this embedder answers to."""
        return provider_config_key(
            self.model, self.dimensions, str(self.client.base_url), str(self.client.api_key)
        )

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
        except EmbeddingError as exc:  # every class counts; the log line names it
            metrics.add_metric(name=MetricName.PROVIDER_FAULTS, unit=MetricUnit.Count, value=1)
            logger.warning(
                "embeddings API fault",
                extra={"status": exc.status, "fault": exc.fault, "error": type(exc).__name__},
            )
            raise

    def _attempts(self, texts: list[str], deadline: float | None) -> list[np.ndarray]:
        for attempt in range(1, self.max_attempts + 1):
            timeout = self._timeout(deadline)
            try:
                self.requests += 1
                metrics.add_metric(
                    name=MetricName.PROVIDER_REQUESTS, unit=MetricUnit.Count, value=1
                )
                metrics.add_metric(
                    name=MetricName.PROVIDER_INPUTS, unit=MetricUnit.Count, value=len(texts)
                )
                response = self.client.with_options(
                    timeout=timeout, max_retries=0
                ).embeddings.create(model=self.model, input=texts, dimensions=self.dimensions)
                return self._vectors(response, len(texts))
            except Exception as raw:
                error = classify(raw)
                # A malformed answer is not retried at once: it counts towards the breaker
                # window like an outage, and the batch is deferred.
                if not isinstance(error, ProviderUnavailableError) or isinstance(
                    error, MalformedAnswerError
                ):
                    if error is raw:
                        raise
                    raise error from raw
                wait = _wait_before_retry(raw, attempt)
                if attempt == self.max_attempts or not self._has_time(deadline, wait):
                    raise type(error)(
                        f"embeddings API unavailable after {attempt} attempt(s): {error}",
                        status=error.status,
                    ) from raw
                logger.warning(
                    "embeddings API retry",
                    extra={
                        "attempt": attempt,
                        "wait_s": round(wait, 3),
                        "status": error.status,
                        "fault": error.fault,
                        "error": type(raw).__name__,
                    },
                )
                metrics.add_metric(name=MetricName.PROVIDER_RETRIES, unit=MetricUnit.Count, value=1)
                self.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def _vectors(self, response: Any, expected: int) -> list[np.ndarray]:
        items = getattr(response, "data", None)
        if not isinstance(items, list):
            raise MalformedAnswerError(
                "malformed answer from the embeddings API: not an embeddings list "
                f"(got {_describe_body(response)})"
            )
        if len(items) != expected:
            raise MalformedAnswerError(
                f"malformed answer from the embeddings API: returned {len(items)} vectors "
                f"for {expected} texts"
            )
        try:
            data = sorted(items, key=lambda item: item.index)
        except (AttributeError, TypeError) as exc:
            raise MalformedAnswerError(
                f"malformed answer from the embeddings API: items without an index ({exc})"
            ) from exc
        if [item.index for item in data] != list(range(expected)):
            raise MalformedAnswerError(
                "malformed answer from the embeddings API: the vector indexes are not "
                f"0..{expected - 1}"
            )
        usage = getattr(response, "usage", None)
        tokens = int(getattr(usage, "total_tokens", 0) or 0)
        self.tokens += tokens
        if tokens:
            metrics.add_metric(name=MetricName.PROVIDER_TOKENS, unit=MetricUnit.Count, value=tokens)
        vectors = []
        for item in data:
            try:
                vector = np.asarray(item.embedding, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise MalformedAnswerError(
                    f"malformed answer from the embeddings API: vector {item.index} is not "
                    f"a list of numbers ({exc})"
                ) from exc
            if vector.shape != (self.dimensions,):
                raise MalformedAnswerError(
                    "malformed answer from the embeddings API: returned a vector of "
                    f"{vector.size} dimensions, expected {self.dimensions} (vector {item.index})"
                )
            if not np.all(np.isfinite(vector)):
                bad = int(np.count_nonzero(~np.isfinite(vector)))
                raise MalformedAnswerError(
                    f"malformed answer from the embeddings API: vector {item.index} has "
                    f"{bad} NaN or infinite value(s)"
                )
            vectors.append(vector)
        return vectors

    def probe(self, deadline: float | None = None) -> None:
        """One request of one short text, no retries (the circuit breaker's half-open
        probe): returns when the provider answered well, raises the classified error."""
        attempts, self.max_attempts = self.max_attempts, 1
        try:
            self._request(["probe"], deadline)
        finally:
            self.max_attempts = attempts

    def _timeout(self, deadline: float | None) -> float:
        per_request = 20.0
        if deadline is None:
            return per_request
        left = deadline - self.clock()
        if left <= 0.5:
            raise OutOfTimeError("no time left in this run for the embeddings API")
        return min(per_request, left)

    def _has_time(self, deadline: float | None, wait: float) -> bool:
        return deadline is None or self.clock() + wait + 1.0 < deadline


# Error codes and statuses by which a provider refuses an input rather than the request.
INPUT_ERROR_CODES = frozenset(
    {"context_length_exceeded", "content_policy_violation", "content_filter", "invalid_input"}
)
INPUT_STATUSES = frozenset({400, 413, 422})


def classify(exc: Exception) -> EmbeddingError:
    """The one place a provider outcome is classified (see core.embedding.errors)."""
    if isinstance(exc, EmbeddingError):
        return exc
    name = type(exc).__name__
    if isinstance(exc, openai.APITimeoutError | openai.APIConnectionError):
        return ProviderUnavailableError(f"{name}: {exc}")
    if isinstance(exc, openai.APIStatusError):
        return _classify_status(exc)
    if isinstance(exc, AttributeError | TypeError):
        # the SDK hands back a body that is not JSON (an HTML page from a proxy) as text,
        # then fails reading it as an embeddings list
        return MalformedAnswerError(
            "malformed answer from the embeddings API: the body is not an embeddings JSON "
            f"object (an HTML or text page?): {name}: {exc}"
        )
    if isinstance(exc, openai.APIResponseValidationError | ValueError):
        # invalid JSON, "No embedding data received"
        return MalformedAnswerError(f"malformed answer from the embeddings API: {name}: {exc}")
    return ProviderUnavailableError(f"{name}: {exc}")


def _classify_status(exc: openai.APIStatusError) -> EmbeddingError:
    status, name = exc.status_code, type(exc).__name__
    if status == 429 or status >= 500:
        return ProviderUnavailableError(f"HTTP {status} {name}: {exc}", status=status)
    if status in INPUT_STATUSES and _blames_input(exc):
        return InputRejectedError(
            f"the embeddings API rejected the request because of an input (HTTP {status} "
            f"{name}): {exc}",
            status=status,
        )
    return ProviderRejectedError(
        f"the embeddings API rejected the request (HTTP {status} {name}): {exc}; "
        "check the key, the model and OPENAI_EMBEDDING_DIMENSIONS",
        status=status,
    )


def _blames_input(exc: openai.APIStatusError) -> bool:
    """Whether a 400-class answer blames the input (the batch's content) rather than the
    request's configuration (model, dimensions, key)."""
    body = exc.body if isinstance(exc.body, dict) else {}
    code, param = body.get("code"), body.get("param")
    message = str(body.get("message") or exc.message or "").lower()
    if code in INPUT_ERROR_CODES or param == "input":
        return True
    if param not in (None, "input") or "model" in message or "dimension" in message:
        return False
    return "input" in message or "token" in message


def _describe_body(response: Any) -> str:
    if isinstance(response, str):
        head = " ".join(response[:60].split())
        return f"a text body starting {head!r}"
    return type(response).__name__


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

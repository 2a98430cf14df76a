"""Why an embedder could not embed (no provider SDK imported here: the worker catches these
whether or not an event uses OpenAI).

Every provider outcome is classified once, in openai_provider.classify:

* ProviderUnavailableError - transient (429, 5xx, timeouts, lost connections, malformed
  answers) after the embedder's own retries: the provider's fault, not the users'.
* ProviderRejectedError - permanent for the provider configuration (401, 403, unknown
  model, an invalid request): calling again cannot help, so nothing more is sent.
* InputRejectedError - the provider refused an input of the request (context length,
  content policy): the only outcome that justifies splitting a batch to find it.
* OutOfTimeError - the run's deadline left no time for a request: nobody's fault.
"""

from __future__ import annotations

from typing import Literal

FaultClass = Literal["transient", "permanent", "malformed", "input", "deadline"]


class EmbeddingError(RuntimeError):
    """The provider could not embed these profiles."""

    fault: FaultClass = "transient"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ProviderError(EmbeddingError):
    """A fault of the provider (or of its configuration), never of the users in the batch:
    the worker fails no user for it; it feeds the provider's circuit breaker."""


class ProviderUnavailableError(ProviderError):
    """Retries ran out on 429 / 5xx / timeouts / malformed answers."""

    fault: FaultClass = "transient"


class MalformedAnswerError(ProviderUnavailableError):
    """A 200 whose body is not a valid embeddings answer (not JSON, wrong shape, wrong
    count, wrong dimension, NaN or infinite values)."""

    fault: FaultClass = "malformed"


class ProviderRejectedError(ProviderError):
    """401 / 403 / unknown model / invalid request: the configuration is unusable."""

    fault: FaultClass = "permanent"


class InputRejectedError(EmbeddingError):
    """The provider refused one (or more) of the inputs of the request."""

    fault: FaultClass = "input"


class OutOfTimeError(EmbeddingError):
    """No time left in this run for a request to the provider."""

    fault: FaultClass = "deadline"

"""Why an embedder could not embed (no provider SDK imported here: the worker catches these
whether or not an event uses OpenAI)."""

from __future__ import annotations


class EmbeddingError(RuntimeError):
    """The provider could not embed these profiles (after retries, or a bad answer)."""


class ProviderUnavailableError(EmbeddingError):
    """Retries ran out on 429 / 5xx / timeouts: the provider is down, not this input.
    The worker fails the whole batch's users at once instead of retrying each alone."""

"""One way to run a transaction again when PostgreSQL rolled it back because of a
concurrent one (deadlock, serialization failure): nothing was written, so running it
again is the cure. The API's operations and the worker's batches both use it."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg

from core.observability import logger

T = TypeVar("T")

# A transaction rolled back by the server because of concurrent ones.
CONFLICT_ERRORS: tuple[type[psycopg.Error], ...] = (
    psycopg.errors.DeadlockDetected,
    psycopg.errors.SerializationFailure,
    psycopg.errors.TransactionRollback,
)
CONFLICT_ATTEMPTS = 3


def retry_conflicts(
    conn: psycopg.Connection[Any],
    action: Callable[[], T],
    *,
    what: str,
    attempts: int = CONFLICT_ATTEMPTS,
) -> T:
    """Run `action` (which runs its own transaction on `conn`), again after a conflict, up to
    `attempts` times in all with a little jitter; the last conflict is raised. A broken
    connection is never retried: its error is the caller's to handle."""
    attempt = 1
    while True:
        try:
            return action()
        except CONFLICT_ERRORS as exc:
            if conn.broken or attempt >= attempts:
                raise
            logger.warning(
                "transaction rolled back by a concurrent one; retrying",
                extra={"operation": what, "attempt": attempt, "error_class": type(exc).__name__},
            )
            time.sleep(random.uniform(0, 0.05 * attempt))  # noqa: S311 -- jitter, not security
            attempt += 1

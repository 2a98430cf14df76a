"""A worker's deadline inside a Lambda invocation (no numpy: the API uses it too)."""

from __future__ import annotations

import time


def monotonic_deadline(remaining_ms: int, max_runtime_ms: int, safety_ms: int) -> float:
    """The worker's deadline: the configured runtime, but never closer than safety_ms to
    the Lambda's own time limit."""
    budget_ms = max(0, min(max_runtime_ms, remaining_ms - safety_ms))
    return time.monotonic() + budget_ms / 1000

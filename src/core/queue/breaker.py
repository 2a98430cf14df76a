"""The embeddings provider's circuit breaker, one per provider configuration, kept in
PostgreSQL (db/migrations/0009_provider_breaker.sql) because Lambdas are stateless.

Closed: events that ask for OpenAI are embedded by it. A permanent fault (401, 403, an
unknown model, an invalid request) opens it at once; transient faults (429, 5xx,
timeouts, malformed answers) open it once they have lasted PROVIDER_BREAKER_WINDOW_S
since the last good answer. Open: those events are matched with the local embedder as a
whole (the worker re-embeds an event whenever its embedder changes, so one event's lists
never mix vector spaces) and no embeddings request is sent, except one probe per
PROVIDER_PROBE_INTERVAL_S (half-open). A good probe closes it, and the events that fell
back are queued whole to switch back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aws_lambda_powertools.metrics import MetricUnit

from core.data import repository as repo
from core.data.repository import BreakerRow, Conn
from core.embedding.errors import ProviderError, ProviderRejectedError
from core.observability import MetricName, logger, metrics
from core.settings import Settings

if TYPE_CHECKING:
    from core.embedding.openai_provider import OpenAIEmbedder

# The queue reason of the rows that switch an event back to the provider.
SWITCH_BACK_REASON = "embedder_restored"


class ProviderBreaker:
    def __init__(self, settings: Settings) -> None:
        self.window_s = settings.provider_breaker_window_s
        self.probe_interval_s = settings.provider_probe_interval_s

    def read(self, conn: Conn, key: str) -> BreakerRow | None:
        return repo.read_breaker(conn, key, self.probe_interval_s)

    def is_open(self, conn: Conn, key: str) -> bool:
        row = self.read(conn, key)
        return row is not None and row.state == "open"

    def record_fault(self, conn: Conn, key: str, error: ProviderError) -> bool:
        """Record a provider fault; True when the breaker is open afterwards."""
        with conn.transaction():
            was, now, _ = repo.record_provider_fault(
                conn,
                key,
                permanent=isinstance(error, ProviderRejectedError),
                reason=str(error),
                window_s=self.window_s,
            )
        if was != now:
            logger.warning(
                "provider circuit breaker opened: events that ask for OpenAI use the local "
                "embedder until a probe succeeds",
                extra=_fault_fields(key, error),
            )
        return now == "open"

    def record_success(self, conn: Conn, key: str) -> bool:
        """Record a good answer; True when that closed an open breaker."""
        with conn.transaction():
            was = repo.record_provider_success(conn, key)
        if was == "open":
            logger.info("provider circuit breaker closed", extra={"breaker": key})
        return was == "open"

    def probe_if_due(self, conn: Conn, embedder: OpenAIEmbedder, deadline: float | None) -> None:
        """Half-open: when the breaker is open and its probe is due, one worker sends one
        request; a good answer closes the breaker."""
        key = embedder.breaker_key
        row = self.read(conn, key)
        if row is None or not row.probe_due:
            return
        with conn.transaction():
            if not repo.claim_breaker_probe(conn, key, self.probe_interval_s):
                return  # another worker probes
        try:
            embedder.probe(deadline)
        except ProviderError as exc:
            logger.warning(
                "provider probe failed; the breaker stays open", extra=_fault_fields(key, exc)
            )
            self.record_fault(conn, key, exc)
            return
        self.record_success(conn, key)

    def switch_back(self, conn: Conn, embedder_key: str) -> int:
        """Queue whole every event that asks for OpenAI but whose vectors came from another
        embedder and has nothing queued: its next batch re-embeds it with the provider."""
        queued = 0
        with conn.transaction():
            for event_id in repo.events_to_switch_back(conn, embedder_key):
                queued += repo.enqueue_for_matching(
                    conn,
                    event_id,
                    user_ids=None,
                    only_unmatched=False,
                    priority=0,
                    reason=SWITCH_BACK_REASON,
                )
                logger.info("event switches back to the provider", extra={"event_id": event_id})
        return queued

    def report_state(self, conn: Conn, key: str) -> bool:
        """Emit the breaker state metric; True when open."""
        is_open = self.is_open(conn, key)
        metrics.add_metric(
            name=MetricName.PROVIDER_BREAKER_OPEN, unit=MetricUnit.Count, value=int(is_open)
        )
        return is_open


def _fault_fields(key: str, error: ProviderError) -> dict[str, object]:
    return {
        "breaker": key,
        "status": error.status,
        "fault": error.fault,
        "error": type(error).__name__,
        "reason": str(error)[:300],
    }

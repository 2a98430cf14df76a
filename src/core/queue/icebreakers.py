"""Optional one-sentence icebreakers for final matches, written by a chat model.

Only for the final top-k (the lists a batch just committed), cached per pair until either
profile changes, bounded per run and by the run's deadline, and never able to block or
fail the saving of a list: it runs after the batch committed and swallows its errors.
What is left of a run's budget goes to list entries still without one (never asked, or
the call failed), oldest first, so later runs catch up. A chat model that fails
MAX_CONSECUTIVE_FAILURES times in a row is not called again in that run.
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any

from core.data import repository as repo
from core.data.repository import Conn
from core.embedding.selection import openai_api_key, openai_client
from core.embedding.vectors import content_hash
from core.models import Profile
from core.observability import logger
from core.settings import Settings

if TYPE_CHECKING:
    import openai

MAX_CHARS = 300
MAX_CONSECUTIVE_FAILURES = 3
REQUEST_TIMEOUT_S = 10.0
SYSTEM_PROMPT = (
    "You write one short, friendly sentence that one event attendee could use to start a "
    "conversation with another, based on what they share or can offer each other. No "
    "greetings, no names, no emojis, at most 30 words."
)


def _profile(row: dict[str, Any], side: str) -> Profile:
    return Profile.model_construct(
        user_id=row[f"{side}_user_id"],
        title=row[f"{side}_title"],
        bio=row[f"{side}_bio"],
        interests=row[f"{side}_interests"],
        seeking=row[f"{side}_seeking"],
        offering=row[f"{side}_offering"],
    )


def _describe(profile: Profile) -> str:
    parts = [
        f"title: {profile.title}" if profile.title else "",
        f"interests: {', '.join(profile.interests)}" if profile.interests else "",
        f"seeks: {', '.join(profile.seeking)}" if profile.seeking else "",
        f"offers: {', '.join(profile.offering)}" if profile.offering else "",
    ]
    return "; ".join(p for p in parts if p) or "no details"


class IcebreakerWriter:
    def __init__(self, client: openai.OpenAI, model: str, max_per_run: int) -> None:
        self.client = client
        self.model = model
        self.remaining = max_per_run
        self.written = 0
        self.failed = 0
        self.failing = 0  # consecutive failures
        self.attempted: set[tuple[int, int, int]] = set()  # (event, owner, matched)

    def pair_hash(self, owner: Profile, other: Profile) -> str:
        key = f"{self.model}|{content_hash(owner)}|{content_hash(other)}"
        return hashlib.sha256(key.encode()).hexdigest()

    def write(
        self, conn: Conn, event_id: int, pairs: list[tuple[int, int]], deadline: float | None
    ) -> None:
        """Write missing or outdated icebreakers for these (owner, matched) pairs."""
        try:
            rows = repo.icebreaker_pairs(conn, event_id, pairs)
        except Exception:
            logger.exception("icebreakers skipped: cannot read the pairs")
            return
        for row in rows:
            if self.remaining <= 0 or (deadline is not None and deadline - time.monotonic() < 2):
                return
            if self.failing >= MAX_CONSECUTIVE_FAILURES:
                return  # the chat model is down: no more calls this run
            owner, other = _profile(row, "owner"), _profile(row, "matched")
            digest = self.pair_hash(owner, other)
            pair = (event_id, row["owner_id"], row["matched_id"])
            if row["pair_hash"] == digest or pair in self.attempted:
                continue
            self.remaining -= 1
            self.attempted.add(pair)
            try:
                text = self._sentence(owner, other)
                repo.store_icebreaker(
                    conn,
                    event_id,
                    owner=row["owner_id"],
                    matched=row["matched_id"],
                    pair_hash=digest,
                    text=text,
                )
                self.written += 1
                self.failing = 0
            except Exception as exc:  # an extra: log it, never fail the batch
                self.failed += 1
                self.failing += 1
                logger.warning(
                    "icebreaker not written",
                    extra={
                        "event_id": event_id,
                        "status": getattr(exc, "status_code", None),
                        "error": type(exc).__name__,
                    },
                )

    def _sentence(self, owner: Profile, other: Profile) -> str:
        response = self.client.with_options(
            timeout=REQUEST_TIMEOUT_S, max_retries=0
        ).chat.completions.create(
            model=self.model,
            max_tokens=80,
            messages=[
                {"role": "system", "content": SYSTEM_PROMPT},
                {
                    "role": "user",
                    "content": f"Attendee A: {_describe(owner)}\n"
                    f"Attendee B: {_describe(other)}\n"
                    "Write A's opening sentence to B.",
                },
            ],
        )
        text = (response.choices[0].message.content or "").strip()
        if not text:
            raise ValueError("empty icebreaker")
        return text[:MAX_CHARS]


def icebreaker_writer(settings: Settings) -> IcebreakerWriter | None:
    """A writer for events that want icebreakers, or None without an OpenAI key."""
    key = openai_api_key(settings)
    if not key:
        return None
    return IcebreakerWriter(
        openai_client(key, settings.openai_base_url),
        settings.openai_chat_model,
        settings.icebreakers_per_run,
    )

"""Provider faults through the deployed path: an OpenAI outage (a hang, then 500 / 429 /
dropped connections / 503) hits an "openai" event of 300 attendees while the scheduled
matchmaker keeps running, the key coming from Secrets Manager.

Nobody goes dead: before the circuit breaker opens, the batches the provider failed are
put back without counting the attempt, and a run that met a fault sends nothing more;
once transient faults have lasted PROVIDER_BREAKER_WINDOW_S the breaker opens and the
event is matched with the local embedder as a whole (exact for it; admin status says
which embedder is in effect, why and since when). While it is open only one probe per
interval reaches the provider; when a probe succeeds the event switches back on its own
and is re-embedded with the provider (only the users whose vectors it lacks), exact again.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import pytest

from core.data import repository as repo
from core.data.repository import Conn
from core.embedding import openai_provider as oe
from core.embedding.local import LocalEmbedder
from core.embedding.openai_provider import OpenAIEmbedder, profile_texts
from core.embedding.selection import embedder_for_event
from core.models import EventRecord
from tests.helpers import add_attendees, lists_of, queue_rows
from tests.reliability.lambda_stack import OPENAI_KEY, Stack, lambda_stack
from tooling.oracle import verify_event
from tooling.synthetic import generate_profiles

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.fake_openai import FakeOpenAI

pytest_plugins = ("tests.fake_openai",)
pytestmark = pytest.mark.reliability

CODE = "outage-2026"
BEFORE, DURING = 100, 200  # attendees matched before the outage, joining during it
BATCH_SIZE = 50
MAX_ATTEMPTS = 3
WINDOW_S = 2.0  # transient faults this long open the breaker
PROBE_INTERVAL_S = 4.0  # longer than the run that opens the breaker takes
DEFER_S = 5.0  # a deferred batch waits 2.5-5 s: each run below meets it at most once
EMBEDDER_BACKOFF_S = 0.01  # the embedder's own backoff between its retries of a request
RETRY_AFTER_S = 0.05
TIMEOUT_RUN_S = 2.5  # the invocation that meets a hanging provider has this long
# What the provider answers while it is down, request after request (the embedder tries
# a request 4 times).
OUTAGE: list[dict[str, Any]] = [
    {"status": 500},
    {"status": 429, "retry_after": str(RETRY_AFTER_S)},
    {"drop": True},
    {"status": 503},
]
HANG: dict[str, Any] = {"delay": 6.0}  # longer than the run has left: the client times out


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch, db_url: str, fake_openai: FakeOpenAI) -> Iterator[Stack]:
    monkeypatch.setattr(oe, "BACKOFF_BASE_S", EMBEDDER_BACKOFF_S)
    env = {
        "BATCH_SIZE": str(BATCH_SIZE),
        # batches of exactly BATCH_SIZE (no bulk batch for a backlog): exact accounting
        "BULK_BATCH_SECONDS": "0",
        "MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "BACKOFF_BASE_S": "0",
        "PROVIDER_BREAKER_WINDOW_S": str(WINDOW_S),
        "PROVIDER_PROBE_INTERVAL_S": str(PROBE_INTERVAL_S),
        "PROVIDER_DEFER_S": str(DEFER_S),
        "OPENAI_EMBEDDING_DIMENSIONS": "64",
    }
    with lambda_stack(monkeypatch, db_url, fake_openai, env) as running:
        yield running


def wait_until_ready(conn: Conn, event: EventRecord) -> None:
    row = conn.execute(
        "SELECT extract(epoch FROM max(run_after) - now())::float8 FROM matchmaking_queue"
        " WHERE event_id = %s AND status = 'pending'",
        (event.id,),
    ).fetchone()
    assert row is not None and row[0] is not None
    assert row[0] <= DEFER_S + 0.5
    time.sleep(max(0.0, row[0]) + 0.05)


def assert_deferred(conn: Conn, event: EventRecord, users: set[str]) -> None:
    """Every user is pending again with no attempt counted, the provider's error kept."""
    rows = {r["user_id"]: r for r in queue_rows(conn, event.id) if r["user_id"] in users}
    assert set(rows) == users, f"{len(users - set(rows))} users lost their queue row"
    assert {(r["status"], r["attempts"]) for r in rows.values()} == {("pending", 0)}
    assert all("embeddings API unavailable" in r["last_error"] for r in rows.values())


def assert_exact(conn: Conn, event: EventRecord, key: str) -> None:
    event = repo.fetch_event(conn, CODE) or event
    report = verify_event(conn, event, key)
    assert report.checked == BEFORE + DURING
    assert report.ok, (report.mismatches[:3], report.missing_vectors[:3], report.stale_vectors)
    assert queue_rows(conn, event.id) == []
    assert all(len(m) == event.settings.k for m in lists_of(conn, event.id).values())


def test_an_outage_falls_back_to_the_local_embedder_and_recovery_switches_back(
    conn: Conn, stack: Stack, fake_openai: FakeOpenAI
) -> None:
    fake = fake_openai
    settings = stack.settings
    people = generate_profiles(BEFORE + DURING, seed=71, id_prefix="of-")
    late = {p.user_id for p in people[BEFORE:]}

    # --- before the outage: the first 100 are matched through the provider -----------
    event = add_attendees(conn, CODE, people[:BEFORE], embedder="openai")
    embedder = embedder_for_event(event, settings)
    assert isinstance(embedder, OpenAIEmbedder)
    openai_key = embedder.key
    first = stack.run_matchmaker()
    assert (first["completed"], first["dead"], first["stopped"]) == (BEFORE, 0, "drained")
    assert fake.calls["/v1/embeddings"] == BEFORE // BATCH_SIZE
    assert all(
        {k.lower(): v for k, v in r.headers.items()}["authorization"] == f"Bearer {OPENAI_KEY}"
        for r in fake.embedding_requests()
    ), "the key must come from Secrets Manager"
    assert verify_event(conn, event, openai_key).ok

    # --- the outage: 200 newcomers meet a failing provider ----------------------------
    add_attendees(conn, CODE, people[BEFORE:], embedder="openai")
    fake.faults.extend(OUTAGE * 1000)
    fake.fail_all = {"status": 500}  # should the script run out
    fake.faults.appendleft(HANG)
    before_outage = fake.calls["/v1/embeddings"]

    # The provider hangs: the run with 2.5 s left times out at its deadline and puts the
    # batch back (no attempt counted); the breaker starts counting its window.
    started = time.monotonic()
    hung = stack.run_matchmaker(remaining_ms=settings.worker_safety_ms + int(TIMEOUT_RUN_S * 1e3))
    assert time.monotonic() - started < TIMEOUT_RUN_S + 1.5  # not the 6 s hang
    assert (hung["batches"], hung["failed"], hung["dead"], hung["stopped"]) == (
        1,
        0,
        0,
        "deadline",
    )
    assert fake.calls["/v1/embeddings"] - before_outage == 1
    # The next run meets the outage once (one request's 4 attempts) and defers every
    # batch without another request: the window has not passed yet.
    rest = stack.run_matchmaker(remaining_ms=settings.worker_safety_ms + 3000)
    assert (rest["failed"], rest["dead"], rest["completed"]) == (0, 0, 0)
    assert fake.calls["/v1/embeddings"] - before_outage == 1 + len(OUTAGE)
    assert_deferred(conn, event, late)
    status = stack.admin("admin_status", CODE)
    assert status["embedder"]["effective"] == "openai"
    assert status["embedder"]["breaker"] == "closed"
    assert "failing since" in status["embedder"]["reason"]

    # Once the window has passed, the next fault opens the breaker: that batch and then
    # the whole event are matched with the local embedder. Nobody is dead.
    time.sleep(WINDOW_S)
    wait_until_ready(conn, event)
    opened = stack.run_matchmaker()
    assert (opened["dead"], opened["failed"], opened["stopped"]) == (0, 0, "drained")
    assert fake.calls["/v1/embeddings"] - before_outage == 1 + 2 * len(OUTAGE)
    assert_exact(conn, event, LocalEmbedder().key)
    status = stack.admin("admin_status", CODE)
    assert status["embedder"]["configured"] == "openai"
    assert (status["embedder"]["effective"], status["embedder"]["breaker"]) == ("local", "open")
    assert status["embedder"]["since"] is not None
    assert "circuit breaker is open" in status["embedder"]["reason"]
    assert status["embedder"]["vectors_from"] == LocalEmbedder().key
    assert (status["queue"]["dead"], status["dead_letter_queue"]["depth"]) == (0, 0)
    assert status["state"] == "idle"
    assert stack.receive_dead_letters() == []

    # Open: a run before the probe interval sends nothing; one after it sends one probe.
    assert stack.run_matchmaker()["batches"] == 0
    assert fake.calls["/v1/embeddings"] - before_outage == 1 + 2 * len(OUTAGE)
    time.sleep(PROBE_INTERVAL_S + 0.1)
    stack.run_matchmaker()
    outage_requests = fake.calls["/v1/embeddings"] - before_outage
    assert outage_requests == 1 + 2 * len(OUTAGE) + 1
    assert stack.admin("admin_status", CODE)["embedder"]["breaker"] == "open"

    # --- recovery: the next probe succeeds, the event switches back on its own ---------
    fake.faults.clear()
    fake.fail_all = None
    time.sleep(PROBE_INTERVAL_S + 0.1)
    sent_before = len(fake.embedding_requests())
    recovered = stack.run_matchmaker()
    # everyone (the batch that switched the embedder is queued again behind the swap)
    assert recovered["completed"] >= BEFORE + DURING
    assert (recovered["dead"], recovered["failed"], recovered["stopped"]) == (0, 0, "drained")
    after = fake.embedding_requests()[sent_before:]
    assert after[0].inputs == ["probe"]
    # only the newcomers lacked OpenAI vectors: the 100 matched before are not re-sent
    resent = {t for r in after[1:] for t in r.inputs}
    assert resent == {t for p in people[BEFORE:] for t in profile_texts(p) if t.strip()}
    assert len(after) <= 1 + (BEFORE + DURING) // BATCH_SIZE
    assert_exact(conn, event, openai_key)
    status = stack.admin("admin_status", CODE)
    assert (status["embedder"]["effective"], status["embedder"]["breaker"]) == (
        "openai",
        "closed",
    )
    assert status["embedder"]["vectors_from"] == openai_key
    assert status["state"] == "idle"
    print(
        f"\n[provider faults] {outage_requests} requests during the outage (1 timeout, "
        f"2 x {len(OUTAGE)} 500/429/drop/503, 1 probe) for {DURING} newcomers and "
        f"{BEFORE + DURING} users re-matched locally; 0 dead; {len(after)} requests to "
        f"switch back; {fake.calls['/v1/embeddings']} requests in all"
    )

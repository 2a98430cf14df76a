"""Provider faults: an OpenAI outage (500 / 429 / dropped connections / timeouts) hits an
"openai" event of 300 attendees while the scheduled matchmaker keeps running.

The users it hits retry with backoff, go dead after MAX_ATTEMPTS and reach the SQS
dead-letter queue (and admin status); the users embedded before the outage keep their
exact lists; after the provider recovers, replaying the dead letters through the redrive
consumer matches everyone exactly. The requests sent to the provider stay bounded: a
batch costs at most the embedder's own attempts, never one call per user."""

from __future__ import annotations

import itertools
import json
import math
import time
from typing import TYPE_CHECKING, Any

import pytest

from core.data import repository as repo
from core.data.repository import Conn
from core.embedding import openai_provider as oe
from core.embedding.openai_provider import OpenAIEmbedder
from core.embedding.selection import embedder_for_event
from core.models import EventRecord
from tests.helpers import add_attendees, lists_of, queue_rows
from tests.reliability.lambda_stack import OPENAI_KEY, Stack, lambda_stack
from tooling.oracle import verify_event
from tooling.synthetic import generate_profiles

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.fake_openai import FakeOpenAI, RecordedRequest

pytest_plugins = ("tests.fake_openai",)
pytestmark = pytest.mark.reliability

CODE = "outage-2026"
BEFORE, DURING = 100, 200  # attendees matched before the outage, joining during it
BATCH_SIZE = 50
MAX_ATTEMPTS = 3
BACKOFF_BASE_S, BACKOFF_MAX_S = 3.0, 6.0  # the queue's, between attempts: longer
# than an invocation takes (< 0.5 s), so each run meets every user at most once
EMBEDDER_BACKOFF_S = 0.01  # the embedder's own backoff between its retries of a request
RETRY_AFTER_S = 0.05
TIMEOUT_RUN_S = 2.5  # the invocation that meets a hanging provider has this long
# What the provider answers while it is down, request after request: every failing
# batch meets each of these once (the embedder tries a request 4 times).
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
        "BACKOFF_BASE_S": str(BACKOFF_BASE_S),
        "BACKOFF_MAX_S": str(BACKOFF_MAX_S),
        "OPENAI_EMBEDDING_DIMENSIONS": "64",
    }
    with lambda_stack(monkeypatch, db_url, fake_openai, env) as running:
        yield running


def rows_by_user(conn: Conn, event: EventRecord, users: set[str]) -> dict[str, dict[str, Any]]:
    rows = {r["user_id"]: r for r in queue_rows(conn, event.id) if r["user_id"] in users}
    assert set(rows) == users, f"{len(users - set(rows))} users lost their queue row"
    return rows


def assert_backed_off(conn: Conn, event: EventRecord, users: set[str], attempts: int) -> None:
    """Every user failed `attempts` times, is pending again, and waits the capped
    exponential backoff with jitter before its next attempt."""
    step = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (attempts - 1))
    for user, row in rows_by_user(conn, event, users).items():
        assert (row["status"], row["attempts"]) == ("pending", attempts), user
        assert "embeddings API unavailable" in row["last_error"], row["last_error"]
        wait = (row["run_after"] - row["updated_at"]).total_seconds()
        assert 0.5 * step - 1e-3 <= wait <= step + 1e-3, (user, wait)


def wait_until_ready(conn: Conn, event: EventRecord) -> None:
    row = conn.execute(
        "SELECT extract(epoch FROM max(run_after) - now())::float8 FROM matchmaking_queue"
        " WHERE event_id = %s AND status = 'pending'",
        (event.id,),
    ).fetchone()
    assert row is not None and row[0] is not None
    assert row[0] <= BACKOFF_MAX_S + 0.5
    time.sleep(max(0.0, row[0]) + 0.05)


def run_nothing_ready(stack: Stack, fake: FakeOpenAI) -> None:
    """An invocation while every failed user is backing off claims nothing and sends
    nothing to the provider."""
    sent = fake.calls["/v1/embeddings"]
    summary = stack.run_matchmaker()
    assert (summary["batches"], summary["stopped"]) == (0, "drained"), summary
    assert fake.calls["/v1/embeddings"] == sent


def assert_retries_waited(requests: list[RecordedRequest]) -> None:
    """Within a batch, the embedder waited before each retry: Retry-After after a 429,
    its exponential backoff (attempt 1: >= base/2, attempt 3: >= 2 * base) otherwise."""
    least_wait = {0: EMBEDDER_BACKOFF_S / 2, 1: RETRY_AFTER_S, 2: 2 * EMBEDDER_BACKOFF_S}
    for start in range(0, len(requests), len(OUTAGE)):
        batch = requests[start : start + len(OUTAGE)]
        for attempt, (sent, retry) in enumerate(itertools.pairwise(batch)):
            assert retry.at - sent.at >= least_wait[attempt], (attempt, retry.at - sent.at)


def test_an_outage_sends_its_users_to_the_dead_letter_queue_and_a_redrive_recovers(
    conn: Conn, stack: Stack, fake_openai: FakeOpenAI
) -> None:
    fake = fake_openai
    settings = stack.settings
    people = generate_profiles(BEFORE + DURING, seed=71, id_prefix="of-")
    early = {p.user_id for p in people[:BEFORE]}
    late = {p.user_id for p in people[BEFORE:]}

    # --- before the outage: the first 100 are matched through the provider -----------
    event = add_attendees(conn, CODE, people[:BEFORE], embedder="openai")
    embedder = embedder_for_event(event, settings)
    assert isinstance(embedder, OpenAIEmbedder)
    key = embedder.key
    attempts_per_request = embedder.max_attempts  # the embedder's own tries per request
    assert attempts_per_request == len(OUTAGE)
    first = stack.run_matchmaker()
    assert (first["completed"], first["dead"], first["stopped"]) == (BEFORE, 0, "drained")
    assert fake.calls["/v1/embeddings"] == math.ceil(BEFORE / BATCH_SIZE)
    assert all(
        {k.lower(): v for k, v in r.headers.items()}["authorization"] == f"Bearer {OPENAI_KEY}"
        for r in fake.embedding_requests()
    ), "the key must come from Secrets Manager"
    assert verify_event(conn, event, key).ok
    matched_before = lists_of(conn, event.id)
    assert set(matched_before) == early
    assert all(len(matches) == event.settings.k for matches in matched_before.values())

    # --- the outage: 200 newcomers meet a failing provider ----------------------------
    add_attendees(conn, CODE, people[BEFORE:], embedder="openai")
    assert {r["user_id"] for r in queue_rows(conn, event.id)} == late
    fake.faults.extend(OUTAGE * 1000)
    fake.fail_all = {"status": 500}  # should the script run out
    requests_before = fake.calls["/v1/embeddings"]
    batches = 0

    # Attempt 1. The provider hangs on the first request: the run that has only 2.5 s
    # left times out at its deadline, fails that batch and stops claiming.
    fake.faults.appendleft(HANG)
    started = time.monotonic()
    hung = stack.run_matchmaker(remaining_ms=settings.worker_safety_ms + int(TIMEOUT_RUN_S * 1e3))
    assert time.monotonic() - started < TIMEOUT_RUN_S + 1.5  # not the 6 s hang
    assert (hung["batches"], hung["failed"], hung["stopped"]) == (1, BATCH_SIZE, "deadline")
    timed_out = {r["user_id"] for r in queue_rows(conn, event.id) if r["attempts"] == 1}
    assert len(timed_out) == BATCH_SIZE
    assert all(
        "APITimeoutError" in r["last_error"]
        for r in queue_rows(conn, event.id)
        if r["user_id"] in timed_out
    )
    # the next run takes the other users; the timed-out ones are still backing off
    rest = stack.run_matchmaker()
    assert (rest["batches"], rest["failed"], rest["completed"]) == (3, DURING - BATCH_SIZE, 0)
    batches += hung["batches"] + rest["batches"]
    assert_backed_off(conn, event, late, attempts=1)
    run_nothing_ready(stack, fake)

    # Attempts 2 and 3, once the backoff has passed: the last one kills them.
    for attempt in range(2, MAX_ATTEMPTS + 1):
        wait_until_ready(conn, event)
        summary = stack.run_matchmaker()
        assert summary["failed"] == DURING and summary["completed"] == 0, summary
        batches += summary["batches"]
        if attempt < MAX_ATTEMPTS:
            assert summary["dead"] == 0
            assert_backed_off(conn, event, late, attempts=attempt)
            run_nothing_ready(stack, fake)
        else:
            assert summary["dead"] == DURING
    assert batches == MAX_ATTEMPTS * math.ceil(DURING / BATCH_SIZE)

    rows = rows_by_user(conn, event, late)
    assert {(r["status"], r["attempts"]) for r in rows.values()} == {("dead", MAX_ATTEMPTS)}
    assert all("embeddings API unavailable" in r["last_error"] for r in rows.values())
    # dead users are not retried again
    run_nothing_ready(stack, fake)

    # No retry storm: a failing batch costs at most the embedder's attempts, whatever
    # its size; each got exactly the scripted faults, waiting before every retry.
    outage_requests = fake.embedding_requests()[requests_before:]
    assert outage_requests[0].fault == HANG
    failing = outage_requests[1:]
    assert len(failing) == attempts_per_request * (batches - 1)
    assert [r.fault for r in failing] == OUTAGE * (batches - 1)
    assert_retries_waited(failing)
    assert len(outage_requests) <= attempts_per_request * MAX_ATTEMPTS * math.ceil(
        DURING / BATCH_SIZE
    )
    assert len(outage_requests) < DURING  # not even one request per user

    # Admin status and the dead-letter queue show every dead user, once.
    status = stack.admin("admin_status", CODE)
    queue, coverage = status["queue"], status["coverage"]
    assert queue["dead"] == DURING
    assert status["dead_letter_queue"] == {"scope": "all events", "depth": DURING}
    assert sum(queue["pending_by_priority"].values()) == queue["waiting_retry"] == 0
    assert coverage["active"] == BEFORE + DURING
    assert coverage["active"] - coverage["without_list"] == BEFORE
    assert "embeddings API unavailable" in status["last_error"]
    listed = stack.admin("admin_dead_letters", CODE)
    assert sorted(d["user_id"] for d in listed) == sorted(late)
    assert {d["attempts"] for d in listed} == {MAX_ATTEMPTS}
    messages = stack.receive_dead_letters()
    letters = [json.loads(m["Body"]) for m in messages]
    assert sorted(letter["user_id"] for letter in letters) == sorted(late)
    assert {(letter["event_code"], letter["attempts"]) for letter in letters} == {
        (CODE, MAX_ATTEMPTS)
    }
    assert all("embeddings API unavailable" in letter["last_error"] for letter in letters)

    # The users embedded before the outage kept their exact lists.
    assert {u: m for u, m in lists_of(conn, event.id).items() if m} == matched_before
    during = verify_event(conn, event, key)
    assert sorted(during.missing_vectors) == sorted(late)
    assert during.checked == BEFORE
    assert (during.mismatches, during.stale_vectors, during.asymmetric_pairs) == ([], [], [])

    # --- recovery: the provider answers again; the dead letters are replayed ---------
    fake.faults.clear()
    fake.fail_all = None
    requests_before = fake.calls["/v1/embeddings"]
    bodies = [m["Body"] for m in messages]
    for start in range(0, len(bodies), 10):  # SQS hands the consumer 10 at a time
        assert stack.redrive(bodies[start : start + 10])["batchItemFailures"] == []
    assert stack.redrive(bodies[:10])["batchItemFailures"] == []  # a duplicate delivery
    stack.delete_dead_letters(messages)
    rows = rows_by_user(conn, event, late)
    assert {(r["status"], r["attempts"], r["reason"]) for r in rows.values()} == {
        ("pending", 0, "redrive")
    }
    assert len(queue_rows(conn, event.id)) == DURING

    recovered = stack.run_matchmaker()
    assert (recovered["completed"], recovered["dead"], recovered["stopped"]) == (
        DURING,
        0,
        "drained",
    )
    assert queue_rows(conn, event.id) == []
    after = fake.calls["/v1/embeddings"] - requests_before
    assert after == recovered["batches"] == math.ceil(DURING / BATCH_SIZE)

    report = verify_event(conn, repo.fetch_event(conn, CODE) or event, key)
    assert report.ok, (report.mismatches[:3], report.missing_vectors[:3])
    assert report.checked == BEFORE + DURING
    assert all(len(m) == event.settings.k for m in lists_of(conn, event.id).values())
    status = stack.admin("admin_status", CODE)
    assert (status["queue"]["dead"], status["dead_letter_queue"]["depth"]) == (0, 0)
    assert status["coverage"]["full_lists"] == BEFORE + DURING
    assert status["state"] == "idle"
    print(
        f"\n[provider faults] {len(outage_requests)} requests during the outage "
        f"(1 timeout + {len(failing)} 500/429/drop/503) for {DURING} users x {MAX_ATTEMPTS} "
        f"attempts in {batches} batches; {DURING} dead letters; {after} requests to recover; "
        f"{fake.calls['/v1/embeddings']} requests in all"
    )

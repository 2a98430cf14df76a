"""Poison user: the provider rejects one attendee's profile every time (HTTP 400 on the
text of their bio, as for a content-policy or context-length refusal), in an "openai"
event of 130 attendees run by the scheduled matchmaker.

That one user goes dead after MAX_ATTEMPTS, shows in admin status and in the SQS
dead-letter queue; everyone else is matched exactly, and nobody is matched with the
poison user, who has no vector."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

import pytest

from core.data import repository as repo
from core.data.repository import Conn
from core.embedding.openai_provider import profile_texts
from core.embedding.selection import embedder_for_event
from core.models import Profile
from tests.helpers import add_attendees, lists_of, queue_rows
from tests.reliability.lambda_stack import Stack, lambda_stack
from tooling.oracle import verify_event
from tooling.synthetic import generate_profiles

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.fake_openai import FakeOpenAI

pytest_plugins = ("tests.fake_openai",)
pytestmark = pytest.mark.reliability

CODE = "poison-2026"
USERS = 130  # not a multiple of the batch size: the poison user's retry shares a batch
BATCH_SIZE = 20
MAX_ATTEMPTS = 3
POISON = "pz-000042"
MARKER = "UNEMBEDDABLE-7F3A"


ENV = {
    "BATCH_SIZE": str(BATCH_SIZE),
    "MAX_ATTEMPTS": str(MAX_ATTEMPTS),
    "BACKOFF_BASE_S": "0",  # retry at once: the whole story fits in one invocation
    "BACKOFF_MAX_S": "0",
    "OPENAI_EMBEDDING_DIMENSIONS": "64",
}


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch, db_url: str, fake_openai: FakeOpenAI) -> Iterator[Stack]:
    """Batches of exactly BATCH_SIZE (no bulk batch for a backlog)."""
    env = {**ENV, "BULK_BATCH_SECONDS": "0"}
    with lambda_stack(monkeypatch, db_url, fake_openai, env) as running:
        yield running


@pytest.fixture
def bulk_stack(
    monkeypatch: pytest.MonkeyPatch, db_url: str, fake_openai: FakeOpenAI
) -> Iterator[Stack]:
    """The default batching: a full batch claims the event's backlog in one bulk batch."""
    with lambda_stack(monkeypatch, db_url, fake_openai, ENV) as running:
        yield running


def poisoned_event(conn: Conn, fake: FakeOpenAI, users: int) -> tuple[list[Profile], Profile]:
    """`users` synthetic attendees of an "openai" event; POISON's bio is rejected."""
    people = generate_profiles(users, seed=81, id_prefix="pz-")
    index = next(i for i, p in enumerate(people) if p.user_id == POISON)
    poison = people[index] = people[index].model_copy(
        update={"bio": f"{people[index].bio or ''} {MARKER}".strip()}
    )
    fake.reject_inputs.add(MARKER)
    add_attendees(conn, CODE, people, embedder="openai")
    return people, poison


def test_a_poison_user_goes_dead_alone_and_everyone_else_is_matched_exactly(
    conn: Conn, stack: Stack, fake_openai: FakeOpenAI
) -> None:
    fake = fake_openai
    people, poison = poisoned_event(conn, fake, USERS)
    poison_texts = {t for t in profile_texts(poison) if MARKER in t}
    assert len(poison_texts) == 1
    event = repo.fetch_event(conn, CODE)
    assert event is not None
    key = embedder_for_event(event, stack.settings).key
    assert key.startswith("openai:")

    summary = stack.run_matchmaker()

    # The poison user: dead after MAX_ATTEMPTS, alone.
    assert (summary["completed"], summary["dead"], summary["stopped"]) == (
        USERS - 1,
        1,
        "drained",
    )
    [row] = queue_rows(conn, event.id)
    assert (row["user_id"], row["status"], row["attempts"]) == (POISON, "dead", MAX_ATTEMPTS)
    assert "rejected the request" in row["last_error"] and MARKER in row["last_error"]

    # Each attempt sent the poison text in its batch's request, then in halves of it
    # until the user was alone (at most 1 + ceil(log2(batch)) requests per attempt);
    # the last request of each hunt carries the user alone.
    carrying = [r for r in fake.embedding_requests() if poison_texts & set(r.inputs)]
    assert (
        MAX_ATTEMPTS * 2 <= len(carrying) <= MAX_ATTEMPTS * (2 + math.ceil(math.log2(BATCH_SIZE)))
    )
    alone = set(profile_texts(poison))
    assert sum(set(r.inputs) <= alone for r in carrying) == MAX_ATTEMPTS
    # Everyone else was embedded once, in a request that succeeded; the culprit hunt
    # costs about two requests per halving of the batches the poison user was in.
    succeeded = [r for r in fake.embedding_requests() if r not in carrying]
    embedded_ok = [text for r in succeeded for text in r.inputs]
    others = {t for p in people if p.user_id != POISON for t in profile_texts(p) if t.strip()}
    assert set(embedded_ok) == others
    # (the poison user's retries run after everyone else, and may share a last batch)
    batches = summary["batches"]
    assert (
        math.ceil(USERS / BATCH_SIZE)
        <= batches
        <= (math.ceil((USERS - 1) / BATCH_SIZE) + MAX_ATTEMPTS - 1)
    )
    assert len(fake.embedding_requests()) <= batches + MAX_ATTEMPTS * 2 * math.ceil(
        math.log2(BATCH_SIZE)
    )

    # Admin status, the dead-letters route and the SQS dead-letter queue show it.
    status = stack.admin("admin_status", CODE)
    queue, coverage = status["queue"], status["coverage"]
    assert queue["dead"] == 1
    assert status["state"] == "needs_attention"
    assert status["dead_letter_queue"] == {"scope": "all events", "depth": 1}
    assert sum(queue["pending_by_priority"].values()) == queue["running"] == 0
    assert queue["waiting_retry"] == 0
    assert coverage["active"] == USERS
    assert coverage["active"] - coverage["without_list"] == USERS - 1
    assert "rejected the request" in status["last_error"]
    [listed] = stack.admin("admin_dead_letters", CODE)
    assert (listed["user_id"], listed["attempts"]) == (POISON, MAX_ATTEMPTS)
    assert MARKER in listed["last_error"]
    [message] = stack.receive_dead_letters()
    letter = json.loads(message["Body"])
    assert (letter["user_id"], letter["event_code"], letter["attempts"]) == (
        POISON,
        CODE,
        MAX_ATTEMPTS,
    )
    assert "400" in letter["last_error"] and MARKER in letter["last_error"]

    # Everyone else: exact lists; the poison user has none, and is on nobody's.
    report = verify_event(conn, event, key)
    assert report.missing_vectors == [POISON]
    assert report.checked == USERS - 1
    assert (report.mismatches, report.stale_vectors, report.asymmetric_pairs) == ([], [], [])
    lists = lists_of(conn, event.id)
    assert not lists.get(POISON)
    assert all(len(lists[p.user_id]) == event.settings.k for p in people if p.user_id != POISON)
    assert not any(POISON in [m for m, _ in matches] for matches in lists.values())
    named = conn.execute(
        "SELECT count(*) FROM user_matches m JOIN profiles p ON p.id = m.matched_profile_id"
        " WHERE m.event_id = %s AND p.user_id = %s",
        (event.id, POISON),
    ).fetchone()
    assert named == (0,)

    # A dead user is left alone: the next runs send nothing and write no new letter.
    sent = fake.calls["/v1/embeddings"]
    for _ in range(2):
        again = stack.run_matchmaker()
        assert (again["batches"], again["dead"]) == (0, 0)
    assert fake.calls["/v1/embeddings"] == sent
    assert stack.receive_dead_letters() == []
    print(
        f"\n[poison user] {USERS} attendees, {batches} batches:"
        f" {POISON} dead after {MAX_ATTEMPTS} attempts, 1 dead letter;"
        f" {sent} embedding requests ({len(carrying)} carrying the rejected text),"
        f" {report.checked} lists verified"
    )


BULK_USERS = 300


def test_a_poison_user_in_a_bulk_batch_costs_few_extra_requests(
    conn: Conn, bulk_stack: Stack, fake_openai: FakeOpenAI
) -> None:
    """Given 300 newcomers of an "openai" event, one of them poison, matched with the
    default batching (a full batch claims the backlog: one bulk batch), when the
    matchmaker runs, then the poison user is dead alone, everyone else is matched, and
    finding the culprit costs a few requests per attempt (bisecting the failed request:
    about 2 log2(n)), not one request per user of the bulk batch.

    FAILS with the worker as it is: Matchmaker._embed embeds every user of a batch whose
    request was rejected one by one, so one poison user among n newcomers costs n
    requests per attempt (a poison user among 1,000 newcomers: 987 requests instead of
    about 7); see the report for the proposed bisection."""
    fake = fake_openai
    people, _ = poisoned_event(conn, fake, BULK_USERS)
    event = repo.fetch_event(conn, CODE)
    assert event is not None

    summary = bulk_stack.run_matchmaker()

    assert (summary["completed"], summary["dead"]) == (BULK_USERS - 1, 1)
    [row] = queue_rows(conn, event.id)
    assert (row["user_id"], row["status"], row["attempts"]) == (POISON, "dead", MAX_ATTEMPTS)
    report = verify_event(conn, event, embedder_for_event(event, bulk_stack.settings).key)
    assert report.missing_vectors == [POISON]
    assert (report.mismatches, report.stale_vectors) == ([], [])
    # A clean run: at most one request per 512 texts of each batch. The culprit hunt:
    # about two requests per halving of the batch, per attempt.
    texts = sum(1 for p in people for t in profile_texts(p) if t.strip())
    clean = summary["batches"] * math.ceil(texts / 512)
    hunt = MAX_ATTEMPTS * (2 * math.ceil(math.log2(BULK_USERS)) + 2)
    requests = fake.calls["/v1/embeddings"]
    print(
        f"\n[poison user, bulk] {BULK_USERS} attendees, {summary['batches']} batches:"
        f" {requests} embedding requests (bound {clean} + {hunt})"
    )
    assert requests <= clean + hunt, (
        f"{requests} requests for {BULK_USERS} users and one poison user"
    )

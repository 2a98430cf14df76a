"""OpenAI embeddings against a fake OpenAI API (tests/fake_openai.py): the embedder's
batching, retries, deadline and answer checks, then the worker end to end on PostgreSQL
(cached vectors, provider faults, switching an event's embedder) and the request / token
counts of a 1,000-attendee event."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import openai
import pytest
from pydantic import SecretStr

from core.data import repository as repo
from core.data.repository import Conn
from core.embedding import openai_provider as oe
from core.embedding.errors import EmbeddingError
from core.embedding.local import LocalEmbedder
from core.embedding.openai_provider import OpenAIEmbedder, profile_texts
from core.embedding.selection import effective_embedder, embedder_for_event
from core.embedding.vectors import BLOCKS, quantize_blocks
from core.models import EventRecord, Profile
from core.queue.worker import Matchmaker
from core.settings import Settings
from tests.helpers import add_attendees, lists_of, queue_rows
from tooling.oracle import verify_event
from tooling.synthetic import generate_profiles

if TYPE_CHECKING:
    from tests.fake_openai import FakeOpenAI

# The fake_openai fixture (imported by pytest, so not at the top of this module).
pytest_plugins = ("tests.fake_openai",)

DIMS = 64
MODEL = "text-embedding-3-small"


# --- helpers ---------------------------------------------------------------------------


def client_for(fake: FakeOpenAI) -> openai.OpenAI:
    return openai.OpenAI(api_key="test", base_url=fake.base_url, max_retries=0)


def embedder_for(fake: FakeOpenAI, **kwargs: Any) -> tuple[OpenAIEmbedder, list[float]]:
    """An embedder on the fake whose sleeps are recorded instead of slept."""
    waits: list[float] = []
    embedder = OpenAIEmbedder(client_for(fake), dimensions=DIMS, sleep=waits.append, **kwargs)
    return embedder, waits


def one(user_id: str = "u1", **fields: Any) -> Profile:
    defaults: dict[str, Any] = {"interests": ["robotics", "climate tech"], "title": "Founder"}
    return Profile(user_id=user_id, **(defaults | fields))


def openai_settings(settings: Settings, fake: FakeOpenAI | None, **update: Any) -> Settings:
    """The test settings with an OpenAI key and the fake's URL (fake=None: no key at all)."""
    return settings.model_copy(
        update={
            "openai_api_key": SecretStr("test") if fake else None,
            "openai_secret_arn": None,
            "openai_base_url": fake.base_url if fake else None,
            "openai_embedding_dimensions": DIMS,
            **update,
        }
    )


def drain(conn: Conn, worker: Matchmaker, **kwargs: Any) -> Any:
    report = worker.run(conn, deadline=time.monotonic() + 60, **kwargs)
    assert report.stopped == "drained"
    return report


def breaker_of(conn: Conn, cfg: Settings) -> Any:
    return lambda key: repo.read_breaker(conn, key, cfg.provider_probe_interval_s)


def refreshed(conn: Conn, event: EventRecord) -> EventRecord:
    record = repo.fetch_event_by_id(conn, event.id)
    assert record is not None
    return record


def assert_exact(conn: Conn, event: EventRecord, key: str) -> None:
    report = verify_event(conn, event, key)
    assert report.attendees > 0
    assert report.ok, (report.mismatches[:3], report.missing_vectors, report.stale_vectors)


def vector_keys(conn: Conn, event: EventRecord) -> dict[str, set[str]]:
    """user_id -> the embedder keys of its stored vectors (active attendees)."""
    out: dict[str, set[str]] = {}
    for user_id, key in conn.execute(
        "SELECT p.user_id, v.embedder FROM attendees a JOIN profiles p ON p.id = a.profile_id"
        " JOIN profile_vectors v ON v.profile_id = a.profile_id"
        " WHERE a.event_id = %s AND a.active",
        (event.id,),
    ):
        out.setdefault(user_id, set()).add(key)
    return out


def texts_of(profiles: list[Profile]) -> set[str]:
    return {t for p in profiles for t in profile_texts(p) if t.strip()}


def rematch_all(conn: Conn, event: EventRecord) -> None:
    conn.execute(
        "SELECT mm_enqueue(%(e)s, ARRAY(SELECT profile_id FROM attendees"
        " WHERE event_id = %(e)s AND active), 0::smallint, 'rematch')",
        {"e": event.id},
    )


# --- OpenAIEmbedder against the fake -----------------------------------------------------


def test_output_is_int16_blocks_and_empty_blocks_cost_nothing(fake_openai):
    """Given a full profile, a sparse one and an empty one, when they are embedded, then the
    output is (3, 4 * dimensions) int16, each non-empty block is the provider's vector
    quantised, empty blocks are zero and only the non-empty texts were sent."""
    full = one("a", seeking=["investors"], offering=["mentoring"], bio="I build robots.")
    sparse = Profile(user_id="b", interests=["robotics"])
    empty = Profile(user_id="c")
    embedder, _ = embedder_for(fake_openai)

    vectors = embedder.embed([full, sparse, empty])

    assert vectors.dtype == np.int16
    assert vectors.shape == (3, len(BLOCKS) * DIMS) == (3, embedder.dim)
    blocks = vectors.reshape(3, len(BLOCKS), DIMS)
    expected = np.asarray(
        [fake_openai.vector(t, DIMS) for t in profile_texts(full)], dtype=np.float32
    ).astype(np.float64)
    assert np.array_equal(blocks[0], quantize_blocks(expected[np.newaxis])[0].reshape(4, DIMS))
    assert np.any(blocks[1, 0]) and not np.any(blocks[1, 1:])
    assert not np.any(blocks[2])
    assert sorted(fake_openai.embedded_inputs()) == sorted(texts_of([full, sparse]))
    assert embedder.requests == 1
    assert embedder.tokens == fake_openai.embedding_tokens > 0
    body = fake_openai.embedding_requests()[0].body
    assert (body["model"], body["dimensions"]) == (MODEL, DIMS)
    # Shared words make close vectors: a's and b's interests share "robotics".
    assert int(blocks[0, 0].astype(np.int64) @ blocks[1, 0].astype(np.int64)) > 0


def test_nothing_to_embed_makes_no_request(fake_openai):
    """Given only empty profiles, when embedded, then no request is made and rows are zero."""
    embedder, _ = embedder_for(fake_openai)
    vectors = embedder.embed([Profile(user_id="x"), Profile(user_id="y", bio="   ")])
    assert vectors.shape == (2, embedder.dim)
    assert not np.any(vectors)
    assert fake_openai.calls["/v1/embeddings"] == 0


def test_300_profiles_take_few_requests_and_duplicates_are_sent_once(fake_openai):
    """Given 300 profiles (many sharing tag lists) when embedded in one call, then every
    unique non-empty text is sent exactly once, in requests of at most 512 inputs, and the
    number of requests is the minimum for that many texts."""
    people = generate_profiles(300, seed=3, id_prefix="bt-")
    twins = [p.model_copy(update={"user_id": f"twin-{p.user_id}"}) for p in people[:50]]
    embedder, _ = embedder_for(fake_openai)

    vectors = embedder.embed(people + twins)

    unique = texts_of(people)
    sent = fake_openai.embedded_inputs()
    assert len(sent) == len(set(sent)) == len(unique)
    assert set(sent) == unique
    sizes = [len(r.inputs) for r in fake_openai.embedding_requests()]
    assert all(size <= oe.MAX_INPUTS_PER_REQUEST for size in sizes)
    assert len(sizes) == math.ceil(len(unique) / oe.MAX_INPUTS_PER_REQUEST) == embedder.requests
    assert len(sizes) >= 2  # the chunking really happened
    assert np.array_equal(vectors[300:], vectors[:50])  # twins share their vectors


def test_a_429_is_retried_after_the_retry_after_wait(fake_openai):
    """Given a 429 with Retry-After: 4, when embedding, then the embedder waits a time
    derived from Retry-After (not its 0.5 s backoff) and the retry succeeds."""
    fake_openai.faults.append({"status": 429, "retry_after": "4"})
    embedder, waits = embedder_for(fake_openai)

    vectors = embedder.embed([one()])

    assert np.any(vectors)
    assert fake_openai.calls["/v1/embeddings"] == embedder.requests == 2
    assert len(waits) == 1
    assert 2.0 <= waits[0] <= 6.0  # about Retry-After (jittered), not the 0.5 s backoff


def test_a_429_is_never_retried_before_retry_after(fake_openai):
    """Given 429s with Retry-After: 2, when embedding, then no wait is shorter than 2 s."""
    for _ in range(3):
        fake_openai.faults.append({"status": 429, "retry_after": "2"})
    embedder, waits = embedder_for(fake_openai)
    embedder.embed([one()])
    assert len(waits) == 3
    assert min(waits) >= 2.0


def test_a_500_then_success_backs_off_and_succeeds(fake_openai):
    """Given one HTTP 500, when embedding, then one backoff wait (0.25-0.5 s) and success."""
    fake_openai.faults.append({"status": 500})
    embedder, waits = embedder_for(fake_openai)

    vectors = embedder.embed([one()])

    assert np.any(vectors)
    assert fake_openai.calls["/v1/embeddings"] == 2
    assert len(waits) == 1
    assert oe.BACKOFF_BASE_S / 2 <= waits[0] <= oe.BACKOFF_BASE_S


def test_a_timeout_is_retried(fake_openai):
    """Given a first answer delayed 3 s and a clock that leaves the first attempt only 1 s
    (so its timeout is 1 s) and plenty afterwards, when embedding, then the first attempt
    times out after about 1 s and the retry succeeds."""
    fake_openai.faults.append({"delay": 3.0})
    deadline = 1_000.0
    left = iter([1.0])  # what the first attempt sees; later ones see 60 s

    def clock() -> float:
        return deadline - next(left, 60.0)

    embedder, waits = embedder_for(fake_openai, clock=clock)
    started = time.monotonic()

    vectors = embedder.embed([one()], deadline=deadline)

    assert np.any(vectors)
    assert 0.9 <= time.monotonic() - started < 2.8
    assert fake_openai.calls["/v1/embeddings"] == 2
    assert len(waits) == 1


def test_a_timeout_at_the_deadline_fails_fast_and_clearly(fake_openai):
    """Given an answer delayed 3 s and a deadline 1.5 s away, when embedding, then the
    request times out at the deadline and an EmbeddingError names the timeout."""
    fake_openai.faults.append({"delay": 3.0})
    embedder, waits = embedder_for(fake_openai)
    started = time.monotonic()

    with pytest.raises(EmbeddingError, match=r"unavailable after 1 attempt.*APITimeoutError"):
        embedder.embed([one()], deadline=started + 1.5)

    assert time.monotonic() - started < 2.5
    assert waits == []


def test_persistent_failure_gives_up_after_max_attempts(fake_openai):
    """Given an API that always answers 500, when embedding, then after max_attempts
    requests (with growing backoff between them) an EmbeddingError says so."""
    fake_openai.fail_all = {"status": 500}
    embedder, waits = embedder_for(fake_openai, max_attempts=3)

    with pytest.raises(EmbeddingError, match=r"embeddings API unavailable after 3 attempt"):
        embedder.embed([one()])

    assert fake_openai.calls["/v1/embeddings"] == embedder.requests == 3
    assert len(waits) == 2
    assert oe.BACKOFF_BASE_S / 2 <= waits[0] <= oe.BACKOFF_BASE_S
    assert oe.BACKOFF_BASE_S <= waits[1] <= 2 * oe.BACKOFF_BASE_S


def test_no_sleep_past_the_deadline(fake_openai):
    """Given a deadline 2 s away and a 429 asking for 30 s, when embedding, then the
    embedder gives up at once instead of sleeping past its deadline."""
    fake_openai.faults.append({"status": 429, "retry_after": "30"})
    embedder, waits = embedder_for(fake_openai)
    started = time.monotonic()

    with pytest.raises(EmbeddingError, match="RateLimitError"):
        embedder.embed([one()], deadline=started + 2.0)

    assert waits == []
    assert time.monotonic() - started < 1.0
    assert fake_openai.calls["/v1/embeddings"] == 1


def test_no_request_once_the_deadline_is_near(fake_openai):
    """Given a deadline 0.2 s away, when embedding, then no request is even sent."""
    embedder, _ = embedder_for(fake_openai)
    with pytest.raises(EmbeddingError, match="no time left"):
        embedder.embed([one()], deadline=time.monotonic() + 0.2)
    assert fake_openai.calls["/v1/embeddings"] == 0


@pytest.mark.parametrize(
    ("fault", "title"),
    [({"malformed": True}, "Founder"), ({"missing_vector": True}, "")],
    ids=["invalid-json", "empty-data"],
)
def test_a_malformed_answer_is_an_embedding_error(fake_openai, fault, title):
    """Given a 200 answer whose body is not valid JSON (or holds no vector at all), when
    embedding, then an EmbeddingError mentions the malformed answer, without a retry."""
    fake_openai.faults.append(fault)
    embedder, _ = embedder_for(fake_openai)
    with pytest.raises(EmbeddingError, match="malformed"):
        embedder.embed([one(title=title)])
    assert fake_openai.calls["/v1/embeddings"] == 1


def test_a_vector_of_the_wrong_dimension_is_rejected(fake_openai):
    """Given vectors one component too long, when embedding, then EmbeddingError names
    the dimensions."""
    fake_openai.faults.append({"wrong_dimensions": True})
    embedder, _ = embedder_for(fake_openai)
    with pytest.raises(EmbeddingError, match=rf"{DIMS + 1} dimensions, expected {DIMS}"):
        embedder.embed([one()])


def test_a_missing_vector_is_rejected(fake_openai):
    """Given one vector fewer than texts, when embedding, then EmbeddingError says so."""
    fake_openai.faults.append({"missing_vector": True})
    embedder, _ = embedder_for(fake_openai)
    with pytest.raises(EmbeddingError, match=r"returned 1 vectors for 2 texts"):
        embedder.embed([one()])  # two texts: the interests, and the title


def test_a_401_is_not_retried(fake_openai):
    """Given a 401, when embedding, then EmbeddingError after exactly one request."""
    fake_openai.faults.append({"status": 401})
    embedder, waits = embedder_for(fake_openai)
    with pytest.raises(EmbeddingError, match="rejected the request"):
        embedder.embed([one()])
    assert fake_openai.calls["/v1/embeddings"] == 1
    assert waits == []


# --- the worker, end to end ------------------------------------------------------------


def test_the_worker_matches_an_openai_event_and_reuses_its_vectors(conn, settings, fake_openai):
    """Given an "openai" event with a key configured, when the queue drains, then every
    vector comes from the OpenAI key and the lists are exact; a full rematch and a
    name-only edit then cost no request, and an interests edit costs exactly one request
    carrying only that user's texts."""
    people = generate_profiles(45, seed=21, id_prefix="oa-")
    event = add_attendees(conn, "openai-1", people, embedder="openai")
    cfg = openai_settings(settings, fake_openai)
    key = embedder_for_event(event, cfg).key
    worker = Matchmaker(cfg)

    drain(conn, worker)

    assert key.startswith("openai:") and key.endswith(f":d{DIMS}:q1")
    assert_exact(conn, event, key)
    assert vector_keys(conn, event) == {p.user_id: {key} for p in people}
    assert set(fake_openai.embedded_inputs()) == texts_of(people)
    assert 0 < fake_openai.calls["/v1/embeddings"] <= math.ceil(45 / settings.batch_size)
    lists = lists_of(conn, event.id)
    assert all(len(lists[p.user_id]) == 3 for p in people)

    fake_openai.reset()
    rematch_all(conn, event)
    assert len(queue_rows(conn, event.id)) == 45
    drain(conn, worker)
    assert fake_openai.calls["/v1/embeddings"] == 0
    assert lists_of(conn, event.id) == lists

    renamed = people[3].model_copy(update={"name": "Someone Else", "company": "Elsewhere Ltd"})
    add_attendees(conn, event, [renamed], embedder="openai")
    conn.execute(
        "SELECT mm_enqueue(%s, ARRAY[(SELECT id FROM profiles WHERE user_id = %s)],"
        " 2::smallint, 'test')",
        (event.id, renamed.user_id),
    )
    drain(conn, worker)
    assert fake_openai.calls["/v1/embeddings"] == 0

    edited = people[7].model_copy(update={"interests": ["quantum computing", "sailing"]})
    add_attendees(conn, event, [edited], embedder="openai")
    drain(conn, worker)
    requests = fake_openai.embedding_requests()
    assert len(requests) == 1
    assert "quantum computing; sailing" in requests[0].inputs
    assert set(requests[0].inputs) <= set(profile_texts(edited))
    assert_exact(conn, event, key)


def test_a_provider_outage_falls_back_to_local_and_switches_back_after_recovery(
    conn, settings, fake_openai, monkeypatch
):
    """Given an API failing every request, max_attempts=1 and a breaker that opens on the
    first fault, when the queue drains, then nobody goes dead: the "openai" event is
    matched exactly with the local embedder as a whole after one failing request's
    retries, while a local event is matched exactly; when the API is back, the next run's
    probe closes the breaker and the event switches back to OpenAI, exact again."""
    monkeypatch.setattr(oe, "BACKOFF_BASE_S", 0.0)  # the embedder's own retries: no sleeping
    cfg = openai_settings(
        settings,
        fake_openai,
        max_attempts=1,
        backoff_base_s=0.0,
        provider_breaker_window_s=0.0,
        provider_probe_interval_s=0.0,
    )
    down = add_attendees(
        conn, "openai-down", generate_profiles(12, seed=31, id_prefix="dn-"), embedder="openai"
    )
    fine = add_attendees(conn, "local-fine", generate_profiles(15, seed=32, id_prefix="ok-"))
    fake_openai.fail_all = {"status": 500}
    worker = Matchmaker(cfg)

    report = drain(conn, worker)

    assert report.dead == []
    assert queue_rows(conn, down.id) == []
    assert report.breaker_open
    assert (
        fake_openai.calls["/v1/embeddings"] == OpenAIEmbedder(client_for(fake_openai)).max_attempts
    )
    assert_exact(conn, down, LocalEmbedder().key)
    assert queue_rows(conn, fine.id) == []
    assert_exact(conn, fine, LocalEmbedder().key)
    choice = effective_embedder(down, cfg, breaker_of(conn, cfg))
    assert (choice.configured, choice.effective, choice.breaker) == ("openai", "local", "open")
    assert choice.since is not None and "HTTP 500" in choice.reason

    fake_openai.fail_all = None
    fake_openai.reset()
    report = drain(conn, worker)
    assert not report.breaker_open
    assert queue_rows(conn, down.id) == []
    # the probe, then the event's one batch of 12 users
    assert fake_openai.calls["/v1/embeddings"] == 2
    assert embedder_for_event(down, cfg).key.startswith("openai:")
    assert_exact(conn, down, embedder_for_event(down, cfg).key)
    assert effective_embedder(down, cfg, breaker_of(conn, cfg)).effective == "openai"


def test_an_outage_does_not_multiply_requests(conn, settings, fake_openai, monkeypatch):
    """Given an API answering 429 to everything, when one batch of 10 users is processed,
    then the worker makes at most max_attempts requests for it (it does not hammer a
    rate-limited provider with one retried call per user)."""
    monkeypatch.setattr(oe, "BACKOFF_BASE_S", 0.0)
    cfg = openai_settings(settings, fake_openai, max_attempts=1)
    add_attendees(
        conn, "openai-429", generate_profiles(10, seed=33, id_prefix="rl-"), embedder="openai"
    )
    fake_openai.fail_all = {"status": 429}
    worker = Matchmaker(cfg)
    worker.process_claimed(conn, repo.claim(conn, 10, 60))
    assert (
        fake_openai.calls["/v1/embeddings"] <= OpenAIEmbedder(client_for(fake_openai)).max_attempts
    )


def test_switching_a_matched_event_to_openai_re_embeds_everyone(conn, settings, fake_openai):
    """Given an event matched with the local embedder, when its embedder is set to
    "openai", then everyone is re-queued and, after a drain, every vector comes from the
    OpenAI key and the lists are exact with it."""
    people = generate_profiles(30, seed=41, id_prefix="sw-")
    event = add_attendees(conn, "switch-1", people)
    cfg = openai_settings(settings, fake_openai)
    worker = Matchmaker(cfg)
    drain(conn, worker)
    assert_exact(conn, event, LocalEmbedder().key)
    assert fake_openai.calls["/v1/embeddings"] == 0

    conn.execute("UPDATE events SET embedder = 'openai' WHERE id = %s", (event.id,))

    assert {r["user_id"] for r in queue_rows(conn, event.id)} == {p.user_id for p in people}
    drain(conn, worker)
    event = refreshed(conn, event)
    key = embedder_for_event(event, cfg).key
    assert key.startswith("openai:")
    assert all(key in keys for keys in vector_keys(conn, event).values())
    assert set(fake_openai.embedded_inputs()) == texts_of(people)
    assert_exact(conn, event, key)


def test_a_key_appearing_re_embeds_the_whole_event(conn, settings, fake_openai):
    """Given an "openai" event matched without a key (local fallback), when a key is
    configured and the next batch of the event runs, then the worker sees the effective
    embedder changed and re-queues the whole event; after a drain, every vector is
    OpenAI's and the lists are exact with the OpenAI key."""
    people = generate_profiles(30, seed=51, id_prefix="ky-")
    event = add_attendees(conn, "key-1", people, embedder="openai")
    keyless = openai_settings(settings, None)
    assert embedder_for_event(event, keyless).key == LocalEmbedder().key
    drain(conn, Matchmaker(keyless))
    assert_exact(conn, event, LocalEmbedder().key)
    assert fake_openai.calls["/v1/embeddings"] == 0

    cfg = openai_settings(settings, fake_openai)
    newcomer = generate_profiles(1, seed=52, id_prefix="ky-new-")[0]
    add_attendees(conn, event, [newcomer], embedder="openai")
    after_first: list[dict[str, Any]] = []

    def on_batch(_batch: Any) -> None:
        if not after_first:
            after_first.extend(queue_rows(conn, event.id))

    drain(conn, Matchmaker(cfg), on_batch=on_batch)

    # After the first batch (the newcomer), everyone is queued again to be re-embedded.
    requeued = {r["user_id"] for r in after_first if r["reason"] == "embedder_changed"}
    assert requeued == {p.user_id for p in people}
    assert {r["user_id"] for r in after_first} == {p.user_id for p in [*people, newcomer]}
    assert {r["status"] for r in after_first} == {"pending"}
    key = embedder_for_event(event, cfg).key
    assert key.startswith("openai:")
    assert all(key in keys for keys in vector_keys(conn, event).values())
    assert_exact(conn, event, key)


# --- what it costs ---------------------------------------------------------------------


def test_requests_and_tokens_for_1000_attendees_and_one_newcomer(
    conn, settings, fake_openai, capsys
):
    """Given 1,000 synthetic attendees in an "openai" event, when fully matched, then the
    requests and tokens are measured (printed for the docs); one newcomer then costs
    exactly one request."""
    people = generate_profiles(1000, seed=1, id_prefix="k-")
    event = add_attendees(conn, "cost-1000", people, embedder="openai")
    cfg = openai_settings(settings, fake_openai, openai_embedding_dimensions=256)
    worker = Matchmaker(cfg)

    drain(conn, worker)
    full_requests = fake_openai.calls["/v1/embeddings"]
    full_tokens = fake_openai.embedding_tokens
    full_inputs = len(fake_openai.embedded_inputs())

    fake_openai.reset()
    newcomer = generate_profiles(1, seed=2, id_prefix="k-new-")[0]
    add_attendees(conn, event, [newcomer], embedder="openai")
    drain(conn, worker)
    one_requests = fake_openai.calls["/v1/embeddings"]
    one_tokens = fake_openai.embedding_tokens

    with capsys.disabled():
        print(
            f"\n[openai cost] 1,000 attendees (batch_size={cfg.batch_size}): "
            f"{full_requests} requests, {full_inputs} inputs, {full_tokens} tokens; "
            f"one newcomer: {one_requests} request(s), {one_tokens} tokens"
        )
    assert full_requests > 0 and full_tokens > 0
    assert one_requests == 1 and one_tokens > 0
    assert_exact(conn, refreshed(conn, event), embedder_for_event(event, cfg).key)

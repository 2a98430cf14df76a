"""The provider fault suite: an "openai" event of 200 attendees against the fake OpenAI
server misbehaving in each way we know, counting the requests it receives.

For every fault class - healthy, 30 % transient faults, a full outage then recovery, each
malformed answer, a bad key, one rejected input - it asserts the number of embeddings
requests, that no user goes dead for a provider fault, that every list is oracle-exact
for the embedder in effect at the end, and that the event returns to OpenAI after the
provider recovers. The counts are recorded in docs/reliability.md (printed with -s).
"""

from __future__ import annotations

import math
import random
import time
from typing import TYPE_CHECKING, Any

import pytest

from core.data import repository as repo
from core.data.repository import Conn
from core.embedding import openai_provider as oe
from core.embedding.local import LocalEmbedder
from core.embedding.selection import effective_embedder, embedder_for_event
from core.models import EventRecord
from core.queue.worker import Matchmaker, WorkerReport
from core.settings import Settings
from tests.helpers import add_attendees, queue_rows
from tests.integration.test_openai_embeddings import breaker_of, openai_settings
from tooling import local_runs
from tooling.oracle import verify_event
from tooling.synthetic import generate_profiles

if TYPE_CHECKING:
    from tests.fake_openai import FakeOpenAI

pytest_plugins = ("tests.fake_openai",)
pytestmark = pytest.mark.reliability

ATTENDEES = 200
BATCH_SIZE = 50
BATCHES = math.ceil(ATTENDEES / BATCH_SIZE)
MAX_ATTEMPTS = 3
EMBEDDER_ATTEMPTS = 4  # the embedder's own tries of a request (OpenAIEmbedder default)
CODE = "faults-2026"


def fault_settings(settings: Settings, fake: FakeOpenAI, **update: Any) -> Settings:
    return openai_settings(
        settings,
        fake,
        batch_size=BATCH_SIZE,
        bulk_batch_seconds=0.0,  # batches of exactly BATCH_SIZE: exact request counts
        max_attempts=MAX_ATTEMPTS,
        backoff_base_s=0.0,
        backoff_max_s=0.0,
        provider_defer_s=0.0,
        **update,
    )


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oe, "BACKOFF_BASE_S", 0.001)


def openai_event(conn: Conn, seed: int = 91) -> EventRecord:
    people = generate_profiles(ATTENDEES, seed=seed, id_prefix="pf-")
    return add_attendees(conn, CODE, people, embedder="openai")


def run(conn: Conn, worker: Matchmaker) -> WorkerReport:
    return worker.run(conn, deadline=time.monotonic() + 60)


def run_until_drained(conn: Conn, worker: Matchmaker, event: EventRecord) -> list[WorkerReport]:
    """Short runs; a batch the provider failed is put back until its run ends: wait for it
    and run again (at most 5 runs)."""
    reports = [worker.run(conn, deadline=time.monotonic() + 2)]
    while queue_rows(conn, event.id) and len(reports) < 5:
        wait_until_ready(conn, event)
        reports.append(worker.run(conn, deadline=time.monotonic() + 2))
    return reports


def wait_until_ready(conn: Conn, event: EventRecord) -> None:
    row = conn.execute(
        "SELECT extract(epoch FROM max(run_after) - now())::float8 FROM matchmaking_queue"
        " WHERE event_id = %s AND status = 'pending'",
        (event.id,),
    ).fetchone()
    assert row is not None and row[0] is not None and row[0] <= 2.5
    time.sleep(max(0.0, row[0]) + 0.05)


def requests(fake: FakeOpenAI) -> int:
    return fake.calls["/v1/embeddings"]


def current(conn: Conn, event: EventRecord) -> EventRecord:
    record = repo.fetch_event_by_id(conn, event.id)
    assert record is not None
    return record


def assert_exact_with(conn: Conn, event: EventRecord, key: str) -> None:
    """Every list oracle-exact for `key`, nothing queued, nobody dead, and the event's
    vectors all from that embedder."""
    event = current(conn, event)
    job = repo.status_figures(conn, event.id).job or {}
    assert job.get("embedder_key") == key
    report = verify_event(conn, event, key)
    assert report.checked == ATTENDEES
    assert report.ok, (report.mismatches[:3], report.missing_vectors[:3], report.stale_vectors)
    assert queue_rows(conn, event.id) == []


def in_effect(conn: Conn, event: EventRecord, cfg: Settings) -> Any:
    return effective_embedder(current(conn, event), cfg, breaker_of(conn, cfg))


def test_healthy_provider_one_request_per_batch(
    conn: Conn, settings: Settings, fake_openai: FakeOpenAI
) -> None:
    cfg = fault_settings(settings, fake_openai)
    event = openai_event(conn)
    report = run(conn, Matchmaker(cfg))
    assert (report.completed, report.dead, report.deferred) == (ATTENDEES, [], 0)
    assert requests(fake_openai) == BATCHES
    assert requests(fake_openai) / ATTENDEES <= 0.1
    assert_exact_with(conn, event, embedder_for_event(event, cfg).key)
    assert in_effect(conn, event, cfg).breaker == "closed"
    print(f"\n[provider faults] healthy: {requests(fake_openai)} requests for {ATTENDEES} users")


def test_thirty_percent_transient_faults_are_retried_without_a_storm(
    conn: Conn, settings: Settings, fake_openai: FakeOpenAI
) -> None:
    cfg = fault_settings(settings, fake_openai)
    event = openai_event(conn)
    draw = random.Random(15)
    script = [{"status": draw.choice([500, 503, 429])} if draw.random() < 0.3 else {}]
    for _ in range(200):
        script.append({"status": draw.choice([500, 503, 429])} if draw.random() < 0.3 else {})
    fake_openai.faults.extend(script)
    reports = run_until_drained(conn, Matchmaker(cfg), event)
    sent = fake_openai.embedding_requests()
    faulted = sum(1 for r in sent if r.fault)
    assert all(not r.dead for r in reports)
    # one request per batch, plus one retry per transient fault met
    assert len(sent) - faulted <= BATCHES + sum(r.deferred for r in reports) // BATCH_SIZE
    assert (len(sent) - faulted) / ATTENDEES <= 0.1
    assert_exact_with(conn, event, embedder_for_event(event, cfg).key)
    print(
        f"\n[provider faults] 30 % transient: {len(sent)} requests ({faulted} faulted) "
        f"for {ATTENDEES} users in {len(reports)} run(s)"
    )


def test_an_outage_falls_back_to_local_and_recovery_switches_back(
    conn: Conn, settings: Settings, fake_openai: FakeOpenAI
) -> None:
    cfg = fault_settings(
        settings, fake_openai, provider_breaker_window_s=0.0, provider_probe_interval_s=3600.0
    )
    event = openai_event(conn)
    openai_key = embedder_for_event(event, cfg).key
    fake_openai.fail_all = {"status": 503}
    worker = Matchmaker(cfg)

    down = run(conn, worker)
    assert down.dead == [] and down.breaker_open
    assert requests(fake_openai) == EMBEDDER_ATTEMPTS  # one batch's retries, then none
    assert_exact_with(conn, event, LocalEmbedder().key)
    choice = in_effect(conn, event, cfg)
    assert (choice.effective, choice.breaker) == ("local", "open")
    assert choice.since is not None and "HTTP 503" in choice.reason
    assert run(conn, worker).batches == 0
    assert requests(fake_openai) == EMBEDDER_ATTEMPTS  # open, probe not due: nothing sent
    outage = requests(fake_openai)

    # recovery: the next probe (due now) closes the breaker; the event switches back
    fake_openai.fail_all = None
    conn.execute("UPDATE provider_breaker SET last_probe_at = now() - interval '2 hours'")
    back = run(conn, worker)
    assert back.dead == [] and not back.breaker_open
    assert requests(fake_openai) - outage == 1 + BATCHES  # the probe, then one per batch
    assert_exact_with(conn, event, openai_key)
    assert in_effect(conn, event, cfg).effective == "openai"
    print(
        f"\n[provider faults] outage: {outage} requests while down (breaker open after one "
        f"batch), {requests(fake_openai) - outage} to switch back ({ATTENDEES} users)"
    )


def test_an_outage_within_the_window_defers_users_and_kills_nobody(
    conn: Conn, settings: Settings, fake_openai: FakeOpenAI
) -> None:
    """Before the breaker opens, each run costs one batch's attempts; every batch is put
    back without counting the attempt, so after more runs than MAX_ATTEMPTS nobody is
    dead, and when the provider answers again everyone is matched with it."""
    cfg = fault_settings(settings, fake_openai, provider_breaker_window_s=3600.0)
    event = openai_event(conn)
    fake_openai.fail_all = {"status": 500}
    worker = Matchmaker(cfg)
    for runs in range(1, MAX_ATTEMPTS + 3):
        report = worker.run(conn, deadline=time.monotonic() + 2)
        assert report.dead == [] and not report.breaker_open
        assert report.deferred == ATTENDEES  # each batch once: not claimed again this run
        assert requests(fake_openai) == EMBEDDER_ATTEMPTS * runs
        wait_until_ready(conn, event)
    rows = queue_rows(conn, event.id)
    assert len(rows) == ATTENDEES
    assert {(r["status"], r["attempts"]) for r in rows} == {("pending", 0)}
    assert all("embeddings API unavailable" in r["last_error"] for r in rows)
    choice = in_effect(conn, event, cfg)
    assert (choice.effective, choice.breaker) == ("openai", "closed")
    assert "failing since" in choice.reason

    fake_openai.fail_all = None
    sent = requests(fake_openai)
    run(conn, worker)
    assert requests(fake_openai) - sent == BATCHES
    assert_exact_with(conn, event, embedder_for_event(event, cfg).key)


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ({"malformed": True}, "JSONDecodeError"),
        ({"html": True}, "the body is not an embeddings JSON object"),
        ({"wrong_dimensions": True}, "65 dimensions, expected 64"),
        ({"missing_vector": True}, "vectors for"),
        ({"nan": True}, "NaN or infinite"),
    ],
    ids=["invalid-json", "html", "wrong-dimension", "wrong-count", "nan"],
)
def test_a_malformed_answer_is_a_provider_fault_with_a_precise_message(
    conn: Conn, settings: Settings, fake_openai: FakeOpenAI, fault: dict[str, Any], message: str
) -> None:
    cfg = fault_settings(
        settings, fake_openai, provider_breaker_window_s=0.0, provider_probe_interval_s=0.0
    )
    event = openai_event(conn)
    fake_openai.fail_all = fault
    worker = Matchmaker(cfg)
    report = run(conn, worker)
    assert report.dead == [] and report.failed == 0
    assert requests(fake_openai) == 1  # not retried, not split
    assert_exact_with(conn, event, LocalEmbedder().key)
    choice = in_effect(conn, event, cfg)
    assert choice.breaker == "open" and message in choice.reason, choice.reason

    fake_openai.fail_all = None
    report = run(conn, worker)
    assert requests(fake_openai) == 2 + BATCHES  # the probe, then one per batch
    assert_exact_with(conn, event, embedder_for_event(event, cfg).key)
    print(f"\n[provider faults] {next(iter(fault))}: 1 request, then local; 1 probe + {BATCHES}")


def test_a_bad_key_costs_one_request_and_no_dead_user(
    conn: Conn, settings: Settings, fake_openai: FakeOpenAI
) -> None:
    cfg = fault_settings(settings, fake_openai, provider_probe_interval_s=3600.0)
    event = openai_event(conn)
    fake_openai.fail_all = {"status": 401}
    worker = Matchmaker(cfg)
    report = run(conn, worker)
    assert report.dead == [] and report.breaker_open
    assert requests(fake_openai) == 1  # permanent: no retry, no split, breaker open
    assert_exact_with(conn, event, LocalEmbedder().key)
    choice = in_effect(conn, event, cfg)
    assert (choice.effective, choice.breaker) == ("local", "open")
    assert "HTTP 401" in choice.reason
    verified = local_runs.verify(conn, current(conn, event), cfg)  # `matchmaker verify`
    assert verified.ok and verified.embedder_key == LocalEmbedder().key
    assert "circuit breaker is open" in verified.embedder_reason
    for _ in range(3):  # later runs send nothing until a probe is due
        run(conn, worker)
    assert requests(fake_openai) == 1
    print(f"\n[provider faults] bad key: {requests(fake_openai)} request for {ATTENDEES} users")


def test_one_rejected_input_fails_its_user_alone_within_the_request_budget(
    conn: Conn, settings: Settings, fake_openai: FakeOpenAI
) -> None:
    cfg = fault_settings(settings, fake_openai)
    event = openai_event(conn)
    people = generate_profiles(ATTENDEES, seed=91, id_prefix="pf-")
    poison = people[7]
    fake_openai.reject_inputs.add(oe.profile_texts(poison)[0])
    worker = Matchmaker(cfg)
    report = run(conn, worker)  # no backoff: the user's attempts all happen in this run
    budget = 2 * math.ceil(math.log2(BATCH_SIZE + 1)) + 4
    # the other batches, the bisection of the poison's batch, then the user alone
    assert requests(fake_openai) <= (BATCHES - 1) + budget + (MAX_ATTEMPTS - 1)
    assert report.completed == ATTENDEES - 1 and report.failed == MAX_ATTEMPTS
    assert [d.profile_id for d in report.dead] == [
        r["profile_id"] for r in queue_rows(conn, event.id)
    ]
    rows = queue_rows(conn, event.id)
    assert [(r["user_id"], r["status"]) for r in rows] == [(poison.user_id, "dead")]
    assert "because of an input" in rows[0]["last_error"]
    assert in_effect(conn, event, cfg).breaker == "closed"
    print(f"\n[provider faults] one rejected input: {requests(fake_openai)} requests")


def test_a_key_that_appears_switches_a_fallen_back_event_to_openai_on_its_own(
    conn: Conn, settings: Settings, fake_openai: FakeOpenAI
) -> None:
    """Given an "openai" event matched without a key (the local embedder, and status and
    verify say so), when a key is configured, then the next run - with nothing queued -
    queues the event whole and matches it with OpenAI, exact."""
    no_key = openai_settings(settings, None, batch_size=BATCH_SIZE, bulk_batch_seconds=0.0)
    event = openai_event(conn)
    report = run(conn, Matchmaker(no_key))
    assert report.fallback_users == ATTENDEES
    assert_exact_with(conn, event, LocalEmbedder().key)
    verified = local_runs.verify(conn, current(conn, event), no_key)
    assert verified.ok and verified.embedder_key == LocalEmbedder().key
    assert "no OpenAI key is configured" in verified.embedder_reason
    assert requests(fake_openai) == 0

    cfg = fault_settings(settings, fake_openai)
    report = run(conn, Matchmaker(cfg))
    assert report.completed >= ATTENDEES and report.dead == []
    assert requests(fake_openai) == BATCHES
    assert_exact_with(conn, event, embedder_for_event(event, cfg).key)
    verified = local_runs.verify(conn, current(conn, event), cfg)
    assert verified.ok and verified.embedder_key.startswith("openai:")

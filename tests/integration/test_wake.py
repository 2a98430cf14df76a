"""The wake path (issue 14): a write through the API handler that queues work sends the
event code to the wake queue after its commit, and the matchmaker handler, invoked with
that SQS batch as the event source mapping would, serves the woken events first. Real
PostgreSQL; moto for SQS and Lambda; EMF metrics read from stdout."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

import core.settings
import handlers.matchmaker
from core.data import repository as repo
from core.data.repository import Conn
from core.models import EventIn, EventSettings
from core.observability import metrics
from tests.helpers import queue_rows
from tests.integration.api_support import (
    ADA,
    CODE,
    Api,
    AwsFakes,
    api_for,
    request,
    reset_handler_state,
)
from tests.integration.test_metrics import emitted
from tests.integration.test_worker_handlers import FakeContext, load_event
from tooling.local_runs import import_file, import_profiles
from tooling.synthetic import generate_profiles

pytestmark = pytest.mark.filterwarnings("ignore:No application metrics to publish:UserWarning")

K = 3  # create_event.json's k
OTHER = "devsummit-2026"


@pytest.fixture
def wake_queue(fakes: AwsFakes) -> str:
    import core.aws  # noqa: PLC0415 - the client moto patches

    url: str = core.aws.sqs_client().create_queue(QueueName=f"wake-{id(object())}")["QueueUrl"]
    return url


@pytest.fixture
def api(
    monkeypatch: pytest.MonkeyPatch, db_url: str, fakes: AwsFakes, wake_queue: str
) -> Iterator[Api]:
    monkeypatch.setenv("WAKE_QUEUE_URL", wake_queue)
    monkeypatch.setenv("POWERTOOLS_METRICS_NAMESPACE", "Matchmaker")
    monkeypatch.delenv("POWERTOOLS_METRICS_DISABLED", raising=False)
    metrics.clear_metrics()
    with api_for(monkeypatch, db_url, fakes) as configured:
        reset_handler_state()
        yield configured
    reset_handler_state()
    metrics.clear_metrics()


def event_with_crowd(conn: Conn, code: str, crowd: int, seed: int) -> int:
    """`code` with create_event.json's settings (k = 3) and `crowd` attendees, matched."""
    settings = EventSettings(k=K)
    event = import_profiles(
        conn,
        EventIn(code=code, settings=settings),
        generate_profiles(crowd, seed=seed, id_prefix=f"{code[:3]}-"),
    )
    return event.id


def drain_everything(conn: Conn) -> None:
    handlers.matchmaker.lambda_handler({"source": "schedule"}, FakeContext())
    assert repo.live_queue_depth(conn) == 0


def received(queue_url: str) -> list[dict[str, Any]]:
    """Every message in the queue, as the SQS records a Lambda event source mapping hands
    over (messageId, receiptHandle, body, eventSource)."""
    import core.aws  # noqa: PLC0415

    records: list[dict[str, Any]] = []
    while True:
        batch = (
            core.aws.sqs_client()
            .receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, VisibilityTimeout=60)
            .get("Messages", [])
        )
        if not batch:
            return records
        records.extend(
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "eventSource": "aws:sqs",
            }
            for m in batch
        )


def put(api: Api, user_id: str, seed: int, code: str = CODE) -> int:
    [profile] = generate_profiles(1, seed=seed, id_prefix="new-")
    body = profile.model_dump(exclude={"user_id"}, exclude_none=True)
    return api(request("put_attendee", code=code, user_id=user_id, body=body)).status


def matches_of(api: Api, user_id: str, code: str = CODE) -> list[Any]:
    reply = api(request("get_matches", code=code, user_id=user_id))
    assert reply.status == 200, reply
    matches: list[Any] = reply.json["matches"]
    return matches


def test_a_join_wakes_the_matchmaker_and_the_woken_run_gives_a_full_list(
    api, conn, wake_queue, capsys
):
    """Given a matched event of 20, when a newcomer joins through the API, then one wake
    naming the event is on the queue (no async invoke, no trigger call), WakesSent is
    counted, and the run that batch starts gives the newcomer k matches."""
    event_with_crowd(conn, CODE, 20, seed=1)
    drain_everything(conn)
    capsys.readouterr()

    assert put(api, ADA, seed=99) == 200

    assert emitted(capsys.readouterr().out).get("WakesSent") == [1.0]
    records = received(wake_queue)
    assert [json.loads(r["body"])["event_code"] for r in records] == [CODE]
    assert api.invocations == []
    assert matches_of(api, ADA) == []

    summary = handlers.matchmaker.lambda_handler({"Records": records}, FakeContext())

    assert summary["source"] == "wake"
    assert summary["woken_for"] == 1
    assert summary["completed"] >= 1
    assert len(matches_of(api, ADA)) == K


def test_an_edit_a_departure_and_a_dismissal_each_wake_but_an_unchanged_put_does_not(
    api, conn, wake_queue
):
    """Given a matched event, then a changed profile, a dismissal and a departure each
    send one wake after their commit; a PUT that changes nothing sends none."""
    event_with_crowd(conn, CODE, 12, seed=2)
    assert put(api, ADA, seed=7) == 200
    drain_everything(conn)
    received(wake_queue)  # the join's wake

    assert put(api, ADA, seed=7) == 200  # the same profile again
    assert received(wake_queue) == []

    assert put(api, ADA, seed=8) == 200  # another profile: matching-relevant fields changed
    assert len(received(wake_queue)) == 1
    drain_everything(conn)

    other = matches_of(api, ADA)[0]["user_id"]
    dismissal = request("dismiss", body={"dismissed_user_id": other})
    assert api(dismissal).status == 204
    assert len(received(wake_queue)) == 1
    assert api(dismissal).status == 204  # again: nothing new is queued, no wake
    assert received(wake_queue) == []

    assert api(request("remove_attendee", user_id=other)).status == 204
    assert [json.loads(r["body"])["event_code"] for r in received(wake_queue)] == [CODE]


def test_a_burst_of_joins_is_served_by_the_first_woken_run(api, conn, wake_queue):
    """Given a matched event, when 30 newcomers join at once, then 30 wakes are queued, and
    the first batch of 10 (what the event source mapping hands one invocation) starts a
    run that matches all 30; the runs the rest start find nothing left."""
    event_with_crowd(conn, CODE, 20, seed=3)
    drain_everything(conn)
    newcomers = [f"n-{i:04d}" for i in range(30)]
    for i, user_id in enumerate(newcomers):
        assert put(api, user_id, seed=100 + i) == 200
    records = received(wake_queue)
    assert len(records) == 30

    first = handlers.matchmaker.lambda_handler({"Records": records[:10]}, FakeContext())
    later = [
        handlers.matchmaker.lambda_handler({"Records": records[i : i + 10]}, FakeContext())
        for i in (10, 20)
    ]

    assert first["completed"] >= 30
    assert [run["completed"] for run in later] == [0, 0]
    assert all(len(matches_of(api, user_id)) == K for user_id in newcomers)


def test_a_failed_wake_keeps_the_user_queued_and_the_schedule_matches_them(
    api, conn, monkeypatch, capsys, caplog
):
    """Given a wake queue URL that does not exist (SQS refuses the send), when a newcomer
    joins, then the PUT still answers 200, the newcomer is queued at priority 3,
    WakeFailures is counted, and the next scheduled run gives them a full list."""
    event_id = event_with_crowd(conn, CODE, 15, seed=4)
    drain_everything(conn)
    monkeypatch.setenv(
        "WAKE_QUEUE_URL", "https://sqs.us-east-1.amazonaws.com/123456789012/no-such-queue"
    )
    core.settings.get_settings.cache_clear()
    capsys.readouterr()

    assert put(api, ADA, seed=5) == 200

    out = capsys.readouterr().out
    assert emitted(out).get("WakeFailures") == [1.0]
    assert "WakesSent" not in emitted(out)
    assert [(r["user_id"], r["priority"], r["status"]) for r in queue_rows(conn, event_id)] == [
        (ADA, 3, "pending")
    ]
    [failure] = [r for r in caplog.records if r.getMessage() == "wake not sent"]
    assert (failure.event_code, failure.reason) == (CODE, "attendee")  # type: ignore[attr-defined]
    [profile] = generate_profiles(1, seed=5, id_prefix="new-")
    assert profile.name not in caplog.text  # no profile data in the log

    summary = handlers.matchmaker.lambda_handler(
        load_event("matchmaker/scheduled.json"), FakeContext()
    )
    assert summary["completed"] == 1
    assert len(matches_of(api, ADA)) == K


def test_a_woken_run_serves_the_event_that_woke_it_first(api, conn, monkeypatch):
    """Given two events with newcomers queued (the other one queued first), when the run
    woken for CODE starts, then every batch of CODE is claimed before any of the other."""
    event_with_crowd(conn, OTHER, 40, seed=5)
    woken = event_with_crowd(conn, CODE, 40, seed=6)
    monkeypatch.setenv("BATCH_SIZE", "10")
    monkeypatch.setenv("BULK_BATCH_SECONDS", "0")  # many small batches: an order to see
    core.settings.get_settings.cache_clear()
    reset_handler_state()
    claimed_for: list[int] = []
    real_claim = repo.claim

    def claim(conn: Conn, size: int, lease: float, event_id: int | None = None) -> Any:
        rows = real_claim(conn, size, lease, event_id)
        claimed_for.extend(row.event_id for row in rows[:1])
        return rows

    monkeypatch.setattr(repo, "claim", claim)
    wake = {"Records": [{"messageId": "m-1", "body": json.dumps({"event_code": CODE})}]}

    summary = handlers.matchmaker.lambda_handler(wake, FakeContext())

    assert summary["completed"] == 80
    assert len(claimed_for) >= 8
    first_other = claimed_for.index(next(e for e in claimed_for if e != woken))
    assert set(claimed_for[:first_other]) == {woken}
    assert woken not in claimed_for[first_other:]


def test_the_committed_wake_batch_names_its_events_once_each_in_order():
    """events/matchmaker/wake_batch.json (three messages, two for the same event) reads as
    a wake for each event once, in arrival order; an unreadable message is skipped."""
    batch = load_event("matchmaker/wake_batch.json")
    batch["Records"].append({"messageId": "broken", "body": "not json"})

    invocation = handlers.matchmaker.invocation_of(batch)

    assert invocation.source == "wake"
    assert invocation.event_codes == [CODE, OTHER]
    scheduled = handlers.matchmaker.invocation_of(load_event("matchmaker/scheduled.json"))
    assert (scheduled.source, scheduled.event_codes) == ("schedule", [])
    triggered = handlers.matchmaker.invocation_of(load_event("matchmaker/trigger.json"))
    assert triggered.event_codes == [CODE]


def test_an_import_wakes_the_matchmaker_once_after_it_committed(api, conn, wake_queue, tmp_path):
    """Given a JSONL file of 5 attendees, when `matchmaker import` imports it with the
    stack's WAKE_QUEUE_URL, then one wake names the event and the run it starts matches
    all 5; a file with no valid row sends none."""
    people = generate_profiles(5, seed=8, id_prefix="imp-")
    path = tmp_path / "people.jsonl"
    path.write_text("".join(p.model_dump_json(exclude_none=True) + "\n" for p in people))

    report = import_file(conn, EventIn(code=CODE), path, wake_queue)

    assert report.imported == 5
    records = received(wake_queue)
    assert [json.loads(r["body"]) for r in records] == [
        {"type": "matchmaking.wake", "event_code": CODE, "reason": "import"}
    ]
    summary = handlers.matchmaker.lambda_handler({"Records": records}, FakeContext())
    assert summary["completed"] == 5
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    import_file(conn, EventIn(code=CODE), empty, wake_queue)
    assert received(wake_queue) == []

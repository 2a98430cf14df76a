"""`matchmaker serve`'s stand-in for the wake queue's event source mapping
(tooling.local_stack.WakeConsumer and Scheduler) on moto's SQS: a burst of wakes becomes a
few runs, each handed the SQS records as Lambda would, and the messages are deleted only
after a run that succeeded. The run itself is a recorder here (no database): what the
handler does with a batch is tested in tests/integration/test_wake.py."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from moto import mock_aws

import core.aws
from tests.integration.api_support import AWS_ENV
from tooling.local_stack import Scheduler, WakeConsumer

RUN_S = 0.3  # how long each recorded run takes: wakes arriving meanwhile wait for the next


@pytest.fixture
def queue_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        core.aws.reset_clients()
        yield core.aws.sqs_client().create_queue(QueueName="wake")["QueueUrl"]
        core.aws.reset_clients()


class Runs:
    def __init__(self, fail_first: bool = False) -> None:
        self.events: list[dict[str, Any]] = []
        self.fail_first = fail_first
        self.lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.events.append(event)
            batches = [e for e in self.events if "Records" in e]
            failing = self.fail_first and batches == [event]
        time.sleep(RUN_S)
        if failing:
            raise RuntimeError("the run failed")

    def wakes(self) -> list[list[str]]:
        with self.lock:
            return [
                [json.loads(r["body"])["event_code"] for r in e["Records"]]
                for e in self.events
                if "Records" in e
            ]


def send(queue_url: str, codes: list[str]) -> None:
    for code in codes:
        assert core.aws.send_wake(queue_url, code, "attendee")


def visible(queue_url: str) -> int:
    attributes = core.aws.sqs_client().get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]) + int(
        attributes["ApproximateNumberOfMessagesNotVisible"]
    )


def wait_for(check: Any, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def started(runs: Runs, queue_url: str, window_s: float) -> tuple[Scheduler, WakeConsumer]:
    scheduler = Scheduler(3600, runs)
    consumer = WakeConsumer(queue_url, scheduler, window_s=window_s)
    scheduler.thread.start()
    consumer.thread.start()
    wait_for(lambda: len(runs.events) >= 1)  # the first (schedule) run, at start
    return scheduler, consumer


def test_a_burst_of_wakes_becomes_a_few_runs_and_their_messages_are_deleted(queue_url):
    """Given 150 wakes for two events waiting in the queue (a burst), when the consumer
    starts (its 1 s window, at most 100 per batch), then every wake reaches a run, in a
    few runs of many wakes each (not 150 runs; how many a window gathers depends on how
    fast moto answers on a busy machine), and the queue is empty once they succeeded."""
    send(queue_url, ["ev-a", "ev-b"] * 75)
    runs = Runs()
    scheduler, consumer = started(runs, queue_url, window_s=1.0)
    try:
        wait_for(lambda: sum(len(w) for w in runs.wakes()) >= 150)
        wait_for(lambda: visible(queue_url) == 0)
    finally:
        consumer.stop()
        scheduler.stop()
    wakes = runs.wakes()
    assert sum(len(w) for w in wakes) == 150
    assert 2 <= len(wakes) <= 6, [len(w) for w in wakes]
    assert all(10 <= len(w) <= 100 for w in wakes), [len(w) for w in wakes]
    assert scheduler.runs["wake"] == len(wakes)


def test_wakes_of_a_failed_run_stay_in_the_queue(queue_url):
    """Given a run that fails on its first batch, then its wakes are not deleted: they stay
    in the queue (invisible until their visibility timeout, as with Lambda), and a wake
    sent afterwards is still served and deleted."""
    runs = Runs(fail_first=True)
    scheduler, consumer = started(runs, queue_url, window_s=0.2)
    try:
        send(queue_url, ["ev-a"] * 3)
        wait_for(lambda: len(runs.wakes()) >= 1)
        time.sleep(RUN_S + 0.2)
        send(queue_url, ["ev-b"])
        wait_for(lambda: len(runs.wakes()) >= 2)
        time.sleep(RUN_S + 0.2)
        left = visible(queue_url)
    finally:
        consumer.stop()
        scheduler.stop()
    assert runs.wakes()[0] == ["ev-a"] * 3
    assert runs.wakes()[1] == ["ev-b"]
    assert left == 3  # the failed batch's messages, not the served one

"""`matchmaker serve`'s scheduler counts every matchmaker invocation as it starts (the
latency benchmark's "runs per 100 writes"): a woken run may linger long after the moment a
caller counts, and a run that fails is an invocation too. `busy` tells while one runs."""

from __future__ import annotations

import threading
from typing import Any

from tooling.local_stack import Scheduler


def test_a_run_is_counted_as_it_starts_and_busy_while_it_lasts() -> None:
    """Given a scheduler whose runs block until released, then the schedule run and a
    woken run are each counted (by source) and `busy` while they run, before they end;
    a failing run is counted as well."""
    started = threading.Semaphore(0)
    release = threading.Semaphore(0)
    seen: list[tuple[dict[str, int], bool]] = []
    scheduler: Scheduler

    def run(event: dict[str, Any]) -> None:
        seen.append((dict(scheduler.runs), scheduler.busy))
        started.release()
        assert release.acquire(timeout=10)
        if event.get("Records") == [{"body": "fail"}]:
            raise RuntimeError("this run fails")

    scheduler = Scheduler(3600, run)
    scheduler.thread.start()
    try:
        assert started.acquire(timeout=10)  # the first run, at start: a schedule run
        assert seen == [({"schedule": 1}, True)]
        assert scheduler.runs == {"schedule": 1}  # counted while it is still going
        scheduler.wake_with([{"body": "fail"}], lambda: None)
        release.release()
        assert started.acquire(timeout=10)
        assert seen[-1] == ({"schedule": 1, "wake": 1}, True)
        scheduler.wake_with([{"body": "ok"}], lambda: None)
        release.release()  # the failing run ends: the next one is still served
        assert started.acquire(timeout=10)
        assert scheduler.runs == {"schedule": 1, "wake": 2}
        release.release()
    finally:
        scheduler._stop.set()
        scheduler.wake()
        release.release()
        scheduler.thread.join(timeout=10)
    assert scheduler.busy is False

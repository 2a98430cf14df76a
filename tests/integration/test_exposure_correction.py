"""The exposure correction ("hubness", issue 17) through the real API, queue, worker and
CLI: switching it re-matches the event through the queue, every list then equals the
brute-force oracle's top k by s' (scores bit-identical), switching back restores the plain
lists, the status shows the setting, and the CLI prints and sets it like the API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.data import repository as repo
from core.data.repository import Conn
from core.models import EventIn, EventRecord, EventSettings
from core.queue.worker import Matchmaker, default_embedder
from core.settings import Settings
from tests.helpers import lists_of, queue_rows
from tests.integration.api_support import request
from tooling.local_runs import import_profiles
from tooling.oracle import verify_event
from tooling.synthetic import generate_profiles

pytestmark = pytest.mark.filterwarnings("ignore:No application metrics to publish:UserWarning")

CODE = "hub-ev"
ATTENDEES = 80


def matched_event(conn: Conn, settings: Settings, event_settings: EventSettings) -> EventRecord:
    """CODE with ATTENDEES synthetic attendees, drained: every list oracle-exact."""
    event = import_profiles(
        conn,
        EventIn(code=CODE, settings=event_settings),
        generate_profiles(ATTENDEES, seed=17, id_prefix="hub-"),
    )
    drain_and_verify(conn, settings, event)
    return event


def drain_and_verify(conn: Conn, settings: Settings, event: EventRecord) -> None:
    report = Matchmaker(settings).run(conn, deadline=time.monotonic() + 120)
    assert report.failed == 0
    assert queue_rows(conn, event.id) == []
    stored = repo.fetch_event_by_id(conn, event.id)
    assert stored is not None
    verdict = verify_event(conn, stored, default_embedder(stored).key)
    assert verdict.ok, verdict.mismatches[:3]
    assert verdict.checked == ATTENDEES


def test_switching_the_correction_rematches_through_the_queue(api, conn, settings):
    """Given a matched event (no correction), when an admin PATCHes exposure_correction
    to hubness with m = 5, then 200 with the new settings, every active attendee is queued
    for settings_changed, and after a drain every list is the oracle's top k by s' and
    differs from before somewhere; the status shows the correction; switching back to none
    re-queues everyone again and the drain restores exactly the first lists."""
    event = matched_event(conn, settings, EventSettings())
    plain = lists_of(conn, event.id)

    reply = api(
        request(
            "admin_settings", code=CODE, body={"exposure_correction": "hubness", "hubness_m": 5}
        )
    )
    assert reply.status == 200, reply
    assert reply.json["settings"]["exposure_correction"] == "hubness"
    assert reply.json["settings"]["hubness_m"] == 5
    queued = queue_rows(conn, event.id)
    assert len(queued) == ATTENDEES
    assert {row["reason"] for row in queued} == {"settings_changed"}

    drain_and_verify(conn, settings, event)
    corrected = lists_of(conn, event.id)
    assert corrected != plain

    status = api(request("admin_status", code=CODE))
    assert status.status == 200, status
    assert status.json["exposure"]["correction"] == "hubness"
    assert status.json["exposure"]["hubness_m"] == 5

    reply = api(request("admin_settings", code=CODE, body={"exposure_correction": "none"}))
    assert reply.status == 200, reply
    assert len(queue_rows(conn, event.id)) == ATTENDEES
    drain_and_verify(conn, settings, event)
    assert lists_of(conn, event.id) == plain
    status = api(request("admin_status", code=CODE))
    assert (status.json["exposure"]["correction"], status.json["exposure"]["hubness_m"]) == (
        "none",
        None,
    )


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"exposure_correction": "quota"}, "Input should be 'none' or 'hubness'"),
        ({"hubness_m": 0}, "greater than or equal to 1"),
        ({"hubness_m": 51}, "less than or equal to 50"),
        ({"hubness_m": "10"}, "valid integer"),
    ],
)
def test_an_invalid_correction_setting_is_a_422_that_writes_nothing(
    api, conn, settings, body, words
):
    """An unknown mode, m out of 1..50, or m not an integer: 422 validation_error naming
    the problem, the stored settings unchanged and nothing queued."""
    event = import_profiles(conn, EventIn(code=CODE), generate_profiles(3, id_prefix="hub-"))
    before = repo.fetch_event_by_id(conn, event.id)
    queued = queue_rows(conn, event.id)

    reply = api(request("admin_settings", code=CODE, body=body))

    assert reply.is_error(422, "validation_error"), reply
    assert words in reply.json["message"]
    assert repo.fetch_event_by_id(conn, event.id) == before
    assert queue_rows(conn, event.id) == queued


def test_hubness_lists_stay_exact_through_joins_edits_leaves_and_dismissals(conn, settings):
    """Under hubness with the default engine sizes, on a crowd of 80: a wave of joins, an
    edit, a leave and a dismissal, each drained by a warm worker, keep every list equal to
    the oracle's (the incremental paths: bump rule by s', derivations, the departure that
    queues work)."""
    event = matched_event(conn, settings, EventSettings(exposure_correction="hubness"))
    worker = Matchmaker(settings)
    newcomers = generate_profiles(ATTENDEES + 6, seed=17, id_prefix="hub-")[ATTENDEES:]
    import_profiles(conn, EventIn(code=CODE, settings=event.settings), newcomers[:3])
    worker.run(conn, deadline=time.monotonic() + 60)
    conn.execute(
        "UPDATE profiles SET interests = %s WHERE user_id = %s",
        (["kubernetes", "mlops"], "hub-000004"),
    )
    worker.run(conn, deadline=time.monotonic() + 60)
    repo.leave_event(conn, event.id, "hub-000007")
    worker.run(conn, deadline=time.monotonic() + 60)
    repo.dismiss(conn, event.id, "hub-000010", "hub-000011")
    worker.run(conn, deadline=time.monotonic() + 60)
    import_profiles(conn, EventIn(code=CODE, settings=event.settings), newcomers[3:])
    worker.run(conn, deadline=time.monotonic() + 60)
    verdict = verify_event(conn, event, default_embedder(event).key)
    assert verdict.ok, verdict.mismatches[:3]
    assert verdict.checked == ATTENDEES + 6 - 1


def test_the_cli_prints_and_sets_the_correction_like_the_api(db_url, conn, tmp_path: Path):
    """`matchmaker settings EVENT` prints the settings as JSON; with key=value words it
    sets them through the API's operation (the event is re-queued); an out-of-range m
    exits 2 with one line naming the field and changes nothing."""
    event = import_profiles(conn, EventIn(code=CODE), generate_profiles(3, id_prefix="hub-"))
    conn.execute("DELETE FROM matchmaking_queue")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tooling.cli", "settings", CODE, *args],
            env={**os.environ, "DATABASE_URL": db_url},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    shown = cli()
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == EventSettings().model_dump()

    changed = cli("exposure_correction=hubness", "hubness_m=7", "weights.bio=2.5")
    assert changed.returncode == 0, changed.stderr
    printed = json.loads(changed.stdout)
    assert (printed["exposure_correction"], printed["hubness_m"]) == ("hubness", 7)
    assert printed["weights"]["bio"] == 2.5
    stored = repo.fetch_event_by_id(conn, event.id)
    assert stored is not None and stored.settings == EventSettings.model_validate(printed)
    assert {row["reason"] for row in queue_rows(conn, event.id)} == {"settings_changed"}

    refused = cli("hubness_m=99")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "matchmaker: hubness_m: Input should be less than or equal to 50"
    ]
    assert repo.fetch_event_by_id(conn, event.id) == stored

"""Icebreakers: one sentence per final match, only when the event asks, cached per pair,
and never able to hold back or fail the lists themselves."""

from __future__ import annotations

import time

import pytest
from pydantic import SecretStr

from core.api.status import event_status
from core.data import repository as repo
from core.data.repository import Conn
from core.embedding.local import LocalEmbedder
from core.models import EventRecord
from core.queue.worker import Matchmaker
from core.settings import Settings
from tests.helpers import add_attendees, queue_rows
from tooling.oracle import verify_event
from tooling.synthetic import generate_profiles

pytest_plugins = ("tests.fake_openai",)

CHAT = "/v1/chat/completions"


@pytest.fixture
def openai_settings(settings: Settings, fake_openai) -> Settings:
    return settings.model_copy(
        update={"openai_api_key": SecretStr("test-key"), "openai_base_url": fake_openai.base_url}
    )


def chat_calls(fake_openai) -> int:
    return sum(1 for r in fake_openai.requests if r.path.endswith(CHAT))


def drain(conn: Conn, settings: Settings) -> None:
    report = Matchmaker(settings).run(conn, deadline=time.monotonic() + 60)
    assert report.failed == 0


def all_matches(conn: Conn, event: EventRecord) -> list[dict]:
    people = [
        row[0]
        for row in conn.execute(
            "SELECT p.user_id FROM attendees a JOIN profiles p ON p.id = a.profile_id"
            " WHERE a.event_id = %s AND a.active",
            (event.id,),
        )
    ]
    return [m for user in people for m in repo.attendee_matches(conn, event.id, user) or []]


def test_every_final_match_gets_one_cached_icebreaker(conn, openai_settings, fake_openai):
    """Given an event with icebreakers on (local embeddings, a chat key configured), when
    the queue drains, then every match shown has a sentence, there was exactly one chat
    call per distinct final pair, a full re-match makes no chat call at all, and a profile
    edit asks only for pairs that involve that profile."""
    event = add_attendees(
        conn, "ice-1", generate_profiles(12, seed=31, id_prefix="i-"), icebreakers=True
    )
    drain(conn, openai_settings)

    matches = all_matches(conn, event)
    assert len(matches) == 12 * 3
    assert all(m["icebreaker"] and len(m["icebreaker"]) <= 300 for m in matches)
    stored = conn.execute(
        "SELECT count(*) FROM icebreakers WHERE event_id = %s", (event.id,)
    ).fetchone()
    assert stored == (12 * 3,)
    assert chat_calls(fake_openai) == 12 * 3
    assert not any(r.path.endswith("/embeddings") for r in fake_openai.requests)

    conn.execute(
        "SELECT mm_enqueue(%s, ARRAY(SELECT profile_id FROM attendees"
        " WHERE event_id = %s), 0::smallint, 'rematch')",
        (event.id, event.id),
    )
    drain(conn, openai_settings)
    assert chat_calls(fake_openai) == 12 * 3

    # One profile changes: only pairs involving it can need a new sentence.
    conn.execute("UPDATE profiles SET interests = '{deep sea robotics}' WHERE user_id = 'i-000004'")
    drain(conn, openai_settings)
    involving = conn.execute(
        "SELECT count(*) FROM user_matches m JOIN profiles o ON o.id = m.profile_id"
        " JOIN profiles t ON t.id = m.matched_profile_id"
        " WHERE m.event_id = %s AND 'i-000004' IN (o.user_id, t.user_id)",
        (event.id,),
    ).fetchone()[0]
    new_calls = chat_calls(fake_openai) - 12 * 3
    assert 0 < new_calls <= involving
    assert all(m["icebreaker"] for m in all_matches(conn, event))


def test_a_failing_chat_model_never_holds_back_the_lists(conn, openai_settings, fake_openai):
    """Given the chat endpoint failing every request, when the queue drains, then every
    list is saved and exact, no user failed or died, and no icebreaker exists; once the
    model answers again, the next change writes them."""
    fake_openai.fail_all = {"status": 500}
    event = add_attendees(
        conn, "ice-2", generate_profiles(10, seed=32, id_prefix="j-"), icebreakers=True
    )
    drain(conn, openai_settings)

    assert queue_rows(conn, event.id) == []
    assert verify_event(conn, event, LocalEmbedder().key).ok
    assert all(m["icebreaker"] is None for m in all_matches(conn, event))
    assert chat_calls(fake_openai) > 0
    job = repo.job_status(conn, event.id)["job"]
    assert (job["failed_count"], job["dead_count"]) == (0, 0)

    fake_openai.fail_all = None
    conn.execute(
        "UPDATE profiles SET interests = interests || '{sailing}' WHERE user_id = 'j-000001'"
    )
    drain(conn, openai_settings)
    assert any(m["icebreaker"] for m in all_matches(conn, event))


def test_no_icebreakers_unless_the_event_asks(conn, openai_settings, fake_openai):
    """The setting is off by default: a key alone makes no chat call."""
    event = add_attendees(conn, "ice-3", generate_profiles(8, seed=33, id_prefix="k-"))
    drain(conn, openai_settings)
    assert chat_calls(fake_openai) == 0
    assert all(m["icebreaker"] is None for m in all_matches(conn, event))


def test_later_runs_catch_up_on_pairs_without_an_icebreaker_oldest_first(
    conn, openai_settings, fake_openai
):
    """Given a budget of 10 chat calls per run and 36 final pairs, when the first run has
    spent its budget, then each later run (with nothing queued) writes 10 more, taking
    the oldest list entries first, until every pair has one; status shows the coverage;
    a chat model that fails makes at most a few calls per run, and the pairs it failed
    are caught up once it answers."""
    cfg = openai_settings.model_copy(update={"icebreakers_per_run": 10})
    event = add_attendees(
        conn, "ice-4", generate_profiles(12, seed=34, id_prefix="c-"), icebreakers=True
    )
    drain(conn, cfg)
    assert chat_calls(fake_openai) == 10
    assert repo.icebreaker_coverage(conn, event.id) == (36, 10)

    fake_openai.fail_all = {"status": 500}
    drain(conn, cfg)  # nothing queued: only the catch-up, against a failing model
    assert chat_calls(fake_openai) == 10 + 3  # stops after 3 failures in a row
    assert repo.icebreaker_coverage(conn, event.id) == (36, 10)
    fake_openai.fail_all = None

    expected_order = conn.execute(
        "SELECT m.profile_id, m.matched_profile_id FROM user_matches m"
        " WHERE m.event_id = %s AND NOT EXISTS (SELECT 1 FROM icebreakers i"
        " WHERE i.event_id = m.event_id AND i.profile_id = m.profile_id"
        " AND i.matched_profile_id = m.matched_profile_id)"
        " ORDER BY m.updated_at, m.event_id, m.profile_id, m.matched_profile_id LIMIT 10",
        (event.id,),
    ).fetchall()
    drain(conn, cfg)
    written = conn.execute(
        "SELECT profile_id, matched_profile_id FROM icebreakers WHERE event_id = %s"
        " ORDER BY created_at DESC LIMIT 10",
        (event.id,),
    ).fetchall()
    assert sorted(written) == sorted(expected_order)
    assert repo.icebreaker_coverage(conn, event.id) == (36, 20)

    for _ in range(2):
        drain(conn, cfg)
    assert repo.icebreaker_coverage(conn, event.id) == (36, 36)
    assert all(m["icebreaker"] for m in all_matches(conn, event))
    calls = chat_calls(fake_openai)
    drain(conn, cfg)  # nothing left to catch up: no call
    assert chat_calls(fake_openai) == calls

    status = event_status(conn, event, cfg, lambda: None)
    assert status.icebreakers is not None
    assert (status.icebreakers.pairs, status.icebreakers.with_icebreaker) == (36, 36)
    assert status.icebreakers.ratio == 1.0

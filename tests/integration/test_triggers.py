"""The triggers of db/migrations/0003_triggers.sql: every write becomes queued work.

Lists are stored directly in user_matches (no worker run needed), so each test states
exactly who had whom on their list before the write under test.
"""

from __future__ import annotations

import pytest

from core.data import repository as repo
from core.data.repository import Conn
from core.models import EventRecord
from tests.conftest import profile
from tests.helpers import add_attendees, lists_of, queue_rows

# --- helpers -----------------------------------------------------------------------------


def profile_id(conn: Conn, user_id: str) -> int:
    row = conn.execute("SELECT id FROM profiles WHERE user_id = %s", (user_id,)).fetchone()
    assert row is not None, user_id
    return int(row[0])


def clear_queue(conn: Conn) -> None:
    conn.execute("DELETE FROM matchmaking_queue")


def queued(conn: Conn, event_id: int) -> dict[str, tuple[int, str]]:
    """user_id -> (priority, reason) of the event's live queue rows."""
    rows = [r for r in queue_rows(conn, event_id) if r["status"] in ("pending", "running")]
    out = {r["user_id"]: (r["priority"], r["reason"]) for r in rows}
    assert len(out) == len(rows), "more than one live row for a user"
    return out


def store_lists(conn: Conn, event_id: int, lists: dict[str, list[str]]) -> None:
    """Write owner -> [matched users] into user_matches, ranks from 1."""
    for owner, matched in lists.items():
        for rank, other in enumerate(matched, start=1):
            conn.execute(
                "INSERT INTO user_matches (event_id, profile_id, rank, matched_profile_id, score)"
                " VALUES (%s, %s, %s, %s, %s)",
                (event_id, profile_id(conn, owner), rank, profile_id(conn, other), 1.0 / rank),
            )


def stored_lists(conn: Conn, event_id: int) -> dict[str, list[str]]:
    """owner -> [matched users] straight from user_matches (active or not)."""
    out: dict[str, list[str]] = {}
    for owner, matched in conn.execute(
        "SELECT o.user_id, t.user_id FROM user_matches m"
        " JOIN profiles o ON o.id = m.profile_id JOIN profiles t ON t.id = m.matched_profile_id"
        " WHERE m.event_id = %s ORDER BY o.user_id, m.rank",
        (event_id,),
    ):
        out.setdefault(owner, []).append(matched)
    return out


def lists_version(conn: Conn, event_id: int) -> int:
    return repo.lists_version(conn, event_id)


def count(conn: Conn, table: str, event_id: int) -> int:
    row = conn.execute(
        f"SELECT count(*) FROM {table} WHERE event_id = %s",  # table names are ours
        (event_id,),
    ).fetchone()
    assert row is not None
    return int(row[0])


LISTS = {"a": ["b", "c"], "b": ["a", "d"], "c": ["d"], "d": ["c", "a"], "e": ["d"]}


def event_with_lists(conn: Conn, code: str) -> EventRecord:
    """Users a-e in one event with LISTS stored, an empty queue but a pending row for a."""
    event = add_attendees(conn, code, [profile(u) for u in "abcde"])
    store_lists(conn, event.id, LISTS)
    conn.execute("DELETE FROM matchmaking_queue WHERE profile_id <> %s", (profile_id(conn, "a"),))
    return event


# --- joining -----------------------------------------------------------------------------


def test_joining_and_rejoining_queue_the_user_as_a_newcomer(conn):
    """Given a user who joined (queued at 3 'join') and whose row was then processed, when
    they leave and later join again, then they are queued at priority 3 'join' again and
    their attendee row is active with left_at cleared.

    Proves both the INSERT and the re-activating UPDATE of attendees enqueue a newcomer.
    """
    event = add_attendees(conn, "rejoin", [profile("a"), profile("b")])
    assert queued(conn, event.id) == {"a": (3, "join"), "b": (3, "join")}
    clear_queue(conn)
    assert repo.leave_event(conn, event.id, "a") is True
    assert queued(conn, event.id) == {}

    add_attendees(conn, event, [profile("a")])

    assert queued(conn, event.id) == {"a": (3, "join")}
    row = conn.execute(
        "SELECT active, left_at FROM attendees WHERE event_id = %s AND profile_id = %s",
        (event.id, profile_id(conn, "a")),
    ).fetchone()
    assert row == (True, None)


# --- profile edits -----------------------------------------------------------------------

RELEVANT_EDITS = {
    "interests": "interests = ARRAY['new interest']",
    "seeking": "seeking = ARRAY['a co-founder']",
    "offering": "offering = ARRAY['mentoring']",
    "bio": "bio = 'A brand new bio'",
    "title": "title = 'CTO'",
    "company": "company = 'Other Corp'",
}


@pytest.fixture
def user_in_three_events(conn: Conn) -> list[EventRecord]:
    """u attends e1 and e2 and has left e3; v attends e1; the queue is empty."""
    base = profile("u", interests=["x"], bio="bio", title="Dev", company="Acme")
    events = [add_attendees(conn, f"edit-{i}", [base, profile(f"v{i}")]) for i in (1, 2, 3)]
    repo.leave_event(conn, events[2].id, "u")
    clear_queue(conn)
    return events


@pytest.mark.parametrize("field", sorted(RELEVANT_EDITS))
def test_a_matching_relevant_edit_queues_the_user_in_every_active_event(
    conn, user_in_three_events, field
):
    """Given u active in two events and gone from a third, when one matching-relevant field
    of u's profile changes, then u is queued at priority 2 'profile_update' in both active
    events, not in the one they left, nobody else is queued, and change_xid moves on.

    Proves every matching-relevant field is watched, across all of a user's events.
    """
    e1, e2, e3 = user_in_three_events
    before = conn.execute("SELECT change_xid::text FROM profiles WHERE user_id = 'u'").fetchone()

    conn.execute(f"UPDATE profiles SET {RELEVANT_EDITS[field]} WHERE user_id = 'u'")

    assert queued(conn, e1.id) == {"u": (2, "profile_update")}
    assert queued(conn, e2.id) == {"u": (2, "profile_update")}
    assert queued(conn, e3.id) == {}
    after = conn.execute("SELECT change_xid::text FROM profiles WHERE user_id = 'u'").fetchone()
    assert after != before


@pytest.mark.parametrize(
    "assignment",
    [
        "name = 'Someone Else'",
        "interests = ARRAY['x'], bio = 'bio', title = 'Dev', company = 'Acme'",
        "interests = interests",
    ],
    ids=["name-only", "same-values", "no-op"],
)
def test_an_edit_that_does_not_change_matching_enqueues_nothing(
    conn, user_in_three_events, assignment
):
    """Given u active in two events, when u's profile is updated without changing any
    matching-relevant value (a name-only edit, or writing the same values back), then
    nothing is queued anywhere and change_xid stays (workers will not re-read u).

    Proves display-only and idempotent writes cost no matching work.
    """
    before = conn.execute("SELECT change_xid::text FROM profiles WHERE user_id = 'u'").fetchone()

    cur = conn.execute(f"UPDATE profiles SET {assignment} WHERE user_id = 'u'")

    assert cur.rowcount == 1
    assert queue_rows(conn) == []
    after = conn.execute("SELECT change_xid::text FROM profiles WHERE user_id = 'u'").fetchone()
    assert after == before


def test_reimporting_identical_profiles_enqueues_nothing(conn):
    """Given attendees already imported and processed, when the same file is imported
    again, then nothing is queued (the upsert skips unchanged rows, joins are no-ops).

    Proves a repeated import is free.
    """
    people = [profile("a", interests=["x"]), profile("b", bio="hello")]
    event = add_attendees(conn, "reimport", people)
    clear_queue(conn)

    add_attendees(conn, event, people)

    assert queue_rows(conn) == []


# --- departures --------------------------------------------------------------------------


def assert_departure_of_a(conn: Conn, event: EventRecord, version_before: int) -> None:
    """a is off every list, has no list, b and d (who had a) are queued at 1, a is not."""
    lists = stored_lists(conn, event.id)
    assert "a" not in lists
    assert all("a" not in matched for matched in lists.values()), lists
    assert lists == {"b": ["d"], "c": ["d"], "d": ["c"], "e": ["d"]}
    assert queued(conn, event.id) == {"b": (1, "neighbour_left"), "d": (1, "neighbour_left")}
    assert lists_version(conn, event.id) > version_before


def test_leaving_removes_the_leaver_everywhere_and_requeues_who_had_them(conn):
    """Given stored lists where b and d have a on their lists and a has a pending row, when
    a leaves, then a's own list and every entry pointing at a are gone, b and d are queued
    at priority 1 'neighbour_left' (c and e are not), a's pending row is deleted and the
    event's lists_version went up. Leaving twice is a no-op.

    Proves the departure trigger leaves no stale list and finds a replacement for owners.
    """
    event = event_with_lists(conn, "leave")
    assert queued(conn, event.id) == {"a": (3, "join")}
    version = lists_version(conn, event.id)

    assert repo.leave_event(conn, event.id, "a") is True

    assert_departure_of_a(conn, event, version)
    assert "a" not in lists_of(conn, event.id)
    assert repo.leave_event(conn, event.id, "a") is False
    assert lists_version(conn, event.id) == version + 1


def test_leaving_one_event_leaves_the_users_other_events_alone(conn):
    """Given a in two events with lists in both, when a leaves the first, then the second
    event's lists and queue are untouched.

    Proves departures are per event.
    """
    first = event_with_lists(conn, "leave-first")
    second = add_attendees(conn, "leave-second", [profile(u) for u in "ab"])
    store_lists(conn, second.id, {"a": ["b"], "b": ["a"]})
    clear_queue(conn)

    repo.leave_event(conn, first.id, "a")

    assert stored_lists(conn, second.id) == {"a": ["b"], "b": ["a"]}
    assert queued(conn, second.id) == {}
    assert set(queued(conn, first.id)) == {"b", "d"}


def test_deleting_the_attendee_row_is_a_departure(conn):
    """Given stored lists, when a's attendee row is deleted outright, then the outcome is
    the same as leaving: no FK error, a gone from every list, b and d re-queued at 1.

    Proves a hard delete by another writer is handled like a leave.
    """
    event = event_with_lists(conn, "delete-attendee")
    version = lists_version(conn, event.id)

    conn.execute(
        "DELETE FROM attendees WHERE event_id = %s AND profile_id = %s",
        (event.id, profile_id(conn, "a")),
    )

    assert_departure_of_a(conn, event, version)


def test_deleting_the_whole_profile_is_a_departure_from_every_event(conn):
    """Given a in two events with lists (b and d have a in the first, b in the second), when
    a's profile row is deleted, then both events lose a everywhere and the owners are
    re-queued in each, without FK errors.

    Proves the cascade from profiles runs the departure trigger per event.
    """
    first = event_with_lists(conn, "delete-profile-1")
    second = add_attendees(conn, "delete-profile-2", [profile(u) for u in "ab"])
    store_lists(conn, second.id, {"a": ["b"], "b": ["a"]})
    conn.execute("DELETE FROM matchmaking_queue WHERE event_id = %s", (second.id,))
    version = lists_version(conn, first.id)

    conn.execute("DELETE FROM profiles WHERE user_id = 'a'")

    assert_departure_of_a(conn, first, version)
    assert stored_lists(conn, second.id) == {}
    assert queued(conn, second.id) == {"b": (1, "neighbour_left")}


def test_deleting_two_profiles_that_list_each_other_in_one_statement(conn):
    """Given a and b on each other's lists (and d having a), when both profiles are deleted
    by one statement, then there is no FK error (b, deleted too, is not re-queued) and only
    d is queued.

    Proves the departure trigger skips owners removed by the same cascade.
    """
    event = event_with_lists(conn, "delete-two")

    conn.execute("DELETE FROM profiles WHERE user_id IN ('a', 'b')")

    assert queued(conn, event.id) == {"d": (1, "neighbour_left")}
    assert stored_lists(conn, event.id) == {"c": ["d"], "d": ["c"], "e": ["d"]}


def test_deleting_the_whole_event_removes_everything_of_it_and_nothing_else(conn):
    """Given two events with attendees, lists and queue rows, when one event is deleted,
    then its attendees, lists, queue rows and job are gone without errors and the other
    event is untouched.

    Proves the departure trigger stands aside while an event is deleted.
    """
    doomed = event_with_lists(conn, "doomed")
    kept = add_attendees(conn, "kept", [profile(u) for u in "ab"])
    store_lists(conn, kept.id, {"a": ["b"]})
    kept_queue = queued(conn, kept.id)

    conn.execute("DELETE FROM events WHERE id = %s", (doomed.id,))

    for table in ("attendees", "user_matches", "matchmaking_queue", "matchmaking_jobs"):
        assert count(conn, table, doomed.id) == 0, table
    assert stored_lists(conn, kept.id) == {"a": ["b"]}
    assert queued(conn, kept.id) == kept_queue == {"a": (3, "join"), "b": (3, "join")}


# --- dismissals --------------------------------------------------------------------------


def test_a_dismissal_queues_both_users_at_priority_2(conn):
    """Given a, b and c with an empty queue, when a dismisses b, then a and b (not c) are
    queued at priority 2 'dismissal'; dismissing the same pair again changes nothing.

    Proves "no thanks" recomputes both lists.
    """
    event = add_attendees(conn, "dismiss", [profile(u) for u in "abc"])
    clear_queue(conn)

    assert repo.dismiss(conn, event.id, "a", "b") is True

    assert queued(conn, event.id) == {"a": (2, "dismissal"), "b": (2, "dismissal")}
    clear_queue(conn)
    assert repo.dismiss(conn, event.id, "a", "b") is False
    assert queued(conn, event.id) == {}


def test_a_dismissal_keeps_a_higher_pending_priority(conn):
    """Given b still pending as a newcomer (3 'join'), when a dismisses b, then b stays at
    3 'join' (coalesced, not downgraded) and a is queued at 2 'dismissal'.

    Proves coalescing takes the maximum priority for trigger-made requests.
    """
    event = add_attendees(conn, "dismiss-join", [profile("a")])
    clear_queue(conn)
    add_attendees(conn, event, [profile("b")])

    repo.dismiss(conn, event.id, "a", "b")

    assert queued(conn, event.id) == {"a": (2, "dismissal"), "b": (3, "join")}


def test_dismissing_someone_who_left_queues_only_the_active_user(conn):
    """Given b has left the event, when a dismisses b, then only a is queued.

    Proves a departed attendee is never brought back into the queue.
    """
    event = add_attendees(conn, "dismiss-left", [profile("a"), profile("b")])
    repo.leave_event(conn, event.id, "b")
    clear_queue(conn)

    repo.dismiss(conn, event.id, "a", "b")

    assert queued(conn, event.id) == {"a": (2, "dismissal")}


# --- event settings ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "assignment",
    [
        "k = 5",
        "exclude_same_company = false",
        "weight_interests = 2",
        "weight_complement = 0.5",
        "weight_bio = 0",
        "embedder = 'other'",
    ],
)
def test_changing_event_settings_requeues_every_active_attendee_at_priority_0(conn, assignment):
    """Given an event with active attendees a and b, c who left, and a still pending at
    priority 3, when a matching setting of the event changes, then b is queued at 0
    'settings_changed', a keeps 3 'join' and c is not queued.

    Proves a settings change re-matches the whole event without downgrading work.
    """
    event = add_attendees(conn, "settings", [profile(u) for u in "abc"])
    repo.leave_event(conn, event.id, "c")
    conn.execute("DELETE FROM matchmaking_queue WHERE profile_id <> %s", (profile_id(conn, "a"),))

    conn.execute(f"UPDATE events SET {assignment} WHERE id = %s", (event.id,))

    assert queued(conn, event.id) == {"a": (3, "join"), "b": (0, "settings_changed")}


def test_renaming_an_event_queues_nothing(conn):
    """Given an event with an empty queue, when only its name changes (or k is set to its
    current value), then nothing is queued.

    Proves display-only event edits cost no matching work.
    """
    event = add_attendees(conn, "rename", [profile(u) for u in "ab"])
    clear_queue(conn)

    conn.execute("UPDATE events SET name = 'Renamed' WHERE id = %s", (event.id,))
    conn.execute("UPDATE events SET k = k WHERE id = %s", (event.id,))

    assert queued(conn, event.id) == {}

from core.data import repository as repo
from tests.conftest import profile
from tests.helpers import add_attendees, queue_rows


def test_join_enqueues_newcomers_at_priority_3(conn):
    event = add_attendees(conn, "smoke-1", [profile("a"), profile("b")])
    rows = queue_rows(conn, event.id)
    assert [(r["user_id"], r["priority"], r["reason"]) for r in rows] == [
        ("a", 3, "join"),
        ("b", 3, "join"),
    ]
    assert repo.fetch_event(conn, "smoke-1") == event

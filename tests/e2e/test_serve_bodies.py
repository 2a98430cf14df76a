"""The hostile-client findings of issue 13, replayed over real HTTP against `matchmaker
serve` (which hands API-Gateway-shaped events to the real handler): the settings PATCH with
weights works, and hostile bodies are 4xx with the error shape, writing nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.e2e.test_serve import (
    Server,
    call,
    make_event,
    own_server,
)
from tooling.synthetic import generate_profiles

CODE = "e2e-bodies"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with own_server("matchmaker-e2e-bodies-") as srv:
        yield srv


def test_the_settings_patch_with_weights_answers_200_and_is_stored(server: Server) -> None:
    """The request that answered 500 (AttributeError on a dict of weights): a partial
    weights patch is 200, merged into the current weights, and read back by GET; all-zero
    weights are 422 and leave the settings as they were."""
    make_event(server, CODE, 3, prefix="wb-")
    path = f"/admin/events/{CODE}/settings"

    reply = call(server, "PATCH", path, server.admin, {"weights": {"bio": 2.0}, "k": 2})

    assert reply.status == 200, reply.text
    expected = {"interests": 1.0, "complementarity": 1.0, "bio": 2.0}
    assert reply.body["settings"]["weights"] == expected
    event = call(server, "GET", f"/events/{CODE}", server.service).body
    assert (event["settings"]["weights"], event["settings"]["k"]) == (expected, 2)

    zero = {"weights": {"interests": 0, "complementarity": 0, "bio": 0}}
    refused = call(server, "PATCH", path, server.admin, zero)
    assert refused.is_error(422, "validation_error"), refused.text
    assert "at least one weight must be greater than 0" in refused.body["message"]
    after = call(server, "GET", f"/events/{CODE}", server.service).body
    assert after["settings"] == event["settings"]


def test_hostile_bodies_are_4xx_and_write_nothing(server: Server) -> None:
    """Deep nesting, a 5,000-digit integer, NaN, an array holding a valid body, duplicate
    keys: each a 422 with the error shape; the event and the profile they aimed at are
    unchanged (no event created, the profile still comes back "unchanged")."""
    new_event = {"code": "e2e-hostile", "name": "Hostile"}
    bodies = [
        b"[" * 10_000 + b"]" * 10_000,
        b'{"code": "e2e-hostile", "settings": {"k": ' + b"9" * 5000 + b"}}",
        b'{"code": "e2e-hostile", "settings": {"weights": {"bio": NaN}}}',
        b"[" + json.dumps(new_event).encode() + b"]",
        b'{"code": "e2e-hostile", "code": "e2e-other"}',
    ]
    for raw in bodies:
        reply = call(server, "POST", "/events", server.service, raw=raw)
        assert reply.is_error(422, "validation_error"), (raw[:60], reply.text)
    for code in ("e2e-hostile", "e2e-other"):
        assert call(server, "GET", f"/events/{code}", server.service).is_error(404, "not_found")

    ids = make_event(server, "e2e-hostile-put", 2, prefix="hp-")
    profile = generate_profiles(2, seed=5, id_prefix="hp-")[0]
    original = profile.model_dump(exclude={"user_id"})
    path = f"/events/e2e-hostile-put/attendees/{ids[0]}"
    overwrite = [{**original, "bio": "overwritten through an array"}]
    refused = call(server, "PUT", path, server.service, overwrite)
    assert refused.is_error(422, "validation_error"), refused.text
    assert "must be a JSON object" in refused.body["message"]
    same = call(server, "PUT", path, server.service, original)
    assert (same.status, same.body["status"]) == (200, "unchanged"), same.text

"""Unit tests without a database: the fake OpenAI API speaks the protocol the official
client expects, and the OpenAI embedder's helpers (texts, chunking, Retry-After, which
embedder serves an event) behave as documented."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import boto3
import numpy as np
import openai
import pytest
from moto import mock_aws
from pydantic import SecretStr

import core.aws
from core.embedding import openai_provider as oe
from core.embedding import selection as embedding
from core.embedding.local import LocalEmbedder
from core.embedding.openai_provider import OpenAIEmbedder, profile_texts
from core.embedding.vectors import BLOCKS
from core.models import EventRecord, EventSettings, Profile
from core.settings import Settings

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.fake_openai import FakeOpenAI

pytest_plugins = ("tests.fake_openai",)


def client_for(fake: FakeOpenAI) -> openai.OpenAI:
    return openai.OpenAI(api_key="test", base_url=fake.base_url, max_retries=0)


def post(fake: FakeOpenAI, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    """A raw POST (no client): (status, parsed JSON body)."""
    request = urllib.request.Request(
        fake.base_url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# --- the fake ----------------------------------------------------------------------------


def test_the_fake_answers_base64_and_float_with_the_same_unit_vectors(fake_openai):
    """Given the client's default (base64) and encoding_format="float", when the same texts
    are embedded, then both decode to the same deterministic unit vectors, and usage is
    reported and counted."""
    client = client_for(fake_openai)
    texts = ["robotics; climate tech", "robotics", "pottery"]

    packed = client.embeddings.create(model="text-embedding-3-small", input=texts, dimensions=32)
    plain = client.embeddings.create(
        model="text-embedding-3-small", input=texts, dimensions=32, encoding_format="float"
    )

    bodies = [r.body for r in fake_openai.embedding_requests()]
    assert [b["encoding_format"] for b in bodies] == ["base64", "float"]
    a = np.asarray([d.embedding for d in packed.data])
    b = np.asarray([d.embedding for d in plain.data])
    assert a.shape == (3, 32)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0)
    assert b[0] @ b[1] > 0.5 > abs(b[1] @ b[2])  # shared words make close vectors
    assert packed.usage.total_tokens == plain.usage.total_tokens > 0
    assert fake_openai.embedding_tokens == 2 * plain.usage.total_tokens
    assert fake_openai.calls["/v1/embeddings"] == 2


def test_the_fake_accepts_a_single_string_and_rejects_an_empty_one(fake_openai):
    """Given a single string input, then one vector (default 1536 dimensions); given an
    empty string, then a 400 like the real API's."""
    single = client_for(fake_openai).embeddings.create(
        model="text-embedding-3-small", input="hello world", encoding_format="float"
    )
    assert len(single.data) == 1 and len(single.data[0].embedding) == 1536
    with pytest.raises(openai.BadRequestError, match="input"):
        client_for(fake_openai).embeddings.create(model="text-embedding-3-small", input=["a", ""])


def test_the_fake_rejects_a_request_without_a_key(fake_openai):
    """Given no Authorization header, then 401 with an OpenAI-style error body."""
    status, body = post(fake_openai, "/embeddings", {"model": "m", "input": "x"})
    assert status == 401
    assert body["error"]["message"]


def test_faults_are_consumed_in_order_and_fail_all_lasts_until_cleared(fake_openai):
    """Given two queued faults, the next two requests get them in order, then normal
    answers; fail_all applies to every request until cleared; reset() forgets all."""
    client = client_for(fake_openai)
    fake_openai.faults.extend([{"status": 429, "retry_after": "7"}, {"status": 503}])
    with pytest.raises(openai.RateLimitError) as limited:
        client.embeddings.create(model="m", input="x")
    assert limited.value.response.headers["retry-after"] == "7"
    with pytest.raises(openai.InternalServerError):
        client.embeddings.create(model="m", input="x")
    client.embeddings.create(model="m", input="x")

    fake_openai.fail_all = {"status": 401}
    for _ in range(2):
        with pytest.raises(openai.AuthenticationError):
            client.embeddings.create(model="m", input="x")
    fake_openai.fail_all = None
    client.embeddings.create(model="m", input="x")
    assert fake_openai.calls["/v1/embeddings"] == 6

    fake_openai.reset()
    assert (fake_openai.requests, fake_openai.calls["/v1/embeddings"]) == ([], 0)


def test_a_delay_makes_the_client_time_out_and_a_drop_is_a_connection_error(fake_openai):
    """Given a 2 s delay and a 0.3 s client timeout, then APITimeoutError quickly; given a
    dropped connection, then APIConnectionError."""
    client = client_for(fake_openai).with_options(timeout=0.3)
    fake_openai.faults.extend([{"delay": 2.0}, {"drop": True}])
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.embeddings.create(model="m", input="x")
    assert time.monotonic() - started < 1.5
    with pytest.raises(openai.APIConnectionError):
        client.embeddings.create(model="m", input="x")


def test_the_fake_answers_chat_completions_with_one_sentence(fake_openai):
    """Given a chat request, then one sentence naming what the attendees share, with usage."""
    answer = client_for(fake_openai).chat.completions.create(
        model="gpt-4o-mini",
        messages=[
            {"role": "system", "content": "Write one sentence."},
            {"role": "user", "content": "Attendee A: robotics, sailing\nAttendee B: robotics"},
        ],
    )
    text = answer.choices[0].message.content
    assert text.endswith(".") and text.count(".") == 1
    assert "robotics" in text
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert fake_openai.calls["/v1/chat/completions"] == 1
    assert fake_openai.tokens_by_path["/v1/chat/completions"] == answer.usage.total_tokens


def test_the_fake_stops_promptly_even_during_a_delay():
    """Given a request stuck in a 30 s scripted delay, when the fake stops, then it stops
    at once (the delay is cut short)."""
    from tests.fake_openai import FakeOpenAI  # noqa: PLC0415 - the plugin imports it first

    fake = FakeOpenAI().start()
    fake.faults.append({"delay": 30.0})
    client = client_for(fake).with_options(timeout=0.2)
    with pytest.raises(openai.APITimeoutError):
        client.embeddings.create(model="m", input="x")
    started = time.monotonic()
    fake.stop()
    assert time.monotonic() - started < 3.0


# --- the embedder's helpers -----------------------------------------------------------


def test_profile_texts_are_the_four_blocks_in_order():
    profile = Profile(
        user_id="u",
        interests=["AI", "robotics"],
        offering=["mentoring"],
        title="CTO",
        bio="Builds robots.",
    )
    assert profile_texts(profile) == ["AI; robotics", "", "mentoring", "CTO — Builds robots."]
    assert len(profile_texts(Profile(user_id="v"))) == len(BLOCKS)


def test_chunks_respect_the_input_and_character_limits():
    """Given 1,100 short texts, then chunks of 512, 512 and 76; given three texts of just
    over half the character limit, then one per chunk (any two would exceed it)."""
    sizes = [len(c) for c in oe._chunks([f"t{i}" for i in range(1100)])]
    assert sizes == [512, 512, 76]
    big = ["x" * (oe.MAX_CHARS_PER_REQUEST // 2 + 1)] * 3
    assert [len(c) for c in oe._chunks(big)] == [1, 1, 1]
    assert oe._chunks([]) == []


@pytest.mark.parametrize(
    ("header", "expected"),
    [("2.5", 2.5), ("120", oe.MAX_RETRY_AFTER_S), ("-3", 0.0), ("Wed, 21 Oct 2015", None)],
)
def test_retry_after_is_parsed_and_capped(header, expected):
    exc = SimpleNamespace(response=SimpleNamespace(headers={"retry-after": header}))
    assert oe._retry_after(exc) == expected  # type: ignore[arg-type]


def test_retry_after_absent():
    assert oe._retry_after(RuntimeError("no response")) is None


def test_the_key_names_model_dimensions_and_quantisation():
    embedder = OpenAIEmbedder(openai.OpenAI(api_key="x"), model="m-1", dimensions=128)
    assert embedder.key == "openai:m-1:d128:q1"
    assert embedder.dim == 4 * 128


# --- which embedder serves an event -----------------------------------------------------


def event(embedder: str) -> EventRecord:
    return EventRecord(1, "ev", "Event", EventSettings(embedder=embedder))


def settings_with(**fields: Any) -> Settings:
    return Settings(
        openai_api_key=fields.pop("openai_api_key", None),
        openai_secret_arn=fields.pop("openai_secret_arn", None),
        **fields,
    )


def test_an_openai_event_with_a_key_gets_the_openai_embedder():
    chosen = embedding.embedder_for_event(
        event("openai"),
        settings_with(
            openai_api_key=SecretStr("sk-test"),
            openai_base_url="http://127.0.0.1:9/v1",
            openai_embedding_model="text-embedding-3-large",
            openai_embedding_dimensions=512,
        ),
    )
    assert isinstance(chosen, OpenAIEmbedder)
    assert chosen.key == "openai:text-embedding-3-large:d512:q1"
    assert str(chosen.client.base_url).startswith("http://127.0.0.1:9/v1")


def test_without_a_key_or_for_a_local_event_the_local_embedder_serves():
    assert isinstance(embedding.embedder_for_event(event("openai"), settings_with()), LocalEmbedder)
    keyed = settings_with(openai_api_key=SecretStr("sk-test"))
    assert isinstance(embedding.embedder_for_event(event("local"), keyed), LocalEmbedder)


@pytest.fixture
def secrets_manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """moto's Secrets Manager behind core.aws (fresh clients and secret cache)."""
    for name, value in {
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    core.aws.reset_clients()
    with mock_aws():
        yield boto3.client("secretsmanager")
    core.aws.reset_clients()


@pytest.mark.parametrize("secret", ["sk-plain", '{"api_key": "sk-plain"}'])
def test_the_key_can_come_from_secrets_manager(secrets_manager, secret):
    """Given OPENAI_SECRET_ARN holding a plain key or {"api_key": ...}, then that key, read
    through core.aws (botocore, no boto3)."""
    arn = secrets_manager.create_secret(Name="openai", SecretString=secret)["ARN"]
    settings = settings_with(openai_secret_arn=arn)
    assert embedding.openai_api_key(settings) == "sk-plain"
    assert isinstance(embedding.embedder_for_event(event("openai"), settings), OpenAIEmbedder)


def test_the_key_secret_is_read_once_and_again_after_five_minutes(secrets_manager, monkeypatch):
    """The key is kept as Powertools Parameters kept it (max_age=300): one GetSecretValue,
    then the cached value until it is 5 minutes old, then the rotated key."""
    now = [1000.0]
    monkeypatch.setattr(core.aws, "secrets", core.aws.SecretCache(clock=lambda: now[0]))
    arn = secrets_manager.create_secret(Name="rotating", SecretString="sk-1")["ARN"]
    reads: list[str] = []
    core.aws.secrets_client().meta.events.register(
        "provide-client-params.secrets-manager.GetSecretValue",
        lambda params, **_: reads.append(params["SecretId"]),
    )
    settings = settings_with(openai_secret_arn=arn)

    assert embedding.openai_api_key(settings) == "sk-1"
    secrets_manager.put_secret_value(SecretId=arn, SecretString="sk-2")
    now[0] += 299
    assert embedding.openai_api_key(settings) == "sk-1"
    assert len(reads) == 1
    now[0] += 1
    assert embedding.openai_api_key(settings) == "sk-2"
    assert reads == [arn, arn]


@pytest.mark.parametrize("problem", ["missing", "malformed JSON"])
def test_an_unreadable_key_secret_fails_the_openai_event_and_says_why(secrets_manager, problem):
    """Given OPENAI_SECRET_ARN missing or holding broken JSON, then an "openai" event has no
    effective embedder (with the reason) and building its embedder raises, never falling
    back silently; a "local" event is not affected."""
    if problem == "missing":
        arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:gone-AbCdEf"
    else:
        arn = secrets_manager.create_secret(Name="broken", SecretString='{"api_key": ')["ARN"]
    settings = settings_with(openai_secret_arn=arn)
    choice = embedding.effective_embedder(event("openai"), settings)
    assert (choice.configured, choice.effective) == ("openai", None)
    assert "OPENAI_SECRET_ARN cannot be read" in choice.reason
    assert '"api_key"' not in choice.reason
    with pytest.raises(embedding.OpenAISecretError):
        embedding.embedder_for_event(event("openai"), settings)
    assert isinstance(embedding.embedder_for_event(event("local"), settings), LocalEmbedder)


def test_the_embedder_built_is_the_one_effective_embedder_chooses(secrets_manager):
    """One rule: for every case effective_embedder reports, embedder_for_event builds that
    embedder (no breaker given: the worker handles the breaker)."""
    arn = secrets_manager.create_secret(Name="key", SecretString="sk-secret")["ARN"]
    empty = secrets_manager.create_secret(Name="empty", SecretString='{"api_key": ""}')["ARN"]
    cases = [
        settings_with(),
        settings_with(openai_api_key=SecretStr("sk-test")),
        settings_with(openai_secret_arn=arn),
        settings_with(openai_secret_arn=empty),
    ]
    built = {"openai": OpenAIEmbedder, "local": LocalEmbedder}
    seen = set()
    for settings in cases:
        for configured in ("local", "openai"):
            choice = embedding.effective_embedder(event(configured), settings)
            assert choice.effective is not None
            assert isinstance(
                embedding.embedder_for_event(event(configured), settings), built[choice.effective]
            )
            seen.add((configured, choice.effective))
    assert seen == {("local", "local"), ("openai", "local"), ("openai", "openai")}


# --- classification: every provider outcome, once --------------------------------------


_ERROR_CLASS: dict[int, type[openai.APIStatusError]] = {
    400: openai.BadRequestError,
    401: openai.AuthenticationError,
    403: openai.PermissionDeniedError,
    404: openai.NotFoundError,
    413: openai.APIStatusError,
    429: openai.RateLimitError,
    500: openai.InternalServerError,
    503: openai.InternalServerError,
}


def _status_error(status: int, body: dict[str, Any]) -> openai.APIStatusError:
    """The SDK's exception for this status and error body (as it parses the body: the
    inner "error" object), built without a transport."""
    cls = _ERROR_CLASS[status]
    error = cls.__new__(cls)
    Exception.__init__(error, f"Error code: {status} - {body}")
    error.message, error.body, error.status_code = str(body.get("message")), body, status
    return error


def _transport_error(cls: type[openai.APIConnectionError]) -> openai.APIConnectionError:
    error = cls.__new__(cls)
    Exception.__init__(error, "Connection error.")
    return error


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (429, {"message": "slow down"}, "ProviderUnavailableError"),
        (500, {"message": "boom"}, "ProviderUnavailableError"),
        (503, {"message": "overloaded"}, "ProviderUnavailableError"),
        (401, {"message": "Incorrect API key provided"}, "ProviderRejectedError"),
        (403, {"message": "forbidden region"}, "ProviderRejectedError"),
        (
            404,
            {"message": "The model `x` does not exist", "code": "model_not_found"},
            "ProviderRejectedError",
        ),
        (400, {"message": "'dimensions' must be an integer"}, "ProviderRejectedError"),
        (400, {"message": "invalid model ID", "param": "model"}, "ProviderRejectedError"),
        (400, {"message": "too long", "code": "context_length_exceeded"}, "InputRejectedError"),
        (400, {"message": "'$.input' rejected", "param": None}, "InputRejectedError"),
        (400, {"message": "bad", "param": "input"}, "InputRejectedError"),
        (413, {"message": "input too large"}, "InputRejectedError"),
    ],
)
def test_every_status_is_classified_once(status: int, body: dict[str, Any], expected: str) -> None:
    error = oe.classify(_status_error(status, body))
    assert type(error).__name__ == expected
    assert error.status == status
    assert f"HTTP {status}" in str(error)


def test_transport_and_body_failures_are_classified() -> None:
    assert oe.classify(_transport_error(openai.APITimeoutError)).fault == "transient"
    assert oe.classify(_transport_error(openai.APIConnectionError)).fault == "transient"
    html = oe.classify(AttributeError("'str' object has no attribute 'data'"))
    assert html.fault == "malformed" and "not an embeddings JSON object" in str(html)
    assert oe.classify(ValueError("Expecting value")).fault == "malformed"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            "<html>502</html>",
            "not an embeddings list (got a text body starting '<html>502</html>')",
        ),
        ([SimpleNamespace(index=0, embedding=[0.0] * 8)], "returned 1 vectors for 2 texts"),
        (
            [
                SimpleNamespace(index=0, embedding=[0.0] * 8),
                SimpleNamespace(index=0, embedding=[0.0] * 8),
            ],
            "indexes are not 0..1",
        ),
        (
            [
                SimpleNamespace(index=0, embedding=[0.0] * 9),
                SimpleNamespace(index=1, embedding=[0.0] * 8),
            ],
            "a vector of 9 dimensions, expected 8",
        ),
        (
            [
                SimpleNamespace(index=0, embedding=[0.0] * 8),
                SimpleNamespace(index=1, embedding=[float("nan")] + [0.0] * 7),
            ],
            "vector 1 has 1 NaN or infinite value(s)",
        ),
    ],
    ids=["html-text", "wrong-count", "duplicate-index", "wrong-dimension", "nan"],
)
def test_malformed_answers_get_precise_messages(data: Any, message: str) -> None:
    embedder = OpenAIEmbedder(
        openai.OpenAI(api_key="k", base_url="http://127.0.0.1/v1"), dimensions=8
    )
    response = data if isinstance(data, str) else SimpleNamespace(data=data, usage=None)
    with pytest.raises(oe.MalformedAnswerError) as raised:
        embedder._vectors(response, 2)
    assert message in str(raised.value)
    assert raised.value.fault == "malformed"

"""A fake OpenAI REST API on 127.0.0.1 for tests: embeddings and chat completions.

Speaks enough of the real protocol for the official ``openai`` client:

* ``POST /v1/embeddings`` with ``{"model", "input": str | [str], "dimensions"?,
  "encoding_format"?}``. The client asks for ``encoding_format: "base64"`` unless told
  otherwise and then decodes little-endian float32; ``"float"`` gives plain lists.
* ``POST /v1/chat/completions`` with ``{"model", "messages"}``: a one-sentence answer.

Embeddings are deterministic and meaningful: a signed bag-of-words hash of the lower-cased
words into ``dimensions`` buckets, L2-normalised, so texts sharing words are close and the
same text always gets the same vector. Usage is counted per input (tiktoken's cl100k_base
when it is installed, otherwise an approximation: one token per word of up to 6
characters, one more per further 6 characters, one per punctuation mark).

Every request is recorded (path, parsed body, headers, the fault it got) and counted.
Faults are scripted:

* ``fake.faults.append({...})``: a queue consumed one fault per request, in order;
* ``fake.fail_all = {...}``: every request gets that fault until it is cleared (None);
* ``fake.reject_inputs.add("marker")``: an embeddings request with an input containing a
  rejected marker answers 400 (``rejected_status``), like a provider refusing one input
  (content policy, context length) - always, whatever else the request holds. Scripted
  faults come first; the rejection applies to requests that would otherwise succeed.

A fault is a dict of ``status`` (an HTTP error with an OpenAI-style error body;
``retry_after`` sets the Retry-After header), ``delay`` (seconds to sleep before
answering; capped at MAX_DELAY_S and cut short when the server stops), ``malformed``
(200 with an invalid JSON body), ``wrong_dimensions`` (vectors one component too long),
``missing_vector`` (one vector fewer than inputs), ``nan`` (a NaN in the first vector),
``html`` (200 with an HTML page, as a misconfigured proxy answers) or ``drop`` (close the
connection without answering). An empty dict is no fault (handy in scripted sequences).

The server binds 127.0.0.1 on a free port, serves each connection in a daemon thread,
rejects bodies over MAX_BODY_BYTES, closes idle connections after IDLE_TIMEOUT_S and
keeps at most MAX_RECORDED requests. Use the ``fake_openai`` fixture (enable it with
``pytest_plugins = ("tests.fake_openai",)``) or ``with FakeOpenAI() as fake: ...``.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import itertools
import json
import math
import re
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_INPUTS = 2048
MAX_DIMENSIONS = 3072
MAX_DELAY_S = 60.0
MAX_RECORDED = 100_000
IDLE_TIMEOUT_S = 10.0
DEFAULT_DIMENSIONS = {"text-embedding-3-large": 3072}
FALLBACK_DIMENSIONS = 1536

_WORD = re.compile(r"\w+", re.UNICODE)
_PIECE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def _load_tokenizer() -> Any:
    try:
        import tiktoken  # noqa: PLC0415 - optional, not a dependency

        return tiktoken.get_encoding("cl100k_base")
    except Exception:  # not installed, or its encoding file is unavailable offline
        return None


_TOKENIZER = _load_tokenizer()


def count_tokens(text: str) -> int:
    """Tokens of one input: tiktoken's count when available, else an approximation."""
    if _TOKENIZER is not None:
        return len(_TOKENIZER.encode(text))
    tokens = 0
    for piece in _PIECE.findall(text):
        tokens += max(1, math.ceil(len(piece) / 6)) if piece[0].isalnum() or piece[0] == "_" else 1
    return tokens


def embed_text(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector: signed bag-of-words hashing of the lower-cased words."""
    vector = [0.0] * dimensions
    for word in _WORD.findall(text.lower()):
        digest = int.from_bytes(
            hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little"
        )
        vector[digest % dimensions] += -1.0 if digest >> 63 else 1.0
    norm = math.sqrt(sum(v * v for v in vector))
    if norm == 0:  # no words (punctuation only): a fixed direction, still a valid vector
        vector[0], norm = 1.0, 1.0
    return [v / norm for v in vector]


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # the parsed JSON body, or the raw text when it was not JSON
    at: float  # time.monotonic() when it arrived
    fault: dict[str, Any] | None = None  # the scripted fault applied to it, if any

    @property
    def inputs(self) -> list[str]:
        """The embedding inputs of this request (a single string input as a list)."""
        if not isinstance(self.body, dict):
            return []
        value = self.body.get("input")
        return [value] if isinstance(value, str) else list(value or [])


@dataclass
class FakeOpenAI:
    """The fake API server. Start with start() (or a with block), stop with stop()."""

    faults: collections.deque[dict[str, Any]] = field(default_factory=collections.deque)
    fail_all: dict[str, Any] | None = None
    reject_inputs: set[str] = field(default_factory=set)
    rejected_status: int = 400
    requests: list[RecordedRequest] = field(default_factory=list)
    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    prompt_tokens: int = 0  # all endpoints
    completion_tokens: int = 0
    tokens_by_path: collections.Counter[str] = field(default_factory=collections.Counter)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> FakeOpenAI:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.fake = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # cut short any scripted delay
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._server is not None, "the fake OpenAI server is not running"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    # -- inspection --------------------------------------------------------------------

    def reset(self) -> None:
        """Forget recorded requests, counters and faults."""
        with self._lock:
            self.faults.clear()
            self.fail_all = None
            self.reject_inputs.clear()
            self.requests.clear()
            self.calls.clear()
            self.prompt_tokens = self.completion_tokens = 0
            self.tokens_by_path.clear()

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def embedding_tokens(self) -> int:
        """Tokens billed by /v1/embeddings (what its answers reported as usage)."""
        return self.tokens_by_path["/v1/embeddings"]

    @staticmethod
    def vector(text: str, dimensions: int) -> list[float]:
        """The vector this fake returns for `text` (before float32 encoding)."""
        return embed_text(text, dimensions)

    def embedding_requests(self) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.path == "/v1/embeddings"]

    def embedded_inputs(self) -> list[str]:
        """Every input sent to /v1/embeddings, in order (repeats included)."""
        return [text for r in self.embedding_requests() for text in r.inputs]

    # -- used by the handler -----------------------------------------------------------

    def _record(self, request: RecordedRequest) -> dict[str, Any] | None:
        """Record a request; return the fault to apply to it, if any."""
        with self._lock:
            if len(self.requests) < MAX_RECORDED:
                self.requests.append(request)
            self.calls[request.path] += 1
            if self.faults:
                fault: dict[str, Any] | None = self.faults.popleft()
            else:
                fault = dict(self.fail_all) if self.fail_all is not None else None
            request.fault = fault
            return fault

    def _rejected(self, inputs: list[Any]) -> str | None:
        """The first rejected marker found in these embedding inputs, if any."""
        with self._lock:
            markers = sorted(self.reject_inputs)
        for text in inputs:
            for marker in markers:
                if isinstance(text, str) and marker in text:
                    return marker
        return None

    def _count(self, path: str, prompt: int, completion: int = 0) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            self.tokens_by_path[path] += prompt + completion

    def _next_id(self) -> int:
        with self._lock:
            return next(self._ids)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    fake: FakeOpenAI


class _ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.headers = headers or {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # One buffered write per response (flushed by the base class), no Nagle: otherwise
    # headers and body leave in two segments and each answer waits for a delayed ACK.
    wbufsize = -1
    disable_nagle_algorithm = True
    timeout = IDLE_TIMEOUT_S  # idle keep-alive connections are closed
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet

    def do_GET(self) -> None:
        self._reply_error(_ApiError(404, f"Unknown request URL: GET {self.path}"))

    def do_POST(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._reply_error(_ApiError(413, "request body too large"))
            return
        raw = self.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        path = self.path.split("?", 1)[0]
        fault = fake._record(
            RecordedRequest("POST", path, dict(self.headers.items()), body, time.monotonic())
        )
        fault = fault or {}
        if fault.get("delay"):
            fake._stopping.wait(min(float(fault["delay"]), MAX_DELAY_S))
        if fault.get("drop"):
            self.close_connection = True
            return
        try:
            if fault.get("status"):
                headers = {}
                if fault.get("retry_after") is not None:
                    headers["Retry-After"] = str(fault["retry_after"])
                status = int(fault["status"])
                raise _ApiError(
                    status, f"scripted fault: HTTP {status}", _error_type(status), headers
                )
            if not self.headers.get("Authorization", "").startswith("Bearer "):
                raise _ApiError(401, "You didn't provide an API key.", "invalid_request_error")
            if fault.get("malformed"):
                self._send(200, b'{"object": "list", "data": [', "application/json")
                return
            if fault.get("html"):
                page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
                self._send(200, page, "text/html")
                return
            if path == "/v1/embeddings":
                answer = self._embeddings(body, fault)
            elif path == "/v1/chat/completions":
                answer = self._chat(body)
            else:
                raise _ApiError(404, f"Unknown request URL: POST {path}")
        except _ApiError as error:
            self._reply_error(error)
            return
        self._send(200, json.dumps(answer).encode("utf-8"), "application/json")

    # -- endpoints ---------------------------------------------------------------------

    def _embeddings(self, body: Any, fault: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _ApiError(400, "the body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _ApiError(400, "you must provide a model parameter")
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise _ApiError(400, "'input' must be a non-empty string or array of strings")
        if len(inputs) > MAX_INPUTS:
            raise _ApiError(400, f"'input' must have at most {MAX_INPUTS} items")
        if not all(isinstance(text, str) and text for text in inputs):
            raise _ApiError(400, "'$.input' is invalid: every item must be a non-empty string")
        marker = self.server.fake._rejected(inputs)
        if marker is not None:
            status = self.server.fake.rejected_status
            raise _ApiError(
                status, f"'$.input' rejected: it contains {marker!r}", _error_type(status)
            )
        dimensions = body.get("dimensions", DEFAULT_DIMENSIONS.get(model, FALLBACK_DIMENSIONS))
        if not isinstance(dimensions, int) or not 1 <= dimensions <= MAX_DIMENSIONS:
            raise _ApiError(400, f"'dimensions' must be an integer in 1..{MAX_DIMENSIONS}")
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise _ApiError(400, "'encoding_format' must be 'float' or 'base64'")

        data = []
        for index, text in enumerate(inputs):
            vector = embed_text(text, dimensions)
            if fault.get("wrong_dimensions"):
                vector = [*vector, 0.0]
            if fault.get("nan") and index == 0:
                vector = [math.nan, *vector[1:]]
            embedding: Any = vector
            if encoding == "base64":
                packed = struct.pack(f"<{len(vector)}f", *vector)
                embedding = base64.b64encode(packed).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        if fault.get("missing_vector"):
            data.pop()
        tokens = sum(count_tokens(text) for text in inputs)
        self.server.fake._count("/v1/embeddings", tokens)
        return {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def _chat(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise _ApiError(400, "you must provide a model parameter")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _ApiError(400, "'messages' must be a non-empty array")
        if body.get("stream"):
            raise _ApiError(400, "this fake does not stream")
        texts = [_message_text(m) for m in messages]
        last_user = next(
            (
                t
                for m, t in zip(reversed(messages), reversed(texts), strict=True)
                if _role(m) == "user"
            ),
            "",
        )
        topic = _topic(last_user)
        answer = f"You two should meet to talk about {topic}."
        prompt = sum(count_tokens(t) + 4 for t in texts)  # + role and separators
        completion = count_tokens(answer)
        self.server.fake._count("/v1/chat/completions", prompt, completion)
        return {
            "id": f"chatcmpl-fake-{self.server.fake._next_id()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }

    # -- plumbing ----------------------------------------------------------------------

    def _reply_error(self, error: _ApiError) -> None:
        payload = {
            "error": {
                "message": error.message,
                "type": error.kind,
                "param": None,
                "code": None,
            }
        }
        self._send(
            error.status,
            json.dumps(payload).encode("utf-8"),
            "application/json",
            error.headers,
        )

    def _send(
        self, status: int, payload: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("x-request-id", f"req_fake_{self.server.fake._next_id()}")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout)
            self.close_connection = True


def _error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_exceeded"
    if status >= 500:
        return "server_error"
    if status == 401:
        return "invalid_api_key"
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_")
    except ValueError:
        return "error"


_FILLER = frozenset(
    [
        "about",
        "attendee",
        "interests",
        "offers",
        "opening",
        "seeks",
        "sentence",
        "should",
        "their",
        "these",
        "title",
        "what",
        "when",
        "where",
        "which",
        "with",
        "write",
        "your",
    ]
)


def _topic(prompt: str) -> str:
    """Up to three words of the prompt, preferring words found on several of its lines
    (what two described attendees share)."""
    lines = [
        {w for w in _WORD.findall(line.lower()) if len(w) > 3 and w not in _FILLER}
        for line in prompt.splitlines()
    ]
    seen = collections.Counter(w for line in lines for w in line)
    ranked = sorted(seen, key=lambda w: (-seen[w], -len(w), w))[:3]
    return ", ".join(sorted(ranked)) if ranked else "your shared goals"


def _role(message: Any) -> str:
    return str(message.get("role", "")) if isinstance(message, dict) else ""


def _message_text(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):  # content parts
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content or "")


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    """A running fake OpenAI API (``.base_url`` = "http://127.0.0.1:PORT/v1")."""
    with FakeOpenAI() as fake:
        yield fake

"""HTTP API (API Gateway HTTP API, JWT authorizer): thin routes over core.api.service.

Every route is authenticated: API Gateway rejects calls without a valid token, and this
handler fails closed (401) if the authorizer context is missing anyway. Admin routes need
the matchmaker/admin scope; attendee tokens (no service scope) may only read and dismiss
their own matches. Each route declares its answers, so docs/openapi.json comes from here.
"""

# No "from __future__ import annotations": the resolver reads the annotations at runtime.

import json
from typing import Annotated, Any

import psycopg
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response
from aws_lambda_powertools.event_handler.openapi.exceptions import RequestValidationError
from aws_lambda_powertools.event_handler.openapi.params import Path
from aws_lambda_powertools.event_handler.openapi.types import OpenAPIResponse
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.data_classes import APIGatewayProxyEventV2
from aws_lambda_powertools.utilities.typing import LambdaContext

from core import aws
from core.api import service
from core.api.errors import (
    ConflictError,
    DomainError,
    ForbiddenError,
    InvalidEncodingError,
    InvalidInputError,
    MatchingTimeoutError,
    NotFoundError,
    TooLargeError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
)
from core.api.principals import Principal
from core.api.request_body import MAX_BODY_BYTES, body_bytes, parse_object
from core.api.schemas import (
    AttendeeIn,
    AttendeeOut,
    DeadLetterOut,
    DismissIn,
    EnqueueOut,
    ErrorOut,
    EventOut,
    RedriveOut,
    SeedStartIn,
    SeedTriggerIn,
    SettingsPatch,
    StartIn,
    StartOut,
    StatusOut,
    TriggerIn,
)
from core.data.conflicts import CONFLICT_ERRORS
from core.data.connections import ConnectionCache, DatabaseUnavailableError
from core.models import EVENT_CODE_PATTERN, USER_ID_PATTERN, AttendeeMatches, EventIn
from core.observability import MetricName, logger, metrics, tracer
from core.queue.deadline import monotonic_deadline
from core.settings import get_settings

API_VERSION = "1.0.0"

# The document's title, version and bearer scheme are given in openapi_document(), where
# they are used: Powertools' OpenAPI models (HTTPBearer) take about 100 ms to import and no
# request needs them (validation uses the routes' own annotations).
app = APIGatewayHttpResolver(enable_validation=True)
connections = ConnectionCache("matchmaker-api")

Code = Annotated[str, Path(pattern=EVENT_CODE_PATTERN, description="event code")]
UserIdPath = Annotated[str, Path(pattern=USER_ID_PATTERN, description="attendee user_id")]

# --- errors: the one place they become HTTP answers ----------------------------------------

# Domain errors carry no HTTP status: this table gives them one (by class, most specific
# first); the request's shape, the database and concurrent changes are the handlers below.
STATUS_OF_ERROR: dict[type[DomainError], int] = {
    NotFoundError: 404,
    ForbiddenError: 403,
    UnauthorizedError: 401,
    ConflictError: 409,
    TooLargeError: 413,
    UnsupportedMediaTypeError: 415,
    InvalidInputError: 422,
    MatchingTimeoutError: 503,
    InvalidEncodingError: 400,
    DomainError: 400,
}
ERROR_MEANING = {
    400: "a body that is not valid UTF-8 (or not valid base64 when marked so), or a request"
    " well-formed but impossible (an attendee dismissing themselves)",
    401: "no verified token",
    403: "the caller's role may not do this",
    404: "unknown event or attendee",
    409: "conflicts with the current state (other settings, a paused event)",
    413: f"body over {MAX_BODY_BYTES // 1024} KiB, or an event too large to match at once",
    415: "the body is not application/json in UTF-8",
    422: "invalid input: malformed JSON, a body that is not one JSON object within the limits"
    " (nesting, integer digits, no NaN/Infinity, no duplicate keys), wrong types, unknown"
    " fields, out-of-range values, a path that is not printable ASCII or bad path parameters",
    503: "the database is unavailable, a concurrent change kept conflicting, or synchronous"
    " matching ran out of time",
}
# Every request's body, if any, is read by lambda_handler (400, 413, 415, 422) before the
# route is known; then validation (422) and the database (503).
EVERY_ROUTE_ERRORS = (400, 401, 403, 413, 415, 422, 503)


def _error(status: int, code: str, message: str, details: Any = None) -> Response[str]:
    body = ErrorOut(error=code, message=message, details=details)
    return Response(status, "application/json", body.model_dump_json(exclude_none=True))


@app.exception_handler(DomainError)
def _domain_error(exc: DomainError) -> Response[str]:
    status = next(STATUS_OF_ERROR[c] for c in type(exc).__mro__ if c in STATUS_OF_ERROR)
    if isinstance(exc, InvalidInputError):  # the same shape as the models' validation errors
        return _error(status, exc.code, exc.message, [{"field": exc.field, "message": exc.problem}])
    return _error(status, exc.code, exc.message)


@app.exception_handler(RequestValidationError)
def _validation_error(exc: RequestValidationError) -> Response[str]:
    problems = [_problem(err) for err in exc.errors()]
    summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:5])
    return _error(422, "validation_error", summary or "invalid request", problems)


def _problem(err: Any) -> dict[str, str]:
    if err.get("type") == "json_invalid":
        return {"field": "body", "message": "malformed JSON"}
    field = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
    if not field and err.get("type") == "missing":
        return {"field": "body", "message": "this route needs a JSON object as its body"}
    return {"field": field or "body", "message": str(err.get("msg", "invalid"))}


@app.exception_handler(list(CONFLICT_ERRORS))  # what service.retried still got after retries
def _conflict(exc: psycopg.Error) -> Response[str]:
    logger.warning("request rolled back by concurrent changes", extra={"error": str(exc)})
    return _error(503, "conflict", "a concurrent change conflicted with this request; retry")


@app.exception_handler([psycopg.OperationalError, DatabaseUnavailableError])
def _database_down(exc: Exception) -> Response[str]:
    logger.exception("database unavailable")
    connections.discard()  # a broken connection must not serve the next request
    return _error(503, "unavailable", "the database is unavailable; retry shortly")


@app.not_found
def _no_route(exc: Exception) -> Response[str]:
    return _error(404, "not_found", "no such route")


def answers(success: dict[int, str], *errors: int) -> dict[int, OpenAPIResponse]:
    """A route's documented answers: its success codes (the body is the route's return
    type; 204 has none) and every error status it can answer, with the ErrorOut body."""
    documented: dict[int, OpenAPIResponse] = {
        status: {"description": text, "content": {}} if status == 204 else {"description": text}
        for status, text in success.items()
    }
    for status in sorted({*EVERY_ROUTE_ERRORS, *errors}):
        documented[status] = {
            "description": ERROR_MEANING[status],
            "content": {"application/json": {"model": ErrorOut}},
        }
    return documented


# --- the caller, the database, the matchmaker ------------------------------------------------


def principal_of(event: APIGatewayProxyEventV2) -> Principal:
    """The caller from the JWT authorizer's context; UnauthorizedError when it is absent."""
    try:
        authorizer = event.request_context.authorizer
        return Principal.from_claims(authorizer.jwt_claim, authorizer.jwt_scopes)
    except (AttributeError, KeyError, TypeError) as exc:
        raise UnauthorizedError("missing or invalid authorization") from exc


def admitted(event: dict[str, Any]) -> dict[str, Any]:
    """The request as the resolver may see it, or the DomainError that answers it first.

    Fail closed before anything else looks at the request: no verified claims, no access
    (401 even when the input or the route is also invalid). Then the path (422 unless
    printable ASCII) and the body, on every route alike: the bytes (413 over the limit,
    400 not UTF-8 or bad base64), the media type (415), and one JSON object within the
    limits (422; see core.api.request_body). The resolver gets that object re-serialised
    as application/json, so its own json.loads cannot choke, and never an array's first
    element (nor a form's empty fields). Routes
    without a body ignore a body that passes these checks.
    """
    principal_of(APIGatewayProxyEventV2(event))
    _check_path(event.get("rawPath") or "")
    data = body_bytes(event.get("body"), bool(event.get("isBase64Encoded")))
    if data and not _is_json(event.get("headers") or {}):
        raise UnsupportedMediaTypeError("send the body as application/json (UTF-8)")
    parsed = parse_object(data)
    # The resolver parses by content type: with no body, a form or multipart type would
    # make it read "no fields" as a valid body of defaults (a wiped profile).
    headers = {k: v for k, v in (event.get("headers") or {}).items() if k.lower() != "content-type"}
    clean = {**event, "headers": {**headers, "content-type": "application/json"}}
    clean["isBase64Encoded"] = False
    if parsed is None:
        clean.pop("body", None)
    else:
        clean["body"] = json.dumps(parsed)
    return clean


def _check_path(path: str) -> None:
    """Paths are printable ASCII (codes and user ids are): anything else is 422, a control
    character above all (the router drops a trailing newline: event x for "x<LF>")."""
    odd = next((i for i, c in enumerate(path) if not "!" <= c <= "~"), None)
    if odd is not None:
        raise InvalidInputError(
            f"the path may only hold printable ASCII; U+{ord(path[odd]):04X} at character"
            f" {odd + 1}",
            field="path",
        )


def _is_json(headers: dict[str, str]) -> bool:
    """No content type (JSON by default), or application/json without another charset."""
    value = next((v for k, v in headers.items() if k.lower() == "content-type"), None)
    if value is None:
        return True
    media_type, *parameters = (part.strip().lower() for part in value.split(";"))
    charsets = {p.partition("=")[2].strip('"') for p in parameters if p.startswith("charset=")}
    return media_type == "application/json" and charsets <= {"utf-8", "utf8"}


def _principal() -> Principal:
    return principal_of(app.current_event)


def _conn() -> psycopg.Connection[Any]:
    return connections.get(get_settings())


def _invoke(code: str) -> bool:
    """An operator's action (trigger, start, resume, settings, redrive): the wake queue
    when the stack has one, else the async invoke of the matchmaker function."""
    settings = get_settings()
    if settings.wake_queue_url:
        return aws.send_wake(settings.wake_queue_url, code, "operator")
    return aws.invoke_matchmaker(settings.matchmaker_function_name, code)


def _wake(code: str) -> bool:
    """An attendee's write (join, edit, dismissal, departure): only through the wake queue,
    which coalesces a burst into a few runs; an async invoke per join would be a storm."""
    return aws.send_wake(get_settings().wake_queue_url, code, "attendee")


def _no_content() -> Response[str]:
    return Response(204, "application/json", "")


# --- events and attendees ----------------------------------------------------------------


@app.post("/events", responses=answers({201: "created", 200: "exists, same settings"}, 409))
@tracer.capture_method(capture_response=False)
def create_event(body: EventIn) -> Response[EventOut]:
    out = service.create_event(_conn(), _principal(), body)
    return Response(201 if out.created else 200, "application/json", out)


@app.get("/events/<code>", responses=answers({200: "the event"}, 404))
def get_event(code: Code) -> EventOut:
    return service.get_event(_conn(), _principal(), code)


@app.put("/events/<code>/attendees/<user_id>", responses=answers({200: "upserted"}, 404))
@tracer.capture_method(capture_response=False)
def put_attendee(code: Code, user_id: UserIdPath, body: AttendeeIn) -> AttendeeOut:
    out = service.put_attendee(_conn(), _principal(), code, user_id, body, wake=_wake)
    metrics.add_metric(name=MetricName.ATTENDEES_UPSERTED, unit=MetricUnit.Count, value=1)
    return out


@app.delete("/events/<code>/attendees/<user_id>", responses=answers({204: "left"}, 404))
def remove_attendee(code: Code, user_id: UserIdPath) -> Response[str]:
    service.remove_attendee(_conn(), _principal(), code, user_id, wake=_wake)
    return _no_content()


@app.get("/events/<code>/attendees/<user_id>/matches", responses=answers({200: "ranked"}, 404))
def get_matches(code: Code, user_id: UserIdPath) -> AttendeeMatches:
    return service.get_matches(_conn(), _principal(), code, user_id)


@app.post(
    "/events/<code>/attendees/<user_id>/dismissals",
    responses=answers({204: "dismissed"}, 400, 404),
)
def dismiss(code: Code, user_id: UserIdPath, body: DismissIn) -> Response[str]:
    service.dismiss(_conn(), _principal(), code, user_id, body, wake=_wake)
    return _no_content()


TRIGGER_SUCCESS = {202: "queued", 200: "matched (useQueue: false)"}
START_SUCCESS = {202: "queued; the queue status right after the enqueue"}


@app.post("/events/<code>/matchmaking", responses=answers(TRIGGER_SUCCESS, 404, 409))
@tracer.capture_method(capture_response=False)
def trigger_matchmaking(code: Code, body: TriggerIn) -> Response[EnqueueOut]:
    """The original trigger-matchmaking: queue by default, legacy synchronous mode."""
    return _trigger(code, body)


def _trigger(code: str, body: TriggerIn) -> Response[EnqueueOut]:
    settings = get_settings()
    context: LambdaContext | None = app.lambda_context
    remaining = context.get_remaining_time_in_millis() if context else settings.max_runtime_ms
    deadline = monotonic_deadline(remaining, settings.max_runtime_ms, 2_000)
    out = service.trigger(
        _conn(), _principal(), code, body, settings=settings, invoke=_invoke, deadline=deadline
    )
    return Response(202 if out.mode == "queue" else 200, "application/json", out)


# --- admin (the original admin-start-matching and its status) ------------------------------


@app.post("/admin/events/<code>/matching", responses=answers(START_SUCCESS, 404))
def start_matching(code: Code, body: StartIn) -> Response[StartOut]:
    return _start(code, body)


def _start(code: str, body: StartIn) -> Response[StartOut]:
    out = service.start_matching(
        _conn(),
        _principal(),
        code,
        body,
        _invoke,
        settings=get_settings(),
        dead_letter_depth=_dead_letter_queue_depth,
    )
    return Response(202, "application/json", out)


def _dead_letter_queue_depth() -> int | None:
    return aws.queue_depth(get_settings().dead_letter_queue_url)


@app.get("/admin/events/<code>/status", responses=answers({200: "progress"}, 404))
def status(code: Code) -> StatusOut:
    """The event's state, its queue now and lifetime totals, coverage and exposure of the
    lists, the embedder serving it, and the dead-letter queue shared by all events."""
    return service.status(_conn(), _principal(), code, get_settings(), _dead_letter_queue_depth)


@app.post("/admin/events/<code>/pause", responses=answers({204: "paused"}, 404))
def pause(code: Code) -> Response[str]:
    service.set_paused(_conn(), _principal(), code, paused=True)
    return _no_content()


@app.post("/admin/events/<code>/resume", responses=answers({204: "resumed"}, 404))
def resume(code: Code) -> Response[str]:
    service.set_paused(_conn(), _principal(), code, paused=False)
    _invoke(code)
    return _no_content()


@app.patch("/admin/events/<code>/settings", responses=answers({200: "the event"}, 404))
def update_settings(code: Code, body: SettingsPatch) -> EventOut:
    """Change k, weights, the same-company rule or the embedder: the event is re-matched
    (and re-embedded for a new embedder)."""
    return service.update_settings(_conn(), _principal(), code, body, _invoke)


@app.get("/admin/events/<code>/dead-letters", responses=answers({200: "dead users"}, 404))
def list_dead_letters(code: Code) -> list[DeadLetterOut]:
    return service.dead_letters(_conn(), _principal(), code)


@app.post("/admin/events/<code>/dead-letters/redrive", responses=answers({200: "requeued"}, 404))
def redrive(code: Code) -> RedriveOut:
    return service.redrive(_conn(), _principal(), code, _invoke)


# --- the seed system's edge functions, for its clients (event code in the body) ----------


@app.post("/trigger-matchmaking", responses=answers(TRIGGER_SUCCESS, 404, 409))
@tracer.capture_method(capture_response=False)
def seed_trigger_matchmaking(body: SeedTriggerIn) -> Response[EnqueueOut]:
    """The seed's trigger-matchmaking edge function: POST /events/{code}/matchmaking with
    the event code and the user ids in camelCase in the body."""
    return _trigger(body.eventCode, body.to_trigger())


@app.post("/admin-start-matching", responses=answers(START_SUCCESS, 404))
def seed_admin_start_matching(body: SeedStartIn) -> Response[StartOut]:
    """The seed's admin-start-matching edge function: POST /admin/events/{code}/matching
    with the event code in the body."""
    return _start(body.eventCode, body.to_start())


def openapi_document() -> dict[str, Any]:
    """The committed docs/openapi.json is this document; a test fails when they differ.

    Powertools always adds the schemas of its own validation-error bodies, which no route
    answers with (each declares ErrorOut), and keeps a 204's empty content map: both go."""
    # Imported here, not at module level: see the comment above `app`.
    from aws_lambda_powertools.event_handler.openapi.models import HTTPBearer  # noqa: PLC0415

    document: dict[str, Any] = json.loads(
        app.get_openapi_json_schema(
            title="Matchmaker API",
            version=API_VERSION,
            security_schemes={"jwt": HTTPBearer(bearerFormat="JWT")},
            security=[{"jwt": []}],
        )
    )
    for name in ("HTTPValidationError", "ValidationError", "ResponseValidationError"):
        document["components"]["schemas"].pop(name, None)
    for operations in document["paths"].values():
        for operation in operations.values():
            for answer in operation["responses"].values():
                if answer.get("content") == {}:
                    del answer["content"]
    return document


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    try:
        request = admitted(event)
    except DomainError as exc:
        rejected = _domain_error(exc)
        return {
            "statusCode": rejected.status_code,
            "headers": {"Content-Type": "application/json"},
            "body": rejected.body,
            "isBase64Encoded": False,
        }
    return app.resolve(request, context)

"""HTTP API (API Gateway HTTP API, JWT authorizer): thin routes over core.api.service.

Every route is authenticated: API Gateway rejects calls without a valid token, and this
handler fails closed (401) if the authorizer context is missing anyway. Admin routes need
the matchmaker/admin scope; attendee tokens (no service scope) may only read and dismiss
their own matches.
"""

# No "from __future__ import annotations": the resolver reads the annotations at runtime.

import json
import random
import time
from contextvars import ContextVar
from typing import Annotated, Any

import psycopg
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response
from aws_lambda_powertools.event_handler.middlewares import NextMiddleware
from aws_lambda_powertools.event_handler.openapi.exceptions import RequestValidationError
from aws_lambda_powertools.event_handler.openapi.params import Path
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.data_classes import APIGatewayProxyEventV2
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel

from core import aws
from core.api import service
from core.api.errors import (
    ConflictError,
    DomainError,
    ForbiddenError,
    MatchingTimeoutError,
    NotFoundError,
    TooLargeError,
    UnauthorizedError,
)
from core.api.principals import Principal
from core.api.schemas import (
    AttendeeIn,
    AttendeeOut,
    DeadLetterOut,
    DismissIn,
    EnqueueOut,
    EventOut,
    RedriveOut,
    SettingsPatch,
    StartIn,
    StatusOut,
    TriggerIn,
)
from core.data.conflicts import CONFLICT_ERRORS
from core.data.connections import ConnectionCache, DatabaseUnavailableError
from core.models import EVENT_CODE_PATTERN, USER_ID_PATTERN, AttendeeMatches, EventIn
from core.observability import logger, metrics, tracer
from core.queue.deadline import monotonic_deadline
from core.settings import get_settings

MAX_BODY_BYTES = 256 * 1024
API_VERSION = "1.0.0"

app = APIGatewayHttpResolver(enable_validation=True)
connections = ConnectionCache("matchmaker-api")

Code = Annotated[str, Path(pattern=EVENT_CODE_PATTERN, description="event code")]
UserIdPath = Annotated[str, Path(pattern=USER_ID_PATTERN, description="attendee user_id")]


def _error(status: int, code: str, message: str, details: Any = None) -> Response[str]:
    body: dict[str, Any] = {"error": code, "message": message}
    if details is not None:
        body["details"] = details
    return Response(status_code=status, content_type="application/json", body=json.dumps(body))


def principal_of(event: APIGatewayProxyEventV2) -> Principal:
    """The caller from the JWT authorizer's context; UnauthorizedError when it is absent."""
    try:
        authorizer = event.request_context.authorizer
        return Principal.from_claims(authorizer.jwt_claim, authorizer.jwt_scopes)
    except (AttributeError, KeyError, TypeError) as exc:
        raise UnauthorizedError("missing or invalid authorization") from exc


def reject_early(event: APIGatewayProxyEventV2) -> Response[str] | None:
    """Fail closed before anything else looks at the request: no verified claims, no
    access (401 even when the input is also invalid); oversize bodies are never parsed."""
    try:
        principal_of(event)
    except UnauthorizedError:
        return _error(401, "unauthorized", "missing or invalid authorization")
    if len((event.body or "").encode()) > MAX_BODY_BYTES:
        return _error(413, "too_large", f"request body is larger than {MAX_BODY_BYTES} bytes")
    content_type = (event.headers or {}).get("content-type", "application/json").lower()
    if event.body and not content_type.startswith("application/json"):
        return _error(415, "unsupported_media_type", "send the body as application/json")
    return None


def authenticate(app: APIGatewayHttpResolver, next_middleware: NextMiddleware) -> Response[Any]:
    """Puts the principal in the route's context (lambda_handler already rejected the
    unauthenticated; this keeps routes safe if the resolver is ever called directly)."""
    rejected = reject_early(app.current_event)
    if rejected is not None:
        return rejected
    app.append_context(principal=principal_of(app.current_event))
    return next_middleware(app)


app.use(middlewares=[authenticate])


def _principal() -> Principal:
    principal = app.context.get("principal")
    if not isinstance(principal, Principal):  # the middleware always sets it
        raise UnauthorizedError("missing or invalid authorization")
    return principal


def _conn() -> psycopg.Connection[Any]:
    return connections.get(get_settings())


def _invoke(code: str) -> bool:
    return aws.invoke_matchmaker(get_settings().matchmaker_function_name, code)


# Domain errors carry no HTTP status: this table is where they get one.
STATUS_OF_ERROR: dict[type[DomainError], int] = {
    NotFoundError: 404,
    ForbiddenError: 403,
    UnauthorizedError: 401,
    ConflictError: 409,
    TooLargeError: 413,
    MatchingTimeoutError: 503,
}


@app.exception_handler(DomainError)
def _domain_error(exc: DomainError) -> Response[str]:
    return _error(STATUS_OF_ERROR.get(type(exc), 400), exc.code, exc.message)


@app.not_found
def _no_route(exc: Exception) -> Response[str]:
    return _error(404, "not_found", "no such route")


def _problem(err: Any) -> dict[str, str]:
    if err.get("type") == "json_invalid":
        return {"field": "body", "message": "malformed JSON"}
    field = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
    return {"field": field, "message": str(err.get("msg", "invalid"))}


@app.exception_handler(RequestValidationError)
def _validation_error(exc: RequestValidationError) -> Response[str]:
    problems = [_problem(err) for err in exc.errors()]
    summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:5])
    return _error(422, "validation_error", summary or "invalid request", problems)


# Set when a request's transaction was rolled back by a conflict with a concurrent one
# (deadlock, serialization failure): nothing was written, so the handler runs it again.
_conflicted: ContextVar[bool] = ContextVar("conflicted", default=False)
CONFLICT_RETRIES = 3


@app.exception_handler(list(CONFLICT_ERRORS))
def _conflict(exc: psycopg.Error) -> Response[str]:
    logger.warning("request rolled back by a concurrent change", extra={"error": str(exc)})
    _conflicted.set(True)
    return _error(503, "conflict", "a concurrent change conflicted with this request; retry")


@app.exception_handler(psycopg.OperationalError)
def _database_down(exc: psycopg.OperationalError) -> Response[str]:
    logger.exception("database unavailable")
    connections.discard()
    return _error(503, "unavailable", "the database is unavailable; retry shortly")


@app.exception_handler(DatabaseUnavailableError)
def _no_database(exc: DatabaseUnavailableError) -> Response[str]:
    logger.exception("database unavailable")
    return _error(503, "unavailable", "the database is unavailable; retry shortly")


# --- events and attendees ----------------------------------------------------------------


@app.post("/events")
@tracer.capture_method
def create_event(body: EventIn) -> Response[str]:
    out = service.create_event(_conn(), _principal(), body)
    return Response(
        status_code=201 if out.created else 200,
        content_type="application/json",
        body=out.model_dump_json(),
    )


@app.get("/events/<code>")
def get_event(code: Code) -> EventOut:
    return service.get_event(_conn(), _principal(), code)


@app.put("/events/<code>/attendees/<user_id>")
@tracer.capture_method
def put_attendee(code: Code, user_id: UserIdPath, body: AttendeeIn) -> AttendeeOut:
    out = service.put_attendee(_conn(), _principal(), code, user_id, body)
    metrics.add_metric(name="AttendeesUpserted", unit="Count", value=1)
    return out


@app.delete("/events/<code>/attendees/<user_id>")
def remove_attendee(code: Code, user_id: UserIdPath) -> Response[str]:
    service.remove_attendee(_conn(), _principal(), code, user_id)
    return Response(status_code=204, content_type="application/json", body="")


@app.get("/events/<code>/attendees/<user_id>/matches")
def get_matches(code: Code, user_id: UserIdPath) -> AttendeeMatches:
    return service.get_matches(_conn(), _principal(), code, user_id)


@app.post("/events/<code>/attendees/<user_id>/dismissals")
def dismiss(code: Code, user_id: UserIdPath, body: DismissIn) -> Response[str]:
    service.dismiss(_conn(), _principal(), code, user_id, body)
    return Response(status_code=204, content_type="application/json", body="")


@app.post("/events/<code>/matchmaking")
@tracer.capture_method
def trigger_matchmaking(code: Code, body: TriggerIn) -> Response[str]:
    """The original trigger-matchmaking: queue by default, legacy synchronous mode."""
    settings = get_settings()
    context: LambdaContext | None = app.lambda_context
    remaining = context.get_remaining_time_in_millis() if context else settings.max_runtime_ms
    deadline = monotonic_deadline(remaining, settings.max_runtime_ms, 2_000)
    out = service.trigger(
        _conn(), _principal(), code, body, settings=settings, invoke=_invoke, deadline=deadline
    )
    return Response(
        status_code=202 if out.mode == "queue" else 200,
        content_type="application/json",
        body=out.model_dump_json(),
    )


# --- admin (the original admin-start-matching and its status) ------------------------------


@app.post("/admin/events/<code>/matching")
def start_matching(code: Code, body: StartIn) -> Response[str]:
    out: EnqueueOut = service.start_matching(_conn(), _principal(), code, body, _invoke)
    return Response(status_code=202, content_type="application/json", body=out.model_dump_json())


@app.get("/admin/events/<code>/status")
def status(code: Code) -> StatusOut:
    settings = get_settings()
    return service.status(
        _conn(), _principal(), code, lambda: aws.queue_depth(settings.dead_letter_queue_url)
    )


@app.post("/admin/events/<code>/pause")
def pause(code: Code) -> Response[str]:
    service.set_paused(_conn(), _principal(), code, paused=True)
    return Response(status_code=204, content_type="application/json", body="")


@app.post("/admin/events/<code>/resume")
def resume(code: Code) -> Response[str]:
    service.set_paused(_conn(), _principal(), code, paused=False)
    _invoke(code)
    return Response(status_code=204, content_type="application/json", body="")


@app.patch("/admin/events/<code>/settings")
def update_settings(code: Code, body: SettingsPatch) -> EventOut:
    """Change k, weights, the same-company rule or the embedder: the event is re-matched
    (and re-embedded for a new embedder)."""
    return service.update_settings(_conn(), _principal(), code, body, _invoke)


@app.get("/admin/events/<code>/dead-letters")
def list_dead_letters(code: Code) -> list[DeadLetterOut]:
    return service.dead_letters(_conn(), _principal(), code)


@app.post("/admin/events/<code>/dead-letters/redrive")
def redrive(code: Code) -> RedriveOut:
    return service.redrive(_conn(), _principal(), code, _invoke)


class ErrorOut(BaseModel):
    """Every error answer (the routes' `_error`)."""

    error: str
    message: str
    details: list[dict[str, str]] | None = None


# Routes that answer with Response objects: their real status codes and bodies.
SUCCESS_RESPONSES: dict[tuple[str, str], dict[str, type[BaseModel] | None]] = {
    ("post", "/events"): {"200": EventOut, "201": EventOut},
    ("delete", "/events/{code}/attendees/{user_id}"): {"204": None},
    ("post", "/events/{code}/attendees/{user_id}/dismissals"): {"204": None},
    ("post", "/events/{code}/matchmaking"): {"200": EnqueueOut, "202": EnqueueOut},
    ("post", "/admin/events/{code}/matching"): {"202": EnqueueOut},
    ("post", "/admin/events/{code}/pause"): {"204": None},
    ("post", "/admin/events/{code}/resume"): {"204": None},
}
ERROR_RESPONSES = {
    "400": "well-formed but impossible (an attendee dismissing themselves)",
    "401": "no verified token",
    "403": "the caller's role may not do this",
    "404": "unknown event, attendee or route",
    "409": "conflicts with the current state (other settings, a paused event)",
    "413": "body over 256 KiB, or an event too large for synchronous matching",
    "415": "the body is not application/json",
    "422": "invalid input: malformed JSON, wrong types, unknown fields, bad path parameters",
    "503": (
        "the database is unavailable, a concurrent change kept conflicting, or synchronous"
        " matching ran out of time"
    ),
}


def _json_content(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}


def openapi_document() -> dict[str, Any]:
    """The committed docs/openapi.json is this document; a test fails when they differ.

    Powertools documents 200 and its own 422 shape; the API answers with the codes and the
    error body below, and every route needs a bearer JWT, so the document says so."""
    document: dict[str, Any] = json.loads(
        app.get_openapi_json_schema(title="Matchmaker API", version=API_VERSION)
    )
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for model in (ErrorOut, EventOut, EnqueueOut):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, nested in schema.pop("$defs", {}).items():
            schemas.setdefault(name, nested)
        schemas[model.__name__] = schema
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    document["components"]["securitySchemes"] = {
        "jwt": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    }
    document["security"] = [{"jwt": []}]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            override = SUCCESS_RESPONSES.get((method, path))
            if override is not None:
                responses.pop("200", None)
                for status, body in override.items():
                    responses[status] = {"description": "success"}
                    if body is not None:
                        responses[status]["content"] = _json_content(body)
            for status, description in ERROR_RESPONSES.items():
                responses[status] = {"description": description, "content": _json_content(ErrorOut)}
    return document


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    rejected = reject_early(APIGatewayProxyEventV2(event))
    if rejected is not None:
        return {
            "statusCode": rejected.status_code,
            "headers": {"Content-Type": "application/json"},
            "body": rejected.body,
            "isBase64Encoded": False,
        }
    for attempt in range(1, CONFLICT_RETRIES + 1):
        _conflicted.set(False)
        response = app.resolve(event, context)
        if not _conflicted.get() or attempt == CONFLICT_RETRIES:
            break
        time.sleep(random.uniform(0, 0.05 * attempt))  # noqa: S311 -- jitter, not security
    return response

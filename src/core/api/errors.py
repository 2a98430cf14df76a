"""What can go wrong in an API operation, as domain errors: each says what happened and
what to fix, and carries a stable machine-readable code. They carry no HTTP status:
handlers.api maps them to one, in a single table."""

from __future__ import annotations


class DomainError(Exception):
    """Well-formed but impossible (an attendee dismissing themselves)."""

    code = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFoundError(DomainError):
    """No such event, attendee or route."""

    code = "not_found"


class ForbiddenError(DomainError):
    """The caller's role may not do this."""

    code = "forbidden"


class UnauthorizedError(DomainError):
    """No verified caller."""

    code = "unauthorized"


class ConflictError(DomainError):
    """Conflicts with the current state (other settings, a paused event)."""

    code = "conflict"


class TooLargeError(DomainError):
    """More than the operation can take (an event too large for synchronous matching)."""

    code = "too_large"


class MatchingTimeoutError(DomainError):
    """Synchronous matching ran out of time; the rest stays queued."""

    code = "timeout"


class InvalidInputError(DomainError):
    """Input the models could not be asked about, or that only the operation can judge: a
    body that is not a JSON object within the limits, settings invalid once merged with
    the current ones. `field` says where (a dotted path; "body" for the whole body);
    `problem` is the stable short form for the details, when the message adds specifics."""

    code = "validation_error"

    def __init__(self, message: str, field: str = "body", problem: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.problem = problem or message


class InvalidEncodingError(DomainError):
    """The body's bytes are not what they claim to be: not UTF-8, or not base64."""

    code = "invalid_encoding"


class UnsupportedMediaTypeError(DomainError):
    """A body that is not application/json (in UTF-8)."""

    code = "unsupported_media_type"

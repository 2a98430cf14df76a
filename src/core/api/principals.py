"""Who is calling: the authenticated principal and the three roles (admin, service,
attendee), from the claims of a verified JWT."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from core.api.errors import ForbiddenError, UnauthorizedError

Role = Literal["admin", "service", "attendee"]
ADMIN_SCOPE = "matchmaker/admin"
SERVICE_SCOPE = "matchmaker/service"


@dataclass(frozen=True)
class Principal:
    """The authenticated caller, from the API Gateway JWT authorizer context.

    admin: operators (scope matchmaker/admin); service: the event app's backend (scope
    matchmaker/service); attendee: an end user whose token subject is their user_id.
    """

    subject: str
    role: Role

    @classmethod
    def from_claims(cls, claims: dict[str, Any] | None, scopes: list[str] | None) -> Principal:
        if not claims or not claims.get("sub"):
            raise UnauthorizedError("missing or invalid authorization")
        granted = set(scopes or []) | set(str(claims.get("scope", "")).split())
        role: Role = (
            "admin"
            if ADMIN_SCOPE in granted
            else "service"
            if SERVICE_SCOPE in granted
            else "attendee"
        )
        return cls(str(claims["sub"]), role)

    def require_admin(self) -> None:
        if self.role != "admin":
            raise ForbiddenError("this route needs an admin principal")

    def require_service(self) -> None:
        if self.role not in ("admin", "service"):
            raise ForbiddenError("this route needs a service or admin principal")

    def require_self_or_service(self, user_id: str) -> None:
        if self.role == "attendee" and self.subject != user_id:
            raise ForbiddenError("attendees can only act on their own matches")

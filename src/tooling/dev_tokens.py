"""Development tokens for `matchmaker serve`: HS256 JWTs signed with a local secret.

The local server verifies them and hands their claims to the handlers exactly as API
Gateway's JWT authorizer would, so local runs exercise the same authorisation code as
production (roles from scopes, attendees by `sub`)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from pathlib import Path
from typing import Any

ISSUER = "matchmaker-local"
AUDIENCE = "matchmaker"
DEFAULT_TTL_S = 7 * 24 * 3600
ROLE_SCOPES = {"admin": "matchmaker/admin", "service": "matchmaker/service", "attendee": ""}


class TokenError(ValueError):
    """The token is malformed, wrongly signed or expired."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_secret(path: Path) -> bytes:
    """The signing secret, created on first use (kept beside the local data, mode 600)."""
    if path.exists():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32).encode()
    path.write_bytes(secret)
    path.chmod(0o600)
    return secret


def mint(secret: bytes, role: str, subject: str, ttl_s: int = DEFAULT_TTL_S) -> str:
    if role not in ROLE_SCOPES:
        raise TokenError(f"unknown role {role!r}; use admin, service or attendee")
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": subject,
        "iat": now,
        "exp": now + ttl_s,
        "scope": ROLE_SCOPES[role],
    }
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(signature)}"


def verify(secret: bytes, token: str) -> dict[str, Any]:
    """The token's claims, as API Gateway's authorizer passes them (strings)."""
    try:
        header, payload, signature = token.split(".")
        expected = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64(signature)):
            raise TokenError("bad signature")
        if json.loads(_unb64(header)).get("alg") != "HS256":
            raise TokenError("unexpected algorithm")
        claims: dict[str, Any] = json.loads(_unb64(payload))
    except (ValueError, json.JSONDecodeError) as exc:
        raise TokenError(f"malformed token: {exc}") from exc
    if claims.get("iss") != ISSUER or claims.get("aud") != AUDIENCE:
        raise TokenError("wrong issuer or audience")
    if int(claims.get("exp", 0)) < time.time():
        raise TokenError("expired")
    return {key: str(value) for key, value in claims.items()}

"""Development tokens for `matchmaker serve`: HS256 JWTs signed with a local secret.

The local server verifies them and hands their claims to the handlers exactly as API
Gateway's JWT authorizer would, so local runs exercise the same authorisation code as
production (roles from scopes, attendees by `sub`). Tokens are minted and verified with
PyJWT (the dev extra, imported when first needed): `jwt.decode` checks the HS256 signature,
the issuer, the audience, that `exp`, `iss`, `aud` and `sub` are present, and `exp`, `nbf`
and `iat` against the clock with LEEWAY_S of skew. Before it, structural checks PyJWT does
not make: exactly three strict base64url segments (no padding, nothing outside the
alphabet); a JSON-object header of `alg` HS256 and optionally `typ` JWT, nothing that
points at another key (no `kid`, `jwk`, `jku`, `x5u`, `x5c`, `crit`); JSON objects without
duplicate keys or NaN/Infinity. After it, the checks where PyJWT is weaker: `sub` a
non-empty string, and `exp`, `nbf`, `iat` JSON numbers (PyJWT passes them through int(),
which accepts booleans and numeric strings and truncates fractions) compared exactly with
the leeway. Anything else is a TokenError (the server answers 401).

`sign` is kept as a plain HMAC signer so tests can build tokens whatever their header or
claims say (tokens the verifier must refuse).

The signing secret lives in the user's state directory (default_secret_path: under
XDG_STATE_HOME, ~/.local/state on Linux), never beside a data directory that may sit in
/tmp. It is created atomically with mode 0600 and refused when another user owns it or
anyone else may read or write it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import stat
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

ISSUER = "matchmaker-local"
AUDIENCE = "matchmaker"
ALGORITHM = "HS256"
DEFAULT_TTL_S = 7 * 24 * 3600
LEEWAY_S = 30  # clock skew tolerated on exp, nbf and iat (the clocks are this machine's)
ROLE_SCOPES = {"admin": "matchmaker/admin", "service": "matchmaker/service", "attendee": ""}
HEADER_KEYS = frozenset({"alg", "typ"})  # anything else could name another key or algorithm
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")  # unpadded, as RFC 7515 requires
_SIGNATURE_BYTES = hashlib.sha256().digest_size


SECRET_FILE = "dev-token-secret"  # noqa: S105 (a file name, not a secret)
SECRET_MODE = 0o600
SECRET_MIN_BYTES = 32
MISSING_DEV_EXTRA = "matchmaker serve and token need the dev extra: pip install -e '.[dev]'"


class TokenError(ValueError):
    """The token is malformed, wrongly signed, expired or not yet valid."""


class SecretFileError(RuntimeError):
    """The signing secret's file cannot be trusted (owner, mode, type) or is unusable."""


class DevExtraMissingError(ImportError):
    """PyJWT (the dev extra) is not installed."""


def _pyjwt() -> ModuleType:
    # PyJWT is a dev extra: import it only when a token is minted or checked.
    try:
        import jwt  # noqa: PLC0415
    except ImportError as exc:
        raise DevExtraMissingError(MISSING_DEV_EXTRA) from exc
    return jwt


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    # base64's decoder skips characters outside the alphabet: check them first.
    if not _BASE64URL.fullmatch(text) or len(text) % 4 == 1:
        raise TokenError("malformed token: a segment is not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _reject_constant(name: str) -> Any:
    raise TokenError(f"malformed token: {name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise TokenError("malformed token: a key appears twice")
    return dict(pairs)


def _json_object(segment: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(
            _unb64(segment).decode("utf-8"),
            parse_constant=_reject_constant,
            object_pairs_hook=_unique_keys,
        )
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSONDecodeError too
        raise TokenError(f"malformed token: the {what} is not JSON") from exc
    if not isinstance(value, dict):
        raise TokenError(f"malformed token: the {what} is not a JSON object")
    return value


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate claim (RFC 7519: seconds, integer or not); None when absent."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenError(f"{name} is not a number")
    try:
        moment = float(value)
    except OverflowError:  # an integer beyond float range
        raise TokenError(f"{name} is out of range") from None
    if not math.isfinite(moment):
        raise TokenError(f"{name} is not a number")
    return moment


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The user's state directory for matchmaker: $XDG_STATE_HOME/matchmaker (an absolute
    path, as the XDG spec requires), else ~/.local/state/matchmaker; the platform's
    equivalent on macOS and Windows."""
    env = os.environ if environ is None else environ
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "matchmaker"
    if sys.platform == "win32":
        return Path(env.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "matchmaker"
    configured = env.get("XDG_STATE_HOME", "")
    base = Path(configured) if os.path.isabs(configured) else Path.home() / ".local" / "state"
    return base / "matchmaker"


def default_secret_path(environ: Mapping[str, str] | None = None) -> Path:
    return state_dir(environ) / SECRET_FILE


def load_secret(path: Path | None = None) -> bytes:
    """The signing secret, created on first use (default: default_secret_path()).

    Created atomically: written to a private temporary file (O_CREAT|O_EXCL, mode 0600)
    then published with link(), which fails if the secret exists - so a concurrent first
    use never sees a partial file and never overwrites the winner's secret."""
    path = path or default_secret_path()
    if not os.path.lexists(path):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        secret = secrets.token_hex(32).encode()
        scratch = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        descriptor = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_MODE)
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(secret)
            os.link(scratch, path)
        except FileExistsError:
            pass  # another process created it first: use theirs
        finally:
            scratch.unlink(missing_ok=True)
    return _trusted_secret(path)


def _trusted_secret(path: Path) -> bytes:
    """The secret in path, after checking that only this user owns and can use the file."""
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:  # a symlink (ELOOP), a directory, no permission, ...
        raise SecretFileError(f"cannot open the dev-token secret {path}: {exc}") from exc
    with os.fdopen(descriptor, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise SecretFileError(f"the dev-token secret {path} is not a regular file")
        if hasattr(os, "getuid"):  # POSIX: owner and mode mean something
            if info.st_uid != os.getuid():
                raise SecretFileError(
                    f"the dev-token secret {path} belongs to uid {info.st_uid}, not to you "
                    f"(uid {os.getuid()}): remove it, a new one is created"
                )
            if info.st_mode & 0o077:
                raise SecretFileError(
                    f"the dev-token secret {path} has mode {stat.S_IMODE(info.st_mode):04o}: "
                    f"others may read it; remove it (a new one is created) or `chmod 600` it"
                )
        secret = file.read().strip()
    if len(secret) < SECRET_MIN_BYTES:
        raise SecretFileError(
            f"the dev-token secret {path} is shorter than {SECRET_MIN_BYTES} bytes: remove it"
        )
    return secret


def sign(secret: bytes, claims: Mapping[str, Any], header: Mapping[str, Any] | None = None) -> str:
    """A JWT of these claims signed with HMAC-SHA256, whatever the header says (tests use
    it to build tokens the verifier must refuse)."""
    head = _b64(json.dumps(header or {"alg": ALGORITHM, "typ": "JWT"}).encode())
    payload = _b64(json.dumps(dict(claims), separators=(",", ":")).encode())
    signature = hmac.new(secret, f"{head}.{payload}".encode(), hashlib.sha256).digest()
    return f"{head}.{payload}.{_b64(signature)}"


def mint(secret: bytes, role: str, subject: str, ttl_s: int = DEFAULT_TTL_S) -> str:
    if role not in ROLE_SCOPES:
        raise TokenError(f"unknown role {role!r}; use admin, service or attendee")
    jwt = _pyjwt()
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": subject,
        "iat": now,
        "exp": now + ttl_s,
        "scope": ROLE_SCOPES[role],
    }
    token: str = jwt.encode(claims, secret, algorithm=ALGORITHM, headers={"typ": "JWT"})
    return token


def _check_structure(token: str) -> dict[str, Any]:
    """The payload, after the checks PyJWT does not make (segments, header, strict JSON)."""
    segments = token.split(".")
    if len(segments) != 3:
        raise TokenError("malformed token: a JWT has three segments")
    header_text, payload_text, signature_text = segments
    header = _json_object(header_text, "header")
    if header.get("alg") != ALGORITHM:
        raise TokenError(f"unexpected algorithm: only {ALGORITHM} is accepted")
    if not header.keys() <= HEADER_KEYS or header.get("typ", "JWT") != "JWT":
        raise TokenError("unexpected header: only alg and typ (JWT) are accepted")
    if len(_unb64(signature_text)) != _SIGNATURE_BYTES:
        raise TokenError("bad signature")
    return _json_object(payload_text, "payload")


def verify(secret: bytes, token: str, *, now: float | None = None) -> dict[str, str]:
    """The token's claims, as API Gateway's authorizer passes them (strings).

    `now` pins the clock (tests): PyJWT reads the real clock, so then only our own clock
    checks apply; without it both PyJWT's and ours do."""
    jwt = _pyjwt()
    claims = _check_structure(token)
    pinned = now is not None
    try:
        jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
            issuer=ISSUER,
            leeway=LEEWAY_S,
            options={
                "require": ["exp", "iss", "aud", "sub"],
                "verify_signature": True,
                "verify_iss": True,
                "verify_aud": True,
                "verify_sub": True,
                "verify_exp": not pinned,
                "verify_nbf": not pinned,
                "verify_iat": not pinned,
            },
        )
    except jwt.ExpiredSignatureError as exc:
        raise TokenError("expired") from exc
    except jwt.ImmatureSignatureError as exc:
        raise TokenError("not yet valid (nbf or iat is in the future)") from exc
    except jwt.InvalidSignatureError as exc:
        raise TokenError("bad signature") from exc
    except jwt.InvalidIssuerError as exc:
        raise TokenError("wrong issuer") from exc
    except jwt.InvalidAudienceError as exc:
        raise TokenError("wrong audience") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise TokenError(f"no {exc.claim} claim") from exc
    except jwt.PyJWTError as exc:
        raise TokenError(f"rejected: {exc}") from exc
    # Where PyJWT is weaker: it int()s the dates (booleans, numeric strings, truncation).
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        raise TokenError("no subject")
    current = time.time() if now is None else now
    expires = _numeric_date(claims, "exp")
    if expires is None:
        raise TokenError("no expiry")
    if expires + LEEWAY_S <= current:
        raise TokenError("expired")
    for name in ("nbf", "iat"):
        moment = _numeric_date(claims, name)
        if moment is not None and moment - LEEWAY_S > current:
            raise TokenError(f"{name} is in the future")
    return {
        key: value if isinstance(value, str) else json.dumps(value) for key, value in claims.items()
    }

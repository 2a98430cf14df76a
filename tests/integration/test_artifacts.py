"""The Lambda artifacts, built for real: reproducible bytes, and only what each one needs.

The checkout's build inputs (Makefile, mk/, pyproject.toml, locks/, src/, db/) are copied into two
temporary folders, and each copy runs `make build-<LogicalId> ARTIFACTS_DIR=...` for both
layers and every function, as `sam build` does (one make per target, every
ARTIFACTS_DIR a sibling, so the layers share one pip install per build). The second copy
builds under another umask, with other file mtimes. Each artifact is then zipped by SAM's
own make_zip_with_lambda_permissions (what `sam package` / `sam deploy` upload), run by
the SAM CLI's interpreter in .tools/sam, and the two builds' zips must be byte-identical.

The layers are pip-installed from PyPI (the wheel cache makes it quick after the first
time); the tests skip, saying why, when PyPI cannot be reached or the SAM CLI is missing.
About 70 s on two cores, most of it compiling and zipping the layers twice.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest

from tests.unit.test_template import EXPECTED_HANDLERS, EXPECTED_LAYERS, load_template

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SAM_PYTHON = ROOT / ".tools" / "sam" / "bin" / "python"
BUILD_INPUTS = ("Makefile", "mk", "pyproject.toml", "locks", "src", "db")
FUNCTIONS = tuple(EXPECTED_LAYERS)
LAYERS = ("BaseLayer", "MatchingLayer")
# Lambda's limit for a function plus all its layers, unzipped.
LAMBDA_UNZIPPED_LIMIT = 250 * 2**20
# SAM's zip of each directory named on the command line, into argv[1]: name -> zip path.
# `sam package`/`sam deploy` zip functions and layers with make_zip_with_lambda_permissions.
ZIP_WITH_SAM = """
import json, os, sys
from samcli.lib.package.utils import make_zip_with_lambda_permissions as make_zip
out = sys.argv[1]
print(json.dumps({os.path.basename(d): make_zip(os.path.join(out, os.path.basename(d)), d)
                  for d in sys.argv[2:]}))
"""


@dataclass
class Build:
    root: Path  # the temporary folder: the checkout's copy and the artifacts are inside
    zips: dict[str, Path]

    @cached_property
    def contents(self) -> dict[str, dict[str, bytes]]:
        """Artifact -> {path in the zip: bytes}."""
        result = {}
        for name, path in self.zips.items():
            with zipfile.ZipFile(path) as archive:
                result[name] = {info.filename: archive.read(info) for info in archive.infolist()}
        return result

    def unzipped_size(self, name: str) -> int:
        with zipfile.ZipFile(self.zips[name]) as archive:
            return sum(info.file_size for info in archive.infolist())


def _index_reachable() -> bool:
    """Whether the build's pip (the SAM CLI's) can read the package index at all."""
    probe = subprocess.run(
        [str(SAM_PYTHON), "-m", "pip", "index", "versions", "pydantic"],
        capture_output=True,
        text=True,
        check=False,
    )
    return probe.returncode == 0


def _build(root: Path, umask: int) -> Build:
    checkout = root / "checkout"
    for name in BUILD_INPUTS:
        source = ROOT / name
        if source.is_dir():
            # copy, not copy2: the copies' mtimes differ from the checkout's and each other's
            shutil.copytree(
                source,
                checkout / name,
                copy_function=shutil.copy,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            )
        else:
            checkout.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, checkout / name)
    artifacts = root / "build"
    for target in (*LAYERS, *FUNCTIONS):
        run = subprocess.run(
            [
                "make",
                "--no-print-directory",
                f"build-{target}",
                f"ARTIFACTS_DIR={artifacts / target}",
                f"TOOLS_DIR={ROOT / '.tools'}",
                f"TOOLS_PYTHON={sys.executable}",
            ],
            cwd=checkout,
            capture_output=True,
            text=True,
            umask=umask,
            check=False,
        )
        if run.returncode != 0:
            if not _index_reachable():
                pytest.skip("PyPI is unreachable: the layers' packages cannot be installed")
            pytest.fail(f"make build-{target} failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    zips = root / "zips"
    zips.mkdir()
    zipped = subprocess.run(
        [
            str(SAM_PYTHON),
            "-c",
            ZIP_WITH_SAM,
            str(zips),
            *(str(artifacts / name) for name in (*LAYERS, *FUNCTIONS)),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return Build(root, {name: Path(path) for name, path in json.loads(zipped.stdout).items()})


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Build, Build]:
    if not SAM_PYTHON.exists():
        pytest.skip("the SAM CLI is not installed in .tools/sam (make sam-tools)")
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    first = _build(tmp_path_factory.mktemp("first"), umask=0o022)
    second = _build(tmp_path_factory.mktemp("second"), umask=0o077)
    return first, second


def _top_level(files: dict[str, bytes], under: str = "") -> set[str]:
    return {path[len(under) :].split("/")[0] for path in files if path.startswith(under)}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_builds_in_two_folders_give_byte_identical_zips(builds: tuple[Build, Build]) -> None:
    first, second = builds
    assert set(first.zips) == set(second.zips) == {*LAYERS, *FUNCTIONS}
    for name in first.zips:
        if _digest(first.zips[name]) != _digest(second.zips[name]):
            a, b = first.contents[name], second.contents[name]
            differing = sorted(p for p in a.keys() | b.keys() if a.get(p) != b.get(p))
            pytest.fail(f"{name}: the zips differ (content: {differing[:10]}; else order/modes)")


def test_no_file_names_the_build_folder(builds: tuple[Build, Build]) -> None:
    for build in builds:
        folder = str(build.root).encode()
        for name, files in build.contents.items():
            leaking = [path for path, data in files.items() if folder in data]
            assert not leaking, f"{name}: {leaking[:10]}"


def test_pyc_files_name_the_deployed_paths(builds: tuple[Build, Build]) -> None:
    files = builds[0].contents
    if not any(path.endswith(".pyc") for path in files["ApiFunction"]):
        pytest.skip("no Python 3.13 to precompile with (LAMBDA_PYC_PYTHON): no .pyc files")
    api = files["ApiFunction"]["handlers/__pycache__/api.cpython-313.pyc"]
    assert b"/var/task/handlers/api.py" in api
    base = files["BaseLayer"]["python/pydantic/__pycache__/main.cpython-313.pyc"]
    assert b"/opt/python/pydantic/main.py" in base
    # every source file of our code has its .pyc, checked by hash (flags 0b01: unchecked)
    for name in FUNCTIONS:
        for path in files[name]:
            if path.endswith(".py"):
                folder, _, module = path.rpartition("/")
                pyc = files[name][f"{folder}/__pycache__/{module[:-3]}.cpython-313.pyc"]
                assert int.from_bytes(pyc[4:8], "little") == 0b01, path


def test_functions_hold_only_our_code(builds: tuple[Build, Build]) -> None:
    files = builds[0].contents
    for name in FUNCTIONS:
        assert "core/__init__.py" in files[name], name
        assert "handlers/__init__.py" in files[name], name
        handler_module = EXPECTED_HANDLERS[name].rpartition(".")[0]
        assert f"{handler_module.replace('.', '/')}.py" in files[name], name
        expected = {"core", "handlers", "db"} if name == "MigrateFunction" else {"core", "handlers"}
        # no third-party package, and never the local tooling
        assert _top_level(files[name]) == expected, name
    sources = {
        p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src" / "core").rglob("*.py")
    }
    assert sources <= set(files["ApiFunction"]), "every module of src/core ships"


def test_only_the_migrate_function_carries_the_migrations(builds: tuple[Build, Build]) -> None:
    files = builds[0].contents
    migrations = sorted(p.name for p in (ROOT / "db" / "migrations").glob("*.sql"))
    assert migrations
    shipped = sorted(
        p.removeprefix("db/migrations/") for p in files["MigrateFunction"] if p.startswith("db/")
    )
    assert shipped == migrations
    for data in (files["MigrateFunction"][f"db/migrations/{m}"] for m in migrations[:1]):
        assert data == (ROOT / "db" / "migrations" / migrations[0]).read_bytes()


def test_layers_are_under_python_and_share_no_package(builds: tuple[Build, Build]) -> None:
    files = builds[0].contents
    for layer in LAYERS:
        assert _top_level(files[layer]) == {"python"}, layer
    base, matching = (_top_level(files[layer], "python/") - {"__pycache__"} for layer in LAYERS)
    assert {
        "psycopg",
        "psycopg_binary",
        "pydantic",
        "pydantic_core",
        "pydantic_settings",
        "aws_lambda_powertools",
        "aws_xray_sdk",
    } <= base
    assert {"numpy", "openai"} <= matching
    assert not base & matching, "a package in both layers"
    # the runtime's boto3 must keep its own botocore
    for layer in (base, matching):
        assert not layer & {"boto3", "botocore", "s3transfer"}


def test_redrive_migrate_and_rotation_load_no_numpy_and_no_openai(
    builds: tuple[Build, Build],
) -> None:
    files = builds[0].contents
    for name in ("RedriveFunction", "MigrateFunction", "RotateLoginFunction"):
        shipped = set(files[name])
        for layer in EXPECTED_LAYERS[name]:
            shipped |= {p.removeprefix("python/") for p in files[layer]}
        packages = {p.split("/")[0] for p in shipped}
        assert "numpy" not in packages and "openai" not in packages, name
        assert {"pydantic", "psycopg", "aws_lambda_powertools", "core", "handlers"} <= packages


def test_the_template_attaches_the_layers_the_artifacts_assume(
    builds: tuple[Build, Build],
) -> None:
    template = load_template((ROOT / "template.yaml").read_text(encoding="utf-8"))
    for name in FUNCTIONS:
        refs = template["Resources"][name]["Properties"]["Layers"]
        assert [ref["Ref"] for ref in refs] == list(EXPECTED_LAYERS[name])
        # Lambda's limit: function plus layers, unzipped
        size = builds[0].unzipped_size(name) + sum(
            builds[0].unzipped_size(layer) for layer in EXPECTED_LAYERS[name]
        )
        assert size <= LAMBDA_UNZIPPED_LIMIT, (name, size)

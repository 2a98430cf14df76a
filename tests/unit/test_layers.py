"""The layer rules of docs/architecture.md ("Who may import whom"), checked on the source.

Every module under src/ is parsed with `ast`; every import is recorded with its line and
how it runs: at import time ("module"), only when a function runs ("lazy"), or never at
run time (`if TYPE_CHECKING:`, "typing"). Layer rules count all three kinds, since even a
typing-only import ties one layer's code to another's; the rules about what a Lambda
loads at cold start (openai) count only module-level imports. A second set of tests runs
the real handlers in a fresh interpreter and looks at `sys.modules`.

Each checker is also run on small synthetic sources, so a checker that can never fail is
caught too.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"

Kind = Literal["module", "lazy", "typing"]


@dataclass(frozen=True)
class Import:
    path: str  # relative to src/, e.g. "core/matching/engine.py"
    importer: str  # dotted module name, e.g. "core.matching.engine"
    target: str  # dotted name imported, e.g. "core.data.repository"
    line: int
    kind: Kind

    def __str__(self) -> str:
        return f"src/{self.path}:{self.line}: {self.importer} imports {self.target} ({self.kind})"


def module_name(path: str) -> str:
    parts = path.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute name of `from <dots><module> import ...`."""
    if level == 0:
        return module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, module] if module else base)


def imports_in(source: str, path: str) -> list[Import]:
    """Every import of one module: `import`, `from ... import` (relative ones resolved)
    and `importlib.import_module("literal")`."""
    importer = module_name(path)
    is_package = path.endswith("__init__.py")
    found: list[Import] = []

    def record(target: str, line: int, kind: Kind) -> None:
        found.append(Import(path, importer, target, line, kind))

    def visit(node: ast.AST, kind: Kind) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                record(alias.name, node.lineno, kind)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(importer, is_package, node.level, node.module)
            record(base, node.lineno, kind)
            # `from core import data` imports the module core.data.
            for alias in node.names:
                record(f"{base}.{alias.name}", node.lineno, kind)
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "import_module")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            record(node.args[0].value, node.lineno, kind)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for statement in node.body:
                visit(statement, "typing")
            for statement in node.orelse:
                visit(statement, kind)
            return
        inner: Kind = kind
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            inner = "typing" if kind == "typing" else "lazy"
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(source, filename=path), "module")
    return found


def source_imports() -> list[Import]:
    found: list[Import] = []
    for file in sorted(SRC.rglob("*.py")):
        path = file.relative_to(SRC).as_posix()
        if path.split("/")[0] in {"core", "handlers", "tooling"}:
            found.extend(imports_in(file.read_text(encoding="utf-8"), path))
    return found


def within(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


# --- the rules: each takes every import and returns the ones that break it ------------

Rule = Callable[[list[Import]], list[Import]]


def forbidden(importers: tuple[str, ...], targets: tuple[str, ...]) -> Rule:
    def rule(imports: list[Import]) -> list[Import]:
        return [i for i in imports if within(i.importer, *importers) and within(i.target, *targets)]

    return rule


# Runtime code (core, handlers) never depends on local tooling; core never on handlers.
runtime_not_tooling = forbidden(("core", "handlers"), ("tooling",))
core_not_handlers = forbidden(("core",), ("handlers",))
# The engine is pure: it never reaches the database, the queue or the API.
matching_is_pure = forbidden(("core.matching",), ("core.data", "core.queue", "core.api", "psycopg"))
embedding_below_queue = forbidden(("core.embedding",), ("core.data", "core.queue", "core.api"))
data_at_the_bottom = forbidden(
    ("core.data",), ("core.matching", "core.queue", "core.api", "core.embedding")
)

MATCHING_MAY_IMPORT = (
    "core.matching",
    "core.models",
    "core.embedding.vectors",
    "core.embedding.text",
)


def matching_imports_only_allowed(imports: list[Import]) -> list[Import]:
    """Of the project's own modules, core.matching uses only these."""
    return [
        i
        for i in imports
        if within(i.importer, "core.matching")
        and within(i.target, "core", "handlers", "tooling")
        and i.target != "core"  # `from core import x` is judged by its core.x entry
        and not within(i.target, *MATCHING_MAY_IMPORT)
    ]


def api_loads_queue_lazily(imports: list[Import]) -> list[Import]:
    """core.api runs the worker only for the legacy synchronous trigger: importing it at
    module level would put numpy into every API cold start."""
    return [
        i
        for i in imports
        if within(i.importer, "core.api") and within(i.target, "core.queue") and i.kind == "module"
    ]


OPENAI_HOME = "core/embedding/openai_provider.py"


def openai_only_lazily(imports: list[Import]) -> list[Import]:
    """The openai SDK (and the module that imports it) is loaded only when an event uses
    it; a module-level import anywhere else would load it at every cold start."""
    return [
        i
        for i in imports
        if i.kind == "module"
        and i.path != OPENAI_HOME
        and within(i.target, "openai", "core.embedding.openai_provider")
    ]


RULES: dict[str, Rule] = {
    "core and handlers never import tooling": runtime_not_tooling,
    "core never imports handlers": core_not_handlers,
    "core.matching never imports core.data, core.queue, core.api or psycopg": matching_is_pure,
    "core.matching imports only core.models, core.embedding.vectors/text": (
        matching_imports_only_allowed
    ),
    "core.embedding never imports core.data, core.queue or core.api": embedding_below_queue,
    "core.data never imports core.matching, core.queue, core.api or core.embedding": (
        data_at_the_bottom
    ),
    "core.api imports core.queue only inside functions or for typing": api_loads_queue_lazily,
    "openai is imported at module level only by core.embedding.openai_provider": (
        openai_only_lazily
    ),
}


@pytest.fixture(scope="module")
def all_imports() -> list[Import]:
    return source_imports()


def test_the_source_is_parsed(all_imports: list[Import]) -> None:
    # Guards the rules below against passing on an empty or partial scan.
    importers = {i.importer for i in all_imports}
    for expected in (
        "core.matching.engine",
        "core.queue.worker",
        "core.data.repository",
        "core.embedding.selection",
        "core.api.service",
        "handlers.api",
        "tooling.cli",
    ):
        assert expected in importers
    lazy_worker = [
        i
        for i in all_imports
        if i.importer == "core.api.service" and i.target == "core.queue.worker"
    ]
    assert {i.kind for i in lazy_worker} <= {"lazy", "typing"}


@pytest.mark.parametrize("name", list(RULES))
def test_layer_rule(name: str, all_imports: list[Import]) -> None:
    violations = RULES[name](all_imports)
    assert not violations, f"{name}:\n" + "\n".join(str(v) for v in violations)


# --- the checker on synthetic sources: each rule can fail ---------------------------------


def violations_of(rule: Rule, source: str, path: str) -> list[str]:
    return [str(v) for v in rule(imports_in(source, path))]


@pytest.mark.parametrize(
    ("rule", "path", "source"),
    [
        (runtime_not_tooling, "core/api/service.py", "import tooling.cli\n"),
        (runtime_not_tooling, "handlers/api.py", "def f():\n    from tooling import oracle\n"),
        (core_not_handlers, "core/aws.py", "from handlers import api\n"),
        (matching_is_pure, "core/matching/engine.py", "import psycopg\n"),
        (matching_is_pure, "core/matching/x.py", "from core.data.repository import Conn\n"),
        (matching_is_pure, "core/matching/x.py", "def f():\n    import core.queue.worker\n"),
        (
            matching_is_pure,
            "core/matching/x.py",
            "if TYPE_CHECKING:\n    from core.api import service\n",
        ),
        (matching_is_pure, "core/matching/x.py", "from ..data import repository\n"),
        (matching_imports_only_allowed, "core/matching/x.py", "from core import settings\n"),
        (
            matching_imports_only_allowed,
            "core/matching/x.py",
            "from core.embedding.local import LocalEmbedder\n",
        ),
        (embedding_below_queue, "core/embedding/local.py", "from core.queue import loader\n"),
        (data_at_the_bottom, "core/data/repository.py", "from core.matching import scoring\n"),
        (
            data_at_the_bottom,
            "core/data/x.py",
            "import importlib\nimportlib.import_module('core.embedding.vectors')\n",
        ),
        (api_loads_queue_lazily, "core/api/service.py", "from core.queue.worker import run\n"),
        (openai_only_lazily, "core/queue/icebreakers.py", "import openai\n"),
        (openai_only_lazily, "tooling/bench.py", "from openai import OpenAI\n"),
        (
            openai_only_lazily,
            "core/embedding/selection.py",
            "from core.embedding.openai_provider import OpenAIEmbedder\n",
        ),
        (openai_only_lazily, "core/x.py", "class A:\n    import openai\n"),
    ],
)
def test_checker_flags_a_violation_with_file_and_line(rule: Rule, path: str, source: str) -> None:
    found = violations_of(rule, source, path)
    assert found
    last_line = len(source.splitlines())
    assert all(v.startswith(f"src/{path}:{last_line}:") for v in found), found


@pytest.mark.parametrize(
    ("rule", "path", "source"),
    [
        (runtime_not_tooling, "tooling/cli.py", "import tooling.oracle\nimport handlers.api\n"),
        (matching_is_pure, "core/matching/x.py", "from core.models import EventRecord\n"),
        (
            matching_imports_only_allowed,
            "core/matching/x.py",
            "from core.embedding.text import phrase_key\nfrom core.matching import scoring\n",
        ),
        (data_at_the_bottom, "core/data/x.py", "from core.models import Profile\n"),
        (
            api_loads_queue_lazily,
            "core/api/service.py",
            "if TYPE_CHECKING:\n    from core.queue.worker import R\n"
            "def f():\n    from core.queue.worker import run\n",
        ),
        (
            openai_only_lazily,
            "core/embedding/selection.py",
            "if TYPE_CHECKING:\n    import openai\n"
            "def f():\n    import openai\n    from core.embedding.openai_provider import E\n",
        ),
        (openai_only_lazily, OPENAI_HOME, "import openai\n"),
    ],
)
def test_checker_allows_what_the_rules_allow(rule: Rule, path: str, source: str) -> None:
    assert violations_of(rule, source, path) == []


def test_else_of_type_checking_runs_at_import_time() -> None:
    source = "if TYPE_CHECKING:\n    pass\nelse:\n    import openai\n"
    assert violations_of(openai_only_lazily, source, "core/x.py")


# --- what each handler loads at cold start ------------------------------------------------


def run_fresh(code: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter that imports this checkout's src/; it must exit 0."""
    env = {**os.environ, **extra_env}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result


def loaded_after_import(module: str) -> tuple[bool, bool]:
    """(numpy loaded, openai loaded) after importing `module` in a fresh interpreter."""
    result = run_fresh(
        f"import {module}, sys; print('numpy' in sys.modules, 'openai' in sys.modules)"
    )
    numpy_loaded, openai_loaded = result.stdout.split()
    return numpy_loaded == "True", openai_loaded == "True"


def test_probe_sees_what_is_loaded() -> None:
    assert loaded_after_import("json") == (False, False)
    assert loaded_after_import("numpy") == (True, False)


@pytest.mark.parametrize("handler", ["handlers.api", "handlers.migrate", "handlers.redrive"])
def test_light_handlers_load_neither_numpy_nor_openai(handler: str) -> None:
    assert loaded_after_import(handler) == (False, False)


def test_matchmaker_handler_does_not_load_openai() -> None:
    _, openai_loaded = loaded_after_import("handlers.matchmaker")
    assert not openai_loaded


def modules_loaded_after_import(module: str, names: list[str]) -> list[str]:
    """Which of `names` are in sys.modules after importing `module` in a fresh interpreter."""
    result = run_fresh(f"import {module}, sys; print(*[n for n in {names!r} if n in sys.modules])")
    return result.stdout.split()


BOTO3 = ["boto3", "s3transfer", "aws_lambda_powertools.utilities.parameters"]


def test_boto3_probe_sees_what_is_loaded() -> None:
    assert modules_loaded_after_import("json", BOTO3) == []
    assert modules_loaded_after_import("boto3", BOTO3) == ["boto3", "s3transfer"]


@pytest.mark.parametrize(
    "handler", ["handlers.api", "handlers.migrate", "handlers.redrive", "handlers.matchmaker"]
)
def test_handlers_load_botocore_but_not_boto3(handler: str) -> None:
    """core.aws uses botocore directly: boto3 would add 30 to 55 ms to a cold start
    (s3transfer, multiprocessing), and so would Powertools Parameters (it imports boto3);
    the worker reads the OpenAI key through core.aws too."""
    assert modules_loaded_after_import(handler, ["botocore", *BOTO3]) == ["botocore"]


# What the API's cold start leaves to the code that needs it (docs/performance.md, "Cold
# starts: what no request needs"): Powertools' OpenAPI document models serve only
# handlers.api.openapi_document(), never a request.
API_DEFERRED = ["aws_lambda_powertools.event_handler.openapi.models"]


def test_deferred_probe_sees_what_is_loaded() -> None:
    assert modules_loaded_after_import(API_DEFERRED[0], API_DEFERRED) == API_DEFERRED


def test_api_handler_imports_no_openapi_document_models() -> None:
    assert modules_loaded_after_import("handlers.api", API_DEFERRED) == []


VALIDATED_REQUEST = """
import json, sys
import handlers.api

class Context:
    function_name = "matchmaker-ApiFunction"
    memory_limit_in_mb = 512
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:matchmaker-ApiFunction"
    aws_request_id = "req-1"

event = json.load(open("events/api/create_event.json"))
event["body"] = json.dumps({"code": "techconf-2026", "settings": {"k": "many"}})
answer = handlers.api.lambda_handler(event, Context())
print(answer["statusCode"], *[n for n in NAMES if n in sys.modules])
"""


def test_a_validated_request_needs_no_openapi_document_models() -> None:
    """The resolver validates a body (here: 422) with the routes' annotations alone: the
    models deferred at import are not loaded by serving a request either."""
    result = run_fresh(
        f"NAMES = {API_DEFERRED!r}\n{VALIDATED_REQUEST}", POWERTOOLS_METRICS_DISABLED="true"
    )
    assert result.stdout.split()[-1:] == ["422"], result.stdout


MODELS_BUILT = """
import inspect, sys
import pydantic
import handlers.api
import core.api.schemas, core.models
print(*sorted(
    name
    for module in (core.api.schemas, core.models)
    for name, model in vars(module).items()
    if inspect.isclass(model) and issubclass(model, pydantic.BaseModel)
    and model.__module__ == module.__name__ and model.__pydantic_complete__
))
"""


def test_api_handler_builds_no_request_or_response_model_at_import() -> None:
    """Models are DeferredModel (defer_build): pydantic builds a route's models on its first
    request, not all of them at every cold start."""
    result = run_fresh(MODELS_BUILT)
    assert result.stdout.split() == []

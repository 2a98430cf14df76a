"""The built Lambda functions, run without Docker: a stand-in for `sam local invoke`.

`make test` runs `sam build` before pytest, so .aws-sam/build/<Function> holds what would be
deployed. Each test runs one function's artifact in an isolated Python 3.13 (`-I -S`: no
site-packages, no user environment) whose sys.path holds only the standard library, the
artifact, the function's layers (from template.yaml) and boto3/botocore/s3transfer (what the
Lambda runtime provides). A dependency the artifact lacks fails here as it would in Lambda.

The environment is built the way `sam local invoke --env-vars events/local-env.json` builds
it: the template's variables (parameter defaults for !Ref, blank for what only AWS can
resolve), the overrides of events/local-env.json, and the AWS_* variables SAM sets. Only
what points at the developer's machine is replaced: DATABASE_URL (a migrated test
database), AWS_ENDPOINT_URL and the dead-letter queue (a moto server) and /var/task (the
artifact directory).
"""

from __future__ import annotations

import copy
import glob
import importlib.metadata
import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import boto3
import psycopg
import pytest
from moto.server import ThreadedMotoServer

from tests.integration.api_support import ADA, CODE, request
from tests.unit.test_template import environment, function_property, functions, load_template

ROOT = Path(__file__).resolve().parents[2]
BUILD_DIR = ROOT / ".aws-sam" / "build"
EVENTS = ROOT / "events"
LOCAL_ENV = EVENTS / "local-env.json"
REGION = "us-east-1"
ACCOUNT = "123456789012"
DEAD_LETTER_QUEUE = "matchmaker-dead-letters"
# The stack's physical name of a function (what AWS_LAMBDA_FUNCTION_NAME holds in Lambda).
STACK = "matchmaker"
RUN_TIMEOUT_S = 120  # per interpreter; a whole run takes a few seconds

DRIVER = '''
"""Runs one Lambda handler like the python3.13 runtime would, once per event (one warm
container), and writes the results as JSON. Usage: driver.py <spec.json>."""
import importlib, json, sys, sysconfig, time, traceback, uuid

spec = json.load(open(sys.argv[1]))
sys.path[:0] = spec["path"]


class LambdaContext:
    def __init__(self, name, memory_mb, timeout_s):
        self.function_name = name
        self.function_version = "$LATEST"
        self.memory_limit_in_mb = memory_mb
        self.invoked_function_arn = (
            f"arn:aws:lambda:{spec['region']}:{spec['account']}:function:{name}"
        )
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{name}"
        self.log_stream_name = "$LATEST"
        self._deadline = time.monotonic() + timeout_s

    def get_remaining_time_in_millis(self):
        return max(0, int((self._deadline - time.monotonic()) * 1000))


module_name, _, attribute = spec["handler"].rpartition(".")
handler = getattr(importlib.import_module(module_name), attribute)
results = []
for event in spec["events"]:
    context = LambdaContext(spec["name"], spec["memory_mb"], spec["timeout_s"])
    try:
        results.append({"ok": True, "result": handler(event, context)})
    except Exception as exc:  # Lambda answers an unhandled error with its type and message
        results.append({"ok": False, "errorType": type(exc).__name__,
                        "errorMessage": str(exc), "trace": traceback.format_exc()})
modules = sorted({getattr(m, "__file__", None) or "" for m in list(sys.modules.values())} - {""})
with open(spec["out"], "w") as out:
    json.dump({"results": results, "modules": modules,
               "stdlib": [sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")],
               "flags": [sys.flags.isolated, sys.flags.no_site]}, out, default=str)
'''


# --- the interpreter, the runtime's SDK, the template -------------------------------------


def lambda_python() -> str | None:
    """A Python 3.13 (not free-threaded), found like mk/lambda.mk's LAMBDA_PYC_PYTHON."""
    found = sorted(glob.glob(str(Path.home() / ".pyenv/versions/3.13*/bin/python3.13")))
    candidates = [found[-1]] if found else []
    candidates += [p for p in [shutil.which("python3.13")] if p]
    check = (
        "import sys, sysconfig; sys.exit(sys.version_info[:2] != (3, 13)"
        " or bool(sysconfig.get_config_var('Py_GIL_DISABLED')))"
    )
    usable = [
        c for c in candidates if subprocess.run([c, "-c", check], check=False).returncode == 0
    ]
    return usable[0] if usable else None


@pytest.fixture(scope="session")
def python313() -> str:
    python = lambda_python()
    if python is None:
        pytest.skip(
            "NO PYTHON 3.13: the built Lambda functions (cp313 wheels) were NOT run. Install "
            "one (pyenv install 3.13) to run this Docker-free stand-in for sam local invoke."
        )
    return python


@pytest.fixture(scope="session")
def runtime_sdk(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """boto3, botocore and s3transfer (and their dependencies): what the python3.13 runtime
    provides and the artifact leaves out. Pure Python, installed once and cached; the
    version the project's own environment has."""
    version = importlib.metadata.version("boto3")
    cache_root = getattr(request.config, "cache", None)
    base = (
        cache_root.mkdir("lambda-runtime-sdk")
        if cache_root is not None
        else tmp_path_factory.mktemp("lambda-runtime-sdk")
    )
    target = Path(base) / f"boto3-{version}"
    if not (target / ".complete").exists():
        shutil.rmtree(target, ignore_errors=True)
        install = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--no-compile", "--target", str(target), f"boto3=={version}"],
            check=False, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if install.returncode != 0:
            pytest.fail(f"cannot install boto3=={version} for the runtime:\n{install.stderr}")
        (target / ".complete").touch()
    return target


@cache
def template() -> dict[str, Any]:
    return load_template((ROOT / "template.yaml").read_text(encoding="utf-8"))


def layer_dirs(function: str) -> list[Path]:
    """The python/ folder of every layer the function lists (`sam build` puts a layer's
    content at .aws-sam/build/<LayerLogicalId>/python)."""
    layers = function_property(template(), function, "Layers") or []
    dirs = []
    for layer in layers:
        assert isinstance(layer, dict) and set(layer) == {"Ref"}, f"{function}: layer {layer!r}"
        path = BUILD_DIR / str(layer["Ref"]) / "python"
        if not path.is_dir():
            pytest.fail(f"{path} is missing: run `make sam-build` (layer of {function})")
        dirs.append(path)
    return dirs


def artifact(function: str) -> Path:
    """.aws-sam/build/<function>, built from the current src/core and src/handlers (in the
    function or in one of its layers)."""
    path = BUILD_DIR / function
    if not path.is_dir():
        pytest.fail(f"{path} is missing: run `make sam-build` first (make test does)")
    roots = [path, *layer_dirs(function)]
    stale = []
    for package in ("core", "handlers"):
        for source in (ROOT / "src" / package).rglob("*.py"):
            relative = source.relative_to(ROOT / "src")
            built = [root / relative for root in roots if (root / relative).is_file()]
            if not built or built[0].read_bytes() != source.read_bytes():
                stale.append(str(relative))
    if stale:
        pytest.fail(f"{path} is older than src ({', '.join(stale[:5])}): run `make sam-build`")
    return path


# --- the environment ------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalAws:
    endpoint: str
    dead_letter_queue_url: str

    def sqs(self) -> Any:
        return boto3.client(
            "sqs",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )


@pytest.fixture(scope="module")
def local_aws() -> Iterator[LocalAws]:
    """A moto server on a free port (what moto_server or LocalStack is for sam local
    invoke), with the dead-letter queue."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    queue_url = LocalAws(endpoint, "").sqs().create_queue(QueueName=DEAD_LETTER_QUEUE)["QueueUrl"]
    yield LocalAws(endpoint, queue_url)
    server.stop()


def local_env_file() -> dict[str, dict[str, str]]:
    env: dict[str, dict[str, str]] = json.loads(LOCAL_ENV.read_text())
    return env


def template_value(value: Any, local_refs: dict[str, str]) -> str:
    """An environment value as sam local invoke resolves it (parameter defaults, conditions,
    the resources we run locally); blank for what only AWS knows (a secret ARN, an endpoint)."""
    resolved = _resolve(value, local_refs)
    return "" if resolved is None or isinstance(resolved, dict | list) else str(resolved)


def _resolve(value: Any, local_refs: dict[str, str]) -> Any:
    if not isinstance(value, dict) or len(value) != 1:
        return value
    ((function, argument),) = value.items()
    if function == "Ref":
        parameter = template()["Parameters"].get(argument)
        return parameter.get("Default") if parameter is not None else local_refs.get(argument)
    if function == "Fn::If":
        condition, when_true, when_false = argument
        chosen = when_true if _condition(condition) else when_false
        return _resolve(chosen, local_refs)
    return None


def _condition(name: str) -> bool:
    return _truth(template()["Conditions"][name])


def _truth(expression: Any) -> bool:
    ((function, argument),) = expression.items()
    if function == "Condition":
        return _condition(argument)
    if function == "Fn::Equals":
        left, right = (str(_resolve(a, {})) for a in argument)
        return left == right
    if function == "Fn::Not":
        return not _truth(argument[0])
    if function == "Fn::And":
        return all(_truth(a) for a in argument)
    if function == "Fn::Or":
        return any(_truth(a) for a in argument)
    raise AssertionError(f"unknown condition function {function}")


def function_env(function: str, database_url: str, aws: LocalAws, code_dir: Path) -> dict[str, str]:
    function_name = f"{STACK}-{function}"
    local_refs = {
        "DeadLetterQueue": aws.dead_letter_queue_url,
        "MatchmakerFunction": f"{STACK}-MatchmakerFunction",
    }
    env = {
        name: template_value(value, local_refs)
        for name, value in environment(template(), function).items()
    }
    overrides = local_env_file()
    env.update(overrides.get("Parameters", {}))
    env.update(overrides.get(function, {}))
    # What events/local-env.json points at the developer's machine, pointed at this test's.
    env["DATABASE_URL"] = database_url
    env["AWS_ENDPOINT_URL"] = aws.endpoint
    if "DEAD_LETTER_QUEUE_URL" in env:
        env["DEAD_LETTER_QUEUE_URL"] = aws.dead_letter_queue_url
    env = {
        name: str(code_dir) + value.removeprefix("/var/task")
        if value.startswith("/var/task/")
        else value
        for name, value in env.items()
    }
    # The variables SAM sets in every local container (samcli.local.lambdafn.env_vars).
    env.update(
        {
            "AWS_SAM_LOCAL": "true",
            "AWS_LAMBDA_FUNCTION_NAME": function_name,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(memory_mb(function)),
            "AWS_LAMBDA_FUNCTION_TIMEOUT": str(timeout_s(function)),
            "AWS_LAMBDA_FUNCTION_HANDLER": str(function_property(template(), function, "Handler")),
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_ACCOUNT_ID": ACCOUNT,
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
        }
    )
    return env


def memory_mb(function: str) -> int:
    value = function_property(template(), function, "MemorySize")
    return int(template_value(value, {}) or 128)


def timeout_s(function: str) -> int:
    return int(template_value(function_property(template(), function, "Timeout"), {}) or 3)


# --- running a function -----------------------------------------------------------------------


@dataclass
class Run:
    results: list[dict[str, Any]]
    modules: list[str]
    stdlib: list[str]
    flags: list[int]

    def answers(self) -> list[Any]:
        """Every invocation's return value; an unhandled error fails the test."""
        for result in self.results:
            assert result["ok"], (
                f"{result['errorType']}: {result['errorMessage']}\n{result['trace']}"
            )
        return [result["result"] for result in self.results]


def run_function(
    python: str,
    sdk: Path,
    function: str,
    events: list[dict[str, Any]],
    *,
    database_url: str,
    aws: LocalAws,
    workdir: Path,
    code_dir: Path | None = None,
) -> Run:
    """Invoke the built function once per event in one isolated interpreter."""
    code = code_dir or artifact(function)
    path = [code, *layer_dirs(function), sdk]
    handler = function_property(template(), function, "Handler")
    driver = workdir / "driver.py"
    driver.write_text(DRIVER)
    spec_file = workdir / f"{function}-{uuid.uuid4().hex[:8]}.json"
    out = spec_file.with_suffix(".out.json")
    spec = {
        "path": [str(p) for p in path],
        "handler": handler,
        "name": f"{STACK}-{function}",
        "memory_mb": memory_mb(function),
        "timeout_s": timeout_s(function),
        "region": REGION,
        "account": ACCOUNT,
        "events": events,
        "out": str(out),
    }
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.run(
        [python, "-I", "-S", str(driver), str(spec_file)],
        check=False,
        env=function_env(function, database_url, aws, code),
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    if proc.returncode != 0 or not out.exists():
        pytest.fail(
            f"{function} did not run (exit {proc.returncode}):\n{proc.stderr[-4000:]}\n"
            f"--- stdout ---\n{proc.stdout[-2000:]}"
        )
    run = Run(**json.loads(out.read_text()))
    assert run.flags == [1, 1], "the function must run in an isolated interpreter (-I -S)"
    allowed = tuple(f"{p}/" for p in path)
    stdlib = tuple(f"{p}/" for p in run.stdlib)
    outside = [
        module
        for module in run.modules
        if module != str(driver)
        and not module.startswith(allowed)
        and (not module.startswith(stdlib) or "/site-packages/" in module)
    ]
    assert not outside, f"{function} imported code from outside its artifact: {outside[:5]}"
    return run


def event_file(path: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((EVENTS / path).read_text())
    return event


def attendee(user_id: str, name: str, company: str, interests: list[str]) -> dict[str, Any]:
    """put_attendee.json for another attendee."""
    return request(
        "put_attendee",
        user_id=user_id,
        body={"name": name, "company": company, "title": "Engineer", "interests": interests},
    )


@pytest.fixture
def run(python313: str, runtime_sdk: Path, db_url: str, local_aws: LocalAws, tmp_path: Path) -> Any:
    def invoke(function: str, events: list[dict[str, Any]]) -> Run:
        return run_function(
            python313,
            runtime_sdk,
            function,
            events,
            database_url=db_url,
            aws=local_aws,
            workdir=tmp_path,
        )

    return invoke


# --- the functions ------------------------------------------------------------------------


def test_local_env_names_only_functions_of_the_template() -> None:
    names = set(local_env_file()) - {"Parameters"}
    assert names == set(functions(template()))


def test_local_env_overrides_only_variables_the_template_declares() -> None:
    """sam local invoke drops an --env-vars variable the function does not declare
    (samcli.local.lambdafn.env_vars): DATABASE_URL would silently not arrive."""
    overrides = local_env_file()
    undeclared = sorted(
        f"{function}.{variable}"
        for function in functions(template())
        # "Parameters" are meant for every function
        for variable in {*overrides.get("Parameters", {}), *overrides.get(function, {})}
        if variable not in environment(template(), function)
    )
    assert not undeclared, f"sam local invoke would drop {undeclared}"


def test_api_function_answers_the_committed_requests(run: Any, local_aws: LocalAws) -> None:
    no_auth = sorted((EVENTS / "api").glob("*_no_auth.json"))
    assert len(no_auth) >= 10
    local_aws.sqs().send_message(QueueUrl=local_aws.dead_letter_queue_url, MessageBody="{}")
    cases: list[tuple[str, dict[str, Any], int]] = [
        *[(path.name, event_file(f"api/{path.name}"), 401) for path in no_auth],
        ("get_event (before create)", event_file("api/get_event.json"), 404),
        ("create_event", event_file("api/create_event.json"), 201),
        ("create_event (again)", event_file("api/create_event.json"), 200),
        ("put_attendee", event_file("api/put_attendee.json"), 200),
        ("get_event", event_file("api/get_event.json"), 200),
        ("get_matches", event_file("api/get_matches.json"), 200),
        ("admin_status_service_token", event_file("api/admin_status_service_token.json"), 403),
        ("admin_status", event_file("api/admin_status.json"), 200),
        ("trigger_queue", event_file("api/trigger_queue.json"), 202),
    ]
    answers = run("ApiFunction", [event for _, event, _ in cases]).answers()

    statuses = {
        name: answer["statusCode"] for (name, _, _), answer in zip(cases, answers, strict=True)
    }
    assert statuses == {name: status for name, _, status in cases}
    body = {
        name: json.loads(answer["body"] or "null")
        for (name, _, _), answer in zip(cases, answers, strict=True)
    }
    assert body["get_event"]["code"] == CODE
    assert body["put_attendee"] == {"event": CODE, "user_id": ADA, "status": "joined"}
    assert body["get_matches"]["matches"] == []
    # read through AWS_ENDPOINT_URL from the moto server
    assert body["admin_status"]["dead_letter_queue"] == {"scope": "all events", "depth": 1}
    assert body["admin_status"]["coverage"]["active"] == 1
    assert body["trigger_queue"]["mode"] == "queue"


def test_matchmaker_function_matches_queued_attendees(run: Any, db_url: str) -> None:
    people = [
        attendee("u-10000001", "Grace Okafor", "Contoso", ["machine learning", "postgresql"]),
        attendee("u-10000002", "Linus Berg", "Fabrikam", ["stream processing", "kafka"]),
        attendee("u-10000003", "Mina Sato", "Tailspin", ["python", "recommender systems"]),
    ]
    setup = run(
        "ApiFunction",
        [event_file("api/create_event.json"), event_file("api/put_attendee.json"), *people],
    ).answers()
    assert [answer["statusCode"] for answer in setup] == [201, 200, 200, 200, 200]

    scheduled, triggered, woken = run(
        "MatchmakerFunction",
        [
            event_file("matchmaker/scheduled.json"),
            event_file("matchmaker/trigger.json"),
            event_file("matchmaker/wake_batch.json"),
        ],
    ).answers()

    assert scheduled["source"] == "schedule"
    assert scheduled["completed"] == 4
    assert (scheduled["failed"], scheduled["dead"]) == (0, 0)
    assert triggered["source"] == "trigger"
    assert triggered["completed"] == 0  # nothing left in the queue
    # the wake queue's SQS batch: two events named (one of them twice), nothing left to do
    assert (woken["source"], woken["woken_for"], woken["completed"]) == ("wake", 2, 0)
    with psycopg.connect(db_url) as conn:
        matched = conn.execute(
            "SELECT count(*) FROM user_matches m JOIN profiles p ON p.id = m.profile_id"
            " WHERE p.user_id = %s",
            (ADA,),
        ).fetchone()
    assert matched is not None and matched[0] == 3  # k = 3 in create_event.json


def test_redrive_function_answers_a_partial_batch_response(run: Any) -> None:
    committed = event_file("redrive/sqs_batch.json")
    broken = copy.deepcopy(committed)
    broken["Records"][1]["body"] = "not a dead letter"

    answers = run("RedriveFunction", [committed, broken]).answers()

    # users that are not dead are left alone (idempotent redrive): nothing failed
    assert answers[0] == {"batchItemFailures": []}
    assert answers[1] == {
        "batchItemFailures": [{"itemIdentifier": broken["Records"][1]["messageId"]}]
    }


def test_migrate_function_migrates_and_answers_without_a_response_url(
    python313: str, runtime_sdk: Path, empty_db_url: str, local_aws: LocalAws, tmp_path: Path
) -> None:
    events = [event_file(f"migrate/{name}.json") for name in ("create", "update", "delete")]
    # no ResponseURL: the handler returns its answer instead of PUTting it to S3
    assert not any("ResponseURL" in event for event in events)

    run = run_function(
        python313,
        runtime_sdk,
        "MigrateFunction",
        events,
        database_url=empty_db_url,
        aws=local_aws,
        workdir=tmp_path,
    )

    created, updated, deleted = run.answers()
    migrations = len(list((ROOT / "db" / "migrations").glob("*.sql")))
    assert (created["Status"], created["Data"]["Applied"]) == ("SUCCESS", migrations)
    assert created["RequestId"] == events[0]["RequestId"]
    assert (updated["Status"], updated["Data"]["Applied"]) == ("SUCCESS", 0)
    assert (deleted["Status"], deleted["Data"]) == ("SUCCESS", {})
    with psycopg.connect(empty_db_url) as conn:
        found = conn.execute(
            "SELECT to_regclass('public.matchmaking_queue') IS NOT NULL"
        ).fetchone()
    assert found == (True,)

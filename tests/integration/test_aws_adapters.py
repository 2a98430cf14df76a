"""core.aws on botocore (no boto3): the clients against moto, the secret cache, the
database credentials read from Secrets Manager, and X-Ray subsegments for the AWS calls."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws
from moto.server import ThreadedMotoServer
from psycopg.conninfo import conninfo_to_dict

import core.aws
import core.settings
from core.data.connections import DatabaseUnavailableError, connect, resolve_database_url
from core.settings import Settings
from tests.integration.api_support import AWS_ENV

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """moto for every botocore client, and a fresh session, clients and secret cache."""
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    core.aws.reset_clients()
    with mock_aws():
        yield
    core.aws.reset_clients()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def count_secret_reads() -> list[str]:
    """The SecretId of every GetSecretValue the shared client sends."""
    reads: list[str] = []

    def before(params: dict[str, Any], **_: Any) -> None:
        reads.append(params["SecretId"])

    core.aws.secrets_client().meta.events.register(
        "provide-client-params.secrets-manager.GetSecretValue", before
    )
    return reads


def test_clients_are_botocore_clients_that_moto_serves(aws: None) -> None:
    queue_url = core.aws.sqs_client().create_queue(QueueName="dead-letters")["QueueUrl"]
    core.aws.sqs_client().send_message(QueueUrl=queue_url, MessageBody="{}")

    assert core.aws.queue_depth(queue_url) == 1
    assert core.aws.sqs_client() is core.aws.sqs_client()  # reused across invocations
    assert type(core.aws.sqs_client()).__module__ == "botocore.client"
    # one session for every client: service models and endpoints are loaded once
    assert core.aws.lambda_client()._loader is core.aws.sqs_client()._loader


def test_a_secret_is_read_once_and_again_after_max_age(aws: None) -> None:
    arn = boto3.client("secretsmanager").create_secret(Name="db", SecretString='{"v": 1}')["ARN"]
    clock = Clock()
    cache = core.aws.SecretCache(max_age_s=300, clock=clock)
    reads = count_secret_reads()

    assert cache.get_json(arn) == {"v": 1}
    boto3.client("secretsmanager").put_secret_value(SecretId=arn, SecretString='{"v": 2}')
    clock.now += 299
    assert cache.get_json(arn) == {"v": 1}  # still fresh: no second call
    assert reads == [arn]

    clock.now += 1
    assert cache.get_json(arn) == {"v": 2}  # rotated value picked up without a cold start
    assert reads == [arn, arn]

    cache.invalidate(arn)
    assert cache.get_json(arn) == {"v": 2}
    assert reads == [arn, arn, arn]


def test_a_binary_secret_is_decoded(aws: None) -> None:
    payload = b'{"username": "u", "password": "p"}'
    arn = boto3.client("secretsmanager").create_secret(Name="bin", SecretBinary=payload)["ARN"]
    assert core.aws.SecretCache().get_json(arn) == {"username": "u", "password": "p"}


def test_a_missing_secret_raises_the_client_error(aws: None) -> None:
    with pytest.raises(ClientError, match="ResourceNotFoundException"):
        core.aws.SecretCache().get("arn:aws:secretsmanager:us-east-1:123456789012:secret:nope")


def stack_settings(db_url: str, secret_arn: str) -> Settings:
    params = conninfo_to_dict(db_url)
    return Settings(
        db_secret_arn=secret_arn,
        db_host=str(params["host"]),
        db_port=int(params.get("port") or 5432),
        db_name=str(params["dbname"]),
        aws_lambda_function_name="matchmaker-ApiFunction",
    )


def test_a_deployed_function_connects_with_the_secret_read_once(aws: None, db_url: str) -> None:
    user = str(conninfo_to_dict(db_url).get("user", "postgres"))
    arn = boto3.client("secretsmanager").create_secret(
        Name="matchmaker/db", SecretString=json.dumps({"username": user, "password": "x"})
    )["ARN"]
    settings = stack_settings(db_url, arn)
    reads = count_secret_reads()

    url = resolve_database_url(settings)
    with connect(url, settings) as conn:
        row = conn.execute("SELECT current_user, current_database()").fetchone()
    assert row == (user, settings.db_name)
    assert conninfo_to_dict(resolve_database_url(settings))["password"] == "x"
    assert reads == [arn]  # the second resolve came from the cache


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        (None, "cannot read the database secret"),
        ("not json", "the database secret is not JSON"),
        ('{"username": "u"}', "the database secret has no username/password"),
    ],
)
def test_an_unusable_secret_is_a_database_unavailable_error(
    aws: None, db_url: str, secret: str | None, message: str
) -> None:
    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:missing-AbCdEf"
    if secret is not None:
        arn = boto3.client("secretsmanager").create_secret(Name="s", SecretString=secret)["ARN"]
    with pytest.raises(DatabaseUnavailableError, match=message):
        resolve_database_url(stack_settings(db_url, arn))


# --- tracing: the subsegments a deployed function sends to the X-Ray daemon ----------------

TRACED = """
import json, sys
from core import aws
from core.data.connections import connect
from core.observability import tracer
from core.settings import get_settings

@tracer.capture_method
def work():
    aws.sqs_client().get_queue_attributes(QueueUrl=sys.argv[1], AttributeNames=["All"])
    aws.secrets.get(sys.argv[2])
    conn = connect(sys.argv[3], get_settings())  # kept, as ConnectionCache does
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
    conn.close()

work()
import aws_xray_sdk.core.patcher as patcher
print(json.dumps(sorted(patcher._PATCHED_MODULES)))
"""


@pytest.fixture
def moto_server() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def subsegments(datagrams: list[bytes]) -> list[dict[str, Any]]:
    """The UDP emitter sends a header line, then one (sub)segment document, per datagram."""
    found = []
    for datagram in datagrams:
        _, document = datagram.decode().split("\n", 1)
        found.append(json.loads(document))
    return found


def test_a_deployed_function_traces_aws_calls_and_queries(moto_server: str, db_url: str) -> None:
    endpoint = {"endpoint_url": moto_server, "region_name": "us-east-1"}
    credentials = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    queue_url = boto3.client("sqs", **endpoint, **credentials).create_queue(QueueName="q")[
        "QueueUrl"
    ]
    arn = boto3.client("secretsmanager", **endpoint, **credentials).create_secret(
        Name="t", SecretString="s"
    )["ARN"]
    daemon = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    daemon.bind(("127.0.0.1", 0))
    daemon.settimeout(10)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AWS_", "POWERTOOLS_", "DATABASE_URL", "DB_", "LAMBDA_"))
    }
    env.update(
        {
            # what the Lambda runtime sets: the X-Ray SDK then traces into Lambda's segment
            "LAMBDA_TASK_ROOT": str(ROOT / "src"),
            "AWS_LAMBDA_FUNCTION_NAME": "matchmaker-ApiFunction",
            "_X_AMZN_TRACE_ID": "Root=1-69b30e20-2bcb342fabbfc41682d5215d;"
            "Parent=53995c3f42cd8ad8;Sampled=1",
            "AWS_XRAY_DAEMON_ADDRESS": f"127.0.0.1:{daemon.getsockname()[1]}",
            "AWS_ENDPOINT_URL": moto_server,
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        }
    )
    run = subprocess.run(
        [sys.executable, "-c", TRACED, queue_url, arn, db_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1]) == ["botocore"]  # not patch_all

    datagrams = []
    try:
        while len(datagrams) < 4:  # two AWS calls, the query, the method
            datagrams.append(daemon.recv(65536))
    except TimeoutError:
        pass
    finally:
        daemon.close()
    sent = subsegments(datagrams)
    aws_calls = {(s["name"], s["aws"]["operation"]) for s in sent if s.get("namespace") == "aws"}
    assert aws_calls == {("sqs", "GetQueueAttributes"), ("secretsmanager", "GetSecretValue")}
    queries = [s for s in sent if "sql" in s]
    assert len(queries) == 1 and queries[0]["sql"]["database_type"] == "PostgreSQL"
    assert "## __main__.work" in {s["name"] for s in sent}  # the capture_method subsegment
    assert all(s["trace_id"] == "1-69b30e20-2bcb342fabbfc41682d5215d" for s in sent)

"""The RDS CA bundle's trust-root path (tooling.rds_ca, `make rds-ca` / `make rds-ca-check`):
validation against bundles made in the test, the command's refusals, the build's and the
deploy's use of it, and the connect-time error when it is missing. The real bundle cannot
be downloaded on this machine; the download is checked for its refusals only."""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from core.data import connections
from core.data.connections import (
    AMAZON_ROOT_CAS,
    RDS_CA_BUNDLE,
    DatabaseUnavailableError,
    tls_parameters,
)
from core.settings import Settings
from tooling import rds_ca
from tooling.rds_ca import BundleError, validate_bundle

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)
DB_INSTANCE = "host=mm.abc123.eu-west-1.rds.amazonaws.com port=5432 dbname=matchmaker user=u"


def ca_pem(
    common_name: str = "Amazon RDS eu-west-1 Root CA RSA2048 G1",
    unit: str = "Amazon RDS",
    not_before: datetime.datetime = NOW - DAY,
    not_after: datetime.datetime = NOW + 365 * DAY,
    is_ca: bool = True,
) -> bytes:
    """A self-signed certificate with the subject fields the RDS CAs have."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Amazon Web Services, Inc."),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_a_bundle_of_valid_rds_cas_passes_and_is_summarised() -> None:
    bundle = ca_pem() + ca_pem("Amazon RDS us-east-1 Root CA ECC384 G1", not_after=NOW + 30 * DAY)
    report = validate_bundle(bundle)
    assert (report.certificates, report.rds_cas, report.expired) == (2, 2, 0)
    assert report.first_expiry.date() == (NOW + 30 * DAY).date()
    assert "2 valid Amazon RDS CAs" in report.summary()


def test_expired_cas_beside_a_valid_one_are_counted_not_fatal() -> None:
    expired = ca_pem("Amazon RDS eu-west-1 2019 CA", not_after=NOW - DAY, not_before=NOW - 9 * DAY)
    report = validate_bundle(expired + ca_pem())
    assert (report.certificates, report.rds_cas, report.expired) == (2, 1, 1)


@pytest.mark.parametrize(
    ("bundle", "problem"),
    [
        pytest.param(
            ca_pem(not_before=NOW - 9 * DAY, not_after=NOW - DAY),
            "no unexpired CA whose subject names Amazon RDS (1 expired",
            id="expired",
        ),
        pytest.param(
            ca_pem(not_before=NOW + DAY, not_after=NOW + 9 * DAY),
            "no unexpired CA",
            id="not-yet-valid",
        ),
        pytest.param(ca_pem("Some Other Root CA", unit="Other"), "names Amazon RDS", id="not-rds"),
        pytest.param(ca_pem(is_ca=False), "certificate 1 is not a CA certificate", id="leaf"),
        pytest.param(b"", "no PEM certificate", id="empty"),
        pytest.param(b"\n\n  \n", "no PEM certificate", id="blank"),
        pytest.param(b"<html>Service Unavailable</html>", "no PEM certificate", id="garbage"),
        pytest.param(bytes(range(256)), "non-ASCII", id="binary"),
        pytest.param(
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
            "certificate 1 is not a valid X.509 certificate",
            id="bad-der",
        ),
        pytest.param(
            ca_pem()
            + ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            "block 2 is a PRIVATE KEY: the bundle must hold certificates only",
            id="private-key",
        ),
        pytest.param(b"# a note\n" + ca_pem(), "text outside the PEM blocks", id="text-outside"),
    ],
)
def test_an_unusable_bundle_is_refused_saying_why(bundle: bytes, problem: str) -> None:
    with pytest.raises(BundleError, match=re.escape(problem)):
        validate_bundle(bundle)


def test_check_refuses_a_missing_or_invalid_file_naming_make_rds_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "rds-ca-bundle.pem"
    assert rds_ca.main(["check", str(missing)]) == 1
    assert "no RDS CA bundle" in capsys.readouterr().err
    # the build: a missing file is said, not fatal (`make deploy` refuses it)
    assert rds_ca.main(["check", "--if-present", str(missing)]) == 0
    assert "make rds-ca" in capsys.readouterr().out

    missing.write_bytes(b"garbage")
    for args in (["check", str(missing)], ["check", "--if-present", str(missing)]):
        assert rds_ca.main(args) == 1
        assert "make rds-ca" in capsys.readouterr().err

    missing.write_bytes(ca_pem())
    assert rds_ca.main(["check", str(missing)]) == 0
    assert "1 valid Amazon RDS CAs" in capsys.readouterr().out


def test_download_writes_only_a_valid_bundle_fetched_over_https(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "trust" / "rds-ca-bundle.pem"
    with pytest.raises(BundleError, match="only fetched over https"):
        rds_ca.download("http://truststore.pki.rds.amazonaws.com/global/global-bundle.pem")
    assert rds_ca.main(["download", "--url", "file:///etc/passwd", "--out", str(out)]) == 1
    assert not out.exists()

    served = {"body": b"<html>captive portal</html>"}
    monkeypatch.setattr(rds_ca, "download", lambda url: served["body"])
    assert rds_ca.main(["download", "--out", str(out)]) == 1
    assert "no PEM certificate" in capsys.readouterr().err
    assert not out.exists()  # nothing written unless valid

    served["body"] = ca_pem()
    assert rds_ca.main(["download", "--out", str(out)]) == 0
    assert out.read_bytes() == served["body"]
    assert out.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in out.parent.iterdir()] == ["rds-ca-bundle.pem"]  # no temp file left


def test_the_bundle_is_written_where_the_build_takes_it_and_never_committed() -> None:
    assert RDS_CA_BUNDLE == rds_ca.DEFAULT_BUNDLE
    assert RDS_CA_BUNDLE.parent == AMAZON_ROOT_CAS.parent  # src/core/data/trust, shipped
    relative = RDS_CA_BUNDLE.relative_to(ROOT).as_posix()
    assert relative in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    lambda_mk = (ROOT / "mk" / "lambda.mk").read_text(encoding="utf-8")
    assert f"RDS_CA_BUNDLE ?= {relative}" in lambda_mk
    # the deploy refuses without a valid bundle, before it builds
    deploy = re.search(r"^deploy:(.*)$", makefile, re.MULTILINE)
    assert deploy is not None and deploy.group(1).split()[0] == "rds-ca-check"
    assert "-m tooling.rds_ca check $(RDS_CA_BUNDLE)" in makefile
    assert "-m tooling.rds_ca download --out $(RDS_CA_BUNDLE)" in makefile
    assert rds_ca.RDS_CA_URL == "https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem"
    # every function's build validates the bundle when it is there
    assert "-m tooling.rds_ca check --if-present $(RDS_CA_BUNDLE)" in lambda_mk


def test_connecting_to_a_db_instance_without_the_bundle_names_make_rds_ca(
    tmp_path: Path,
) -> None:
    missing = tmp_path / RDS_CA_BUNDLE.name
    for deployed in (None, "matchmaker-RotateLoginFunction"):
        settings = Settings(
            db_sslmode="verify-full", db_sslrootcert=missing, aws_lambda_function_name=deployed
        )
        with pytest.raises(DatabaseUnavailableError) as raised:
            tls_parameters(DB_INSTANCE, settings)
        assert f"no CA certificate file at {missing}" in str(raised.value)
        assert "run `make rds-ca`" in str(raised.value)
    # another CA file's absence is reported without the RDS advice
    with pytest.raises(DatabaseUnavailableError) as other:
        tls_parameters(
            DB_INSTANCE,
            Settings(db_sslmode="verify-full", db_sslrootcert=tmp_path / "corporate-ca.pem"),
        )
    assert "make rds-ca" not in str(other.value)


def test_the_proxy_path_needs_no_rds_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RDS Proxy's certificates chain to Amazon's public roots, shipped in git: with
    DB_SSLROOTCERT empty (the template's value with the proxy) nothing else is read."""
    monkeypatch.setattr(connections, "RDS_CA_BUNDLE", tmp_path / "absent.pem")
    proxy = "host=mm.proxy-abc123.eu-west-1.rds.amazonaws.com port=5432 dbname=matchmaker"
    settings = Settings(
        db_sslmode="verify-full",
        db_sslrootcert="",
        aws_lambda_function_name="matchmaker-ApiFunction",
    )
    assert tls_parameters(proxy, settings) == {
        "sslmode": "verify-full",
        "sslrootcert": str(AMAZON_ROOT_CAS),
    }
    assert AMAZON_ROOT_CAS.is_file()

"""The RDS CA bundle: downloaded and validated on the deploy machine, shipped by the build.

A DB instance presents a certificate issued by the RDS CAs (the stack pins
rds-ca-rsa2048-g1), which are not public roots. The functions reach the instance itself
when RDS Proxy is off, and the login rotation function always does (the proxy would refuse
the password it tests). So the deploy needs the RDS bundle; it is public, but it is
fetched at deploy time rather than committed, so that it is always AWS's current one.

    make rds-ca         download over HTTPS, validate, write src/core/data/trust/rds-ca-bundle.pem
    make rds-ca-check   refuse (exit 1) when that file is missing or invalid (`make deploy` runs it)

Validation: PEM certificates only (no key, no other block, no text around them), each one a
CA certificate, and at least one unexpired CA whose subject names Amazon RDS. Only the
standard library (ssl): it runs with the host's Python, like the build.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import ssl
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RDS_CA_URL = "https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem"
DEFAULT_BUNDLE = Path(__file__).resolve().parents[1] / "core/data/trust/rds-ca-bundle.pem"
MAX_BUNDLE_BYTES = 4 * 2**20  # the global bundle is about 160 KB
DOWNLOAD_TIMEOUT_S = 30
RDS_SUBJECT = "Amazon RDS"
MAKE_HINT = "run `make rds-ca` (downloads and checks the RDS CA bundle)"

_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----\r?\n?", re.DOTALL)


class BundleError(ValueError):
    """The bundle cannot be trusted as the RDS trust root; the message says why."""


@dataclass(frozen=True)
class CaCertificate:
    subject: str
    not_before: datetime.datetime
    not_after: datetime.datetime

    @property
    def names_rds(self) -> bool:
        return RDS_SUBJECT in self.subject

    def valid_at(self, now: datetime.datetime) -> bool:
        return self.not_before <= now < self.not_after


@dataclass(frozen=True)
class BundleReport:
    certificates: int
    rds_cas: int  # unexpired CAs whose subject names Amazon RDS
    expired: int
    first_expiry: datetime.datetime  # of those RDS CAs

    def summary(self) -> str:
        return (
            f"{self.certificates} CA certificates, {self.rds_cas} valid Amazon RDS CAs "
            f"(the first expires {self.first_expiry:%Y-%m-%d}), {self.expired} expired"
        )


def parse_certificates(data: bytes) -> list[CaCertificate]:
    """Every certificate of a PEM bundle; BundleError for anything else in it."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise BundleError("not a PEM file: it holds non-ASCII bytes") from None
    blocks = list(_PEM_BLOCK.finditer(text))
    if not blocks:
        raise BundleError("no PEM certificate in the bundle (empty, or not PEM)")
    if _PEM_BLOCK.sub("", text).strip():
        raise BundleError("text outside the PEM blocks: the bundle must hold certificates only")
    certificates = []
    for number, block in enumerate(blocks, 1):
        if block.group(1) != "CERTIFICATE":
            raise BundleError(
                f"block {number} is a {block.group(1)}: the bundle must hold certificates only"
            )
        certificates.append(_ca_certificate(block.group(0), number))
    return certificates


def _ca_certificate(pem: str, number: int) -> CaCertificate:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=pem)
    except ssl.SSLError as exc:
        raise BundleError(f"certificate {number} is not a valid X.509 certificate: {exc}") from None
    loaded = context.get_ca_certs()  # only certificates with the CA basic constraint
    if not loaded:
        raise BundleError(f"certificate {number} is not a CA certificate")
    info = loaded[0]
    # typeshed types the decoded certificate loosely: subject is ((("CN", "x"),), ...)
    rdns: Any = info.get("subject", ())
    subject = ", ".join(f"{key}={value}" for rdn in rdns for key, value in rdn)
    return CaCertificate(
        subject=subject,
        not_before=_time(str(info["notBefore"])),
        not_after=_time(str(info["notAfter"])),
    )


def _time(value: str) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ssl.cert_time_to_seconds(value), datetime.UTC)


def validate_bundle(data: bytes, now: datetime.datetime | None = None) -> BundleReport:
    """The bundle's report, or BundleError when it is not a usable RDS trust root."""
    now = now or datetime.datetime.now(datetime.UTC)
    certificates = parse_certificates(data)
    rds = [c for c in certificates if c.names_rds and c.valid_at(now)]
    if not rds:
        expired = [c for c in certificates if c.names_rds]
        detail = f" ({len(expired)} expired or not yet valid)" if expired else ""
        raise BundleError(f"no unexpired CA whose subject names {RDS_SUBJECT}{detail}")
    return BundleReport(
        certificates=len(certificates),
        rds_cas=len(rds),
        expired=sum(not c.valid_at(now) for c in certificates),
        first_expiry=min(c.not_after for c in rds),
    )


def download(url: str = RDS_CA_URL, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> bytes:
    """The bundle's bytes, over HTTPS with the server's certificate verified (the
    system's trust store)."""
    if not url.startswith("https://"):
        raise BundleError(f"{url}: the bundle is only fetched over https://")
    context = ssl.create_default_context()
    request = urllib.request.Request(url, headers={"User-Agent": "matchmaker-rds-ca"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as response:  # noqa: S310
            data: bytes = response.read(MAX_BUNDLE_BYTES + 1)
    except (urllib.error.URLError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BundleError(f"cannot download {url}: {reason} (this needs internet access)") from None
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(f"{url}: more than {MAX_BUNDLE_BYTES} bytes, not a CA bundle")
    return data


def write_bundle(path: Path, data: bytes) -> None:
    """Replace `path` atomically (a reader never sees half a bundle), mode 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".rds-ca-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def check_file(path: Path) -> BundleReport:
    if not path.is_file():
        raise BundleError(f"no RDS CA bundle at {path}: {MAKE_HINT}")
    try:
        return validate_bundle(path.read_bytes())
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}; {MAKE_HINT} again") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tooling.rds_ca", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download", help="download, validate and write the bundle")
    fetch.add_argument("--url", default=RDS_CA_URL)
    fetch.add_argument("--out", type=Path, default=DEFAULT_BUNDLE)
    check = commands.add_parser("check", help="exit 1 unless the bundle is there and valid")
    check.add_argument("path", type=Path, nargs="?", default=DEFAULT_BUNDLE)
    check.add_argument(
        "--if-present",
        action="store_true",
        help="a missing file is not an error (the build: the deploy checks it)",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            data = download(args.url)
            report = validate_bundle(data)  # nothing is written unless it is valid
            write_bundle(args.out, data)
            print(f"rds-ca: {args.out}: {report.summary()}")
            return 0
        if args.if_present and not args.path.is_file():
            print(
                f"rds-ca: no RDS CA bundle at {args.path}: connections to a DB instance "
                f"(without RDS Proxy, and the login rotation) will fail until you {MAKE_HINT} "
                "and build again; `make deploy` refuses without it",
            )  # stdout: `sam build` shows a build's stdout, not its stderr
            return 0
        print(f"rds-ca: {args.path}: {check_file(args.path).summary()}")
        return 0
    except (BundleError, OSError) as exc:
        print(f"rds-ca: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

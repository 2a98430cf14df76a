"""TLS to the database, for real: the embedded server behind a TLS endpoint that presents
a server certificate signed by a CA made in the test, reached over TCP.

verify-full connects only when the chain leads to the given CA and the certificate names
the host; a deployed configuration refuses the modes that do not authenticate the server;
a Unix socket is left alone.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from psycopg.conninfo import conninfo_to_dict

from core.data.connections import (
    AMAZON_ROOT_CAS,
    DatabaseUnavailableError,
    connect,
    tls_parameters,
)
from core.settings import Settings

SERVER_NAME = "db.matchmaker.test"  # resolved by hostaddr, so no DNS is involved


@dataclass
class TlsServer:
    port: int
    ca: Path  # the CA that signed the server's certificate
    other_ca: Path  # a CA that did not
    user: str

    def url(self, host: str = SERVER_NAME, **params: str) -> str:
        extra = "".join(f" {key}={value}" for key, value in params.items())
        return (
            f"host={host} hostaddr=127.0.0.1 port={self.port} dbname=postgres user={self.user}"
            + extra
        )


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(SERVER_NAME))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class TlsTerminator:
    """PostgreSQL's TLS negotiation in front of the embedded server (whose build has no
    TLS): answers the client's SSLRequest, does the TLS handshake with the test's server
    certificate and relays the session to the server's Unix socket. libpq verifies the
    certificate exactly as it would against a TLS-enabled server."""

    def __init__(self, socket_path: str, cert: Path, key: Path) -> None:
        self.socket_path = socket_path
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            while True:
                length, code = struct.unpack("!II", _read_exactly(client, 8))
                if length == 8 and code == GSSENC_REQUEST:
                    client.sendall(b"N")  # no GSSAPI encryption; libpq asks for TLS next
                    continue
                if length == 8 and code == SSL_REQUEST:
                    client.sendall(b"S")
                    break
                return  # a plaintext startup: this endpoint speaks TLS only
            secure = self.context.wrap_socket(client, server_side=True)
        except (OSError, ssl.SSLError):
            client.close()  # the client refused our certificate: what the tests expect
            return
        upstream = socket.socket(socket.AF_UNIX)
        upstream.connect(self.socket_path)
        threading.Thread(target=_pump, args=(upstream, secure), daemon=True).start()
        _pump(secure, upstream)

    def close(self) -> None:
        self.listener.close()


SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed during negotiation")
        data += chunk
    return data


def _pump(source: socket.socket, target: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            target.sendall(chunk)
    except OSError:
        pass
    finally:
        for end in (source, target):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


@pytest.fixture(scope="module")
def tls_server(pg_server_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    base = tmp_path_factory.mktemp("tls")
    ca_key, ca = _ca("Matchmaker test CA")
    _, other_ca = _ca("Someone else's CA")
    server_key, server_cert = _server_cert(ca_key, ca)
    (base / "server.crt").write_bytes(_pem(server_cert))
    (base / "server.key").write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (base / "ca.pem").write_bytes(_pem(ca))
    (base / "other-ca.pem").write_bytes(_pem(other_ca))

    params = conninfo_to_dict(pg_server_uri)
    host, port = str(params["host"]), str(params.get("port") or 5432)
    if not host.startswith("/"):
        pytest.skip("the TLS tests front the embedded server's Unix socket")
    terminator = TlsTerminator(f"{host}/.s.PGSQL.{port}", base / "server.crt", base / "server.key")
    try:
        yield TlsServer(
            terminator.port,
            base / "ca.pem",
            base / "other-ca.pem",
            str(params.get("user") or "postgres"),
        )
    finally:
        terminator.close()


def _uses_tls(conn: psycopg.Connection[Any]) -> bool:
    return bool(conn.pgconn.ssl_in_use)


def test_verify_full_connects_to_the_server_the_ca_vouches_for(tls_server: TlsServer) -> None:
    settings = Settings(db_sslmode="verify-full", db_sslrootcert=tls_server.ca)
    with connect(tls_server.url(), settings) as conn:
        assert _uses_tls(conn)
        assert conn.info.get_parameters()["sslmode"] == "verify-full"


def test_verify_full_refuses_a_certificate_of_another_ca(tls_server: TlsServer) -> None:
    settings = Settings(db_sslmode="verify-full", db_sslrootcert=tls_server.other_ca)
    with pytest.raises(DatabaseUnavailableError, match="certificate verify failed"):
        connect(tls_server.url(), settings)


def test_verify_full_refuses_a_certificate_for_another_host(tls_server: TlsServer) -> None:
    settings = Settings(db_sslmode="verify-full", db_sslrootcert=tls_server.ca)
    with pytest.raises(DatabaseUnavailableError, match="does not match host name"):
        connect(tls_server.url(host="impostor.matchmaker.test"), settings)


def test_the_shipped_amazon_roots_do_not_vouch_for_a_stranger(tls_server: TlsServer) -> None:
    """Unset DB_SSLROOTCERT means the Amazon root CAs, which must refuse our test CA."""
    assert AMAZON_ROOT_CAS.read_text().count("BEGIN CERTIFICATE") == 5
    settings = Settings(db_sslmode="verify-full")
    with pytest.raises(DatabaseUnavailableError, match="certificate verify failed"):
        connect(tls_server.url(), settings)


@pytest.mark.parametrize("mode", ["disable", "allow", "prefer"])
def test_a_deployed_function_refuses_modes_that_do_not_authenticate(
    tls_server: TlsServer, mode: str
) -> None:
    """Whether the mode comes from DB_SSLMODE or the URL, before any connection is tried."""
    deployed = Settings(aws_lambda_function_name="matchmaker-ApiFunction", db_sslmode=mode)
    with pytest.raises(DatabaseUnavailableError, match=f"sslmode={mode} does not authenticate"):
        connect(tls_server.url(), deployed)
    from_url = Settings(aws_lambda_function_name="matchmaker-ApiFunction")
    with pytest.raises(DatabaseUnavailableError, match=f"sslmode={mode} does not authenticate"):
        connect(tls_server.url(sslmode=mode), from_url)
    # libpq's own default (prefer) is refused too
    with pytest.raises(DatabaseUnavailableError, match="sslmode=prefer does not authenticate"):
        connect(tls_server.url(), from_url)


def test_a_deployed_function_connects_with_verify_full(tls_server: TlsServer) -> None:
    deployed = Settings(
        aws_lambda_function_name="matchmaker-ApiFunction",
        db_sslmode="verify-full",
        db_sslrootcert=tls_server.ca,
    )
    with connect(tls_server.url(), deployed) as conn:
        assert _uses_tls(conn)


def test_a_unix_socket_is_left_alone(db_url: str) -> None:
    """Local sockets carry no TLS: even DB_SSLMODE=verify-full adds nothing to them."""
    settings = Settings(db_sslmode="verify-full", aws_lambda_function_name="x")
    assert tls_parameters(db_url, settings) == {}
    with connect(db_url, settings) as conn:
        assert not _uses_tls(conn)


def test_a_missing_ca_file_is_a_clear_error(tls_server: TlsServer, tmp_path: Path) -> None:
    settings = Settings(db_sslmode="verify-full", db_sslrootcert=tmp_path / "absent.pem")
    with pytest.raises(DatabaseUnavailableError, match="DB_SSLROOTCERT: no CA certificate"):
        connect(tls_server.url(), settings)

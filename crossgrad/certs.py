"""Certificates for a run: one CA, one certificate per node, one for the bootstrap, one for people.

    crossgrad certs --nodes 5 --out certs/ [--hosts peer0.example.org,10.0.0.7]

writes, into `out`:

    ca.pem, ca.key                the run's certificate authority (keep ca.key offline)
    token                         a shared bearer token, for --client-auth token set-ups
    bootstrap.pem, bootstrap.key  the bootstrap
    node-0.pem, node-0.key ...    one per node
    client.pem, client.key        for people and tools (crossgrad status, grpcurl)

What a certificate names (docs/security.md):

- its identity as a caller, a URI SAN: `crossgrad://node/3`, `crossgrad://bootstrap` or
  `crossgrad://client/NAME`. A server reads the caller's id from there (crossgrad/security.py),
  never from the request;
- its name as a server, a DNS SAN that its callers verify whatever address they reach it at:
  `node-3.crossgrad` for node 3, `bootstrap.crossgrad` for the bootstrap;
- the hosts a person reaches it at (`hosts`, by default localhost and 127.0.0.1), so that
  `crossgrad status 127.0.0.1:50051` and `grpcurl -cacert ...` verify it with no name override.

Keys are ECDSA P-256 (fast handshakes, small certificates); key files are written 0600. Made with
the `cryptography` package; nothing is hand-rolled.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from crossgrad.errors import ConfigError
from crossgrad.security import (
    BOOTSTRAP_SERVER_NAME,
    BOOTSTRAP_URI,
    URI_SCHEME,
    node_server_name,
    node_uri,
)

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_DAYS = 365
CA_DAYS = 3650
# Clocks of different sites disagree; a certificate made now is valid from a little earlier.
BACKDATE = datetime.timedelta(hours=1)
TOKEN_BYTES = 32


@dataclass(frozen=True)
class Made:
    """What make_run_certificates wrote: paths by name ("ca", "bootstrap", "node-0", "client")."""

    out: Path
    names: tuple[str, ...]

    def cert(self, name: str) -> Path:
        return self.out / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.out / f"{name}.key"

    @property
    def ca(self) -> Path:
        return self.cert("ca")

    @property
    def token(self) -> Path:
        return self.out / "token"


def make_run_certificates(out: Path, nodes: int, *, hosts: Sequence[str] = DEFAULT_HOSTS,
                          days: int = DEFAULT_DAYS, client_name: str = "admin",
                          ca: tuple[Path, Path] | None = None) -> Made:
    """Write a CA (or use `ca`, a (cert, key) pair of an existing one) and the run's certificates.

    Raises ConfigError for a bad node count or host, or an existing CA that cannot be read.
    """
    if nodes < 1:
        raise ConfigError(f"--nodes must be at least 1; got {nodes}")
    if days < 1:
        raise ConfigError(f"--days must be at least 1; got {days}")
    out.mkdir(parents=True, exist_ok=True)
    if ca is None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _ca_certificate(ca_key, CA_DAYS)
        _write(out / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM))
        _write_key(out / "ca.key", ca_key)
    else:
        ca_cert, ca_key = load_ca(*ca)
        if ca[0].resolve() != (out / "ca.pem").resolve():
            _write(out / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM))
    names = ["ca"]
    issue = _Issuer(ca_cert, ca_key, days, tuple(hosts))
    issue("bootstrap", BOOTSTRAP_URI, [BOOTSTRAP_SERVER_NAME], out)
    names.append("bootstrap")
    for node_id in range(nodes):
        issue(f"node-{node_id}", node_uri(node_id), [node_server_name(node_id)], out)
        names.append(f"node-{node_id}")
    issue("client", f"{URI_SCHEME}client/{client_name}", [], out, server=False)
    names.append("client")
    if not (out / "token").exists():  # shared by every node: a new one would lock them out
        _write_secret(out / "token", secrets.token_urlsafe(TOKEN_BYTES).encode() + b"\n")
    return Made(out, tuple(names))


def load_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the CA {cert_path} / {key_path}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"the CA key {key_path} is not an EC key; make the CA with "
                          "`crossgrad certs`")
    return cert, key


class _Issuer:
    def __init__(self, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, days: int,
                 hosts: tuple[str, ...]) -> None:
        self.ca_cert = ca_cert
        self.ca_key = ca_key
        self.days = days
        self.hosts = hosts

    def __call__(self, name: str, uri: str, dns: Sequence[str], out: Path, *,
                 server: bool = True) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
        sans += [x509.DNSName(d) for d in dns]
        if server:
            sans += [_host_name(h) for h in self.hosts]
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                     x509.NameAttribute(NameOID.ORGANIZATION_NAME, "crossgrad")]))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=self.days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                         content_commitment=False, data_encipherment=False,
                                         key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.ca_key.public_key()), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        _write(out / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))
        _write_key(out / f"{name}.key", key)


def _ca_certificate(key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crossgrad run CA"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "crossgrad")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                     content_commitment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )


def _host_name(host: str) -> x509.GeneralName:
    host = host.strip()
    if not host:
        raise ConfigError("--hosts has an empty entry; give names or addresses, comma-separated")
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    _write_secret(path, key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT

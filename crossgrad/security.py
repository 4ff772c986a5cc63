"""Transport security: TLS material, tokens, and who is calling (docs/security.md).

One `Security` per process, built once at start from flags, the TOML file's [security] table and
CROSSGRAD_* variables (defaults < file < environment < flags, as crossgrad.config), and handed to
the one server factory and the one channel factory (crossgrad/rpc.py):

    security = load_security(SecurityFlags(ca=..., cert=..., key=...), role=Role.SERVER)
    server = make_server(bind, services, security=security)
    channel = make_channel(address, security=security, server_name=node_server_name(3))

Three modes, chosen explicitly, never by fallback:

- mutual TLS (the default once --tls-ca, --tls-cert and --tls-key are given): servers require a
  client certificate signed by the CA, and a caller's identity is the crossgrad URI its verified
  certificate names (crossgrad://node/3, crossgrad/certs.py), never a field of the request;
- TLS with a token (--client-auth token): servers present a certificate but ask callers for none;
  callers prove membership with a shared bearer token, read from a file or the environment (never
  a flag, which `ps` would show), sent only over TLS and compared in constant time. Every token
  holder is a member: identities inside the run are claimed, not proven;
- plaintext, only with --insecure, and with a warning in the log at start.
"""

from __future__ import annotations

import argparse
import difflib
import enum
import hmac
import logging
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import grpc

from crossgrad.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

TOKEN_ENV = "CROSSGRAD_TOKEN"
AUTHORIZATION_KEY = "authorization"  # gRPC metadata keys are lower case (HTTP/2 headers)
BEARER = "Bearer "
# A token shorter than this is guessable; `crossgrad certs` writes a 256-bit one.
MIN_TOKEN_CHARS = 16

# What certificates name (crossgrad/certs.py, docs/security.md): a URI SAN for the identity of a
# caller, a DNS SAN for the name its callers verify when it serves, whatever its address.
URI_SCHEME = "crossgrad://"
NODE_URI = re.compile(r"crossgrad://node/(\d{1,9})")
BOOTSTRAP_URI = f"{URI_SCHEME}bootstrap"
CLIENT_URI = re.compile(r"crossgrad://client/([A-Za-z0-9._-]{1,64})")
SERVER_NAME_DOMAIN = "crossgrad"
BOOTSTRAP_SERVER_NAME = f"bootstrap.{SERVER_NAME_DOMAIN}"


def node_uri(node_id: int) -> str:
    return f"{URI_SCHEME}node/{node_id}"


def node_server_name(node_id: int) -> str:
    """The DNS name a node's neighbors verify on its certificate, whatever its address."""
    return f"node-{node_id}.{SERVER_NAME_DOMAIN}"


class Role(enum.Enum):
    """What a process does on the wire: serves and calls (a peer, the bootstrap), or only calls
    (crossgrad status, the health probe)."""

    SERVER = "server"
    CLIENT = "client"


class ClientAuth(enum.Enum):
    CERTIFICATE = "certificate"
    TOKEN = "token"


@dataclass(frozen=True)
class SecurityFlags:
    """What the user said: paths and switches, before any file is read. None: not given."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    token_file: str | None = None
    client_auth: str | None = None  # "certificate" (mutual TLS) or "token"
    insecure: bool | None = None

    def merged(self, below: SecurityFlags) -> SecurityFlags:
        """These flags over `below`: a field given here wins."""
        return replace(below, **{f.name: getattr(self, f.name) for f in fields(self)
                                 if getattr(self, f.name) is not None})


@dataclass(frozen=True)
class Security:
    """The TLS material and token of one process, read and checked. Plaintext only if `insecure`."""

    insecure: bool
    client_auth: ClientAuth = ClientAuth.CERTIFICATE
    ca: bytes | None = field(default=None, repr=False)
    cert: bytes | None = field(default=None, repr=False)
    key: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    source: str = ""  # where the material came from, for the start log

    @classmethod
    def plaintext(cls) -> Security:
        """No TLS: what --insecure gives (and in-process tests, which say so)."""
        return cls(insecure=True, source="--insecure")

    @property
    def mutual(self) -> bool:
        """Whether this process's server requires and verifies client certificates."""
        return not self.insecure and self.client_auth is ClientAuth.CERTIFICATE

    def describe(self) -> str:
        if self.insecure:
            return "plaintext (--insecure): anyone who reaches the port can call as any node"
        how = ("mutual TLS: callers are identified by their certificates" if self.mutual
               else "TLS, callers authenticated by the shared token")
        extra = ", plus the shared token" if self.mutual and self.token else ""
        return f"{how}{extra} ({self.source})"

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.insecure:
            return None
        assert self.cert is not None and self.key is not None  # load_security checked
        return grpc.ssl_server_credentials([(self.key, self.cert)],
                                           root_certificates=self.ca if self.mutual else None,
                                           require_client_auth=self.mutual)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials for calls this process makes, with the token attached to every call.

        grpc refuses call credentials on a plaintext channel, so the token cannot leak there.
        """
        if self.insecure:
            return None
        tls = grpc.ssl_channel_credentials(self.ca, self.key if self.cert else None, self.cert)
        if self.token is None:
            return tls
        return grpc.composite_channel_credentials(
            tls, grpc.access_token_call_credentials(self.token))

    def token_matches(self, metadata: Mapping[str, str | bytes]) -> bool:
        """Whether the call's metadata carries this token (constant time in its content)."""
        if self.token is None:
            return True
        given = metadata.get(AUTHORIZATION_KEY, "")
        if isinstance(given, bytes):
            given = given.decode("latin-1")
        expected = (BEARER + self.token).encode()
        return hmac.compare_digest(given.encode("latin-1", "replace"), expected)


def read_security_table(config_file: str | None) -> SecurityFlags:
    """The [security] table of a TOML file (paths relative to the file), or nothing."""
    if not config_file:
        return SecurityFlags()
    path = Path(config_file)
    try:
        table = tomllib.loads(path.read_text()).get("security", {})
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: security must be a table ([security]); got {table!r}")
    known = {f.name for f in fields(SecurityFlags)}
    values: dict[str, object] = {}
    for key, raw in table.items():
        name = key.replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: [security] has no key {key!r}{hint}; known: "
                              f"{', '.join(sorted(known))}")
        if name == "insecure":
            if not isinstance(raw, bool):
                raise ConfigError(f"{path}: [security] insecure expects true or false; "
                                  f"got {raw!r}")
            values[name] = raw
        elif not isinstance(raw, str):
            raise ConfigError(f"{path}: [security] {key} expects a string (a path, or for "
                              f"client-auth certificate or token); got {raw!r}")
        else:
            text = str(raw)
            values[name] = (text if name == "client_auth" or os.path.isabs(text)
                            else str(path.parent / text))
    return SecurityFlags(**values)  # type: ignore[arg-type]


def read_security_env(environ: Mapping[str, str] | None = None) -> SecurityFlags:
    """CROSSGRAD_TLS_CA, _TLS_CERT, _TLS_KEY, _TOKEN_FILE, _CLIENT_AUTH and _INSECURE (1/true)."""
    env = os.environ if environ is None else environ
    insecure = env.get("CROSSGRAD_INSECURE")
    return SecurityFlags(
        ca=env.get("CROSSGRAD_TLS_CA") or None, cert=env.get("CROSSGRAD_TLS_CERT") or None,
        key=env.get("CROSSGRAD_TLS_KEY") or None,
        token_file=env.get("CROSSGRAD_TOKEN_FILE") or None,
        client_auth=env.get("CROSSGRAD_CLIENT_AUTH") or None,
        insecure=None if insecure is None else insecure.lower() in ("1", "true", "yes"))


def load_security(flags: SecurityFlags, role: Role, *, command: str,
                  config_file: str | None = None,
                  environ: Mapping[str, str] | None = None) -> Security:
    """Read and check the material `command` needs for `role`; ConfigError says what is missing.

    Without TLS material and without --insecure this refuses: nothing falls back to plaintext.
    """
    env = os.environ if environ is None else environ
    given = flags.merged(read_security_env(env).merged(read_security_table(config_file)))
    token = _read_token(given.token_file, env)
    material = any(v is not None for v in (given.ca, given.cert, given.key))
    if given.insecure:
        if material or token is not None:
            raise ConfigError("--insecure and TLS material or a token "
                              "were both given; drop --insecure to use TLS, or the TLS settings "
                              "to run in plaintext")
        security = Security.plaintext()
        log.warning("crossgrad %s runs in PLAINTEXT (--insecure): traffic is readable and any "
                    "caller can claim any node id; use only on a network you trust", command)
        return security
    if not material:
        raise ConfigError(
            "no TLS material. Give --tls-ca, --tls-cert and --tls-key "
            "(make them with `crossgrad certs --nodes N --out DIR`), or --insecure to run in "
            "plaintext on a network you trust")
    try:
        client_auth = ClientAuth(given.client_auth or "certificate")
    except ValueError:
        raise ConfigError(f"--client-auth {given.client_auth!r}: expected certificate (mutual "
                          "TLS) or token") from None
    if given.ca is None:
        raise ConfigError("--tls-ca is missing: the CA that signed the "
                          "other nodes' certificates, to verify them")
    if (given.cert is None) != (given.key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if role is Role.SERVER and given.cert is None:
        raise ConfigError(f"crossgrad {command} serves: it needs its certificate and key "
                          "(--tls-cert, --tls-key)")
    if client_auth is ClientAuth.TOKEN and token is None:
        raise ConfigError("--client-auth token needs the token: "
                          f"--token-file PATH or the {TOKEN_ENV} variable")
    return Security(
        insecure=False, client_auth=client_auth, ca=_read(given.ca, "--tls-ca"),
        cert=_read(given.cert, "--tls-cert") if given.cert else None,
        key=_read(given.key, "--tls-key") if given.key else None, token=token,
        source=f"CA {given.ca}" + (f", certificate {given.cert}" if given.cert else ""))


def _read(path: str, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read it ({exc.strerror})") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{flag} {path}: not a PEM file (expected '-----BEGIN ...')")
    return data


def _read_token(token_file: str | None, env: Mapping[str, str]) -> str | None:
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"--token-file {token_file}: cannot read it ({exc.strerror})") \
                from None
        where = f"--token-file {token_file}"
    elif env.get(TOKEN_ENV):
        token, where = env[TOKEN_ENV].strip(), TOKEN_ENV
    else:
        return None
    if len(token) < MIN_TOKEN_CHARS or not token.isprintable() or " " in token:
        raise ConfigError(f"{where}: the token must be at least {MIN_TOKEN_CHARS} printable "
                          "characters without spaces (`crossgrad certs` writes one)")
    return token


class CallerKind(enum.Enum):
    """What a verified certificate names (crossgrad/certs.py), or ANONYMOUS without one."""

    NODE = "node"
    BOOTSTRAP = "bootstrap"
    CLIENT = "client"  # a person's or a tool's certificate
    UNNAMED = "unnamed"  # signed by the CA, but it names no crossgrad identity
    ANONYMOUS = "anonymous"  # no certificate: plaintext, or TLS with a token


@dataclass(frozen=True)
class Caller:
    """Who made a call, as far as this server can tell.

    A NODE caller was identified by a certificate the server verified: `node_id` is the node it
    names. ANONYMOUS callers are connections (plaintext, or token holders): whatever id they put
    in a request is a claim, not an identity.
    """

    kind: CallerKind
    name: str
    address: str = ""
    node_id: int | None = None

    @property
    def certified(self) -> bool:
        return self.kind is not CallerKind.ANONYMOUS

    def key(self) -> str:
        """What per-caller limits count by: the identity when certified, else the connection."""
        return self.name if self.certified else self.address

    def __str__(self) -> str:
        return f"{self.name} at {self.address}" if self.address else self.name


def caller_of(context: grpc.ServicerContext) -> Caller:
    """The caller of a call, from its verified certificate's crossgrad URI (mutual TLS).

    grpc puts the URI SANs of the certificate it verified into the auth context ("peer_uri");
    without mutual TLS there is none and the caller is its connection.
    """
    address = context.peer() or ""
    auth = context.auth_context() or {}
    uris = [u.decode("utf-8", "replace") for u in auth.get("peer_uri", ())]
    if not uris:
        return Caller(CallerKind.ANONYMOUS, "an anonymous caller", address)
    for uri in uris:
        node = NODE_URI.fullmatch(uri)
        if node:
            node_id = int(node.group(1))
            return Caller(CallerKind.NODE, f"node {node_id}", address, node_id)
        if uri == BOOTSTRAP_URI:
            return Caller(CallerKind.BOOTSTRAP, "the bootstrap", address)
        client = CLIENT_URI.fullmatch(uri)
        if client:
            return Caller(CallerKind.CLIENT, f"client {client.group(1)}", address)
    return Caller(CallerKind.UNNAMED, f"a certificate naming {uris[0][:80]!r}", address)


def add_security_flags(parser: argparse.ArgumentParser, *, serves: bool) -> None:
    """The TLS and token flags of a command that serves (`serves`) or only calls."""
    group = parser.add_argument_group(
        "security", "TLS is required unless --insecure is given (docs/security.md); each flag "
        "also reads from the TOML file's [security] table and from CROSSGRAD_TLS_CA, "
        "CROSSGRAD_TLS_CERT, CROSSGRAD_TLS_KEY, CROSSGRAD_TOKEN_FILE (or the token itself in "
        "CROSSGRAD_TOKEN), CROSSGRAD_CLIENT_AUTH, CROSSGRAD_INSECURE")
    group.add_argument("--tls-ca", default=None,
                       help="PEM file of the CA whose certificates this process trusts")
    group.add_argument("--tls-cert", default=None,
                       help="PEM file of this process's certificate" +
                       ("" if serves else " (needed where servers require mutual TLS)"))
    group.add_argument("--tls-key", default=None, help="PEM file of its private key")
    group.add_argument("--token-file", default=None,
                       help="file holding the shared bearer token (never the token itself on "
                       "the command line, where `ps` shows it)")
    if serves:
        group.add_argument("--client-auth", default=None,
                           choices=[c.value for c in ClientAuth],
                           help="how callers authenticate: certificate (mutual TLS, default) "
                           "or token")
    group.add_argument("--insecure", action="store_true", default=None,
                       help="plaintext: no TLS, any caller may claim any node id; only on a "
                       "network you trust")


def security_from_args(args: argparse.Namespace, role: Role, command: str) -> Security:
    """load_security with the flags of add_security_flags (and --config, when the command has
    it); ConfigError as load_security."""
    flags = SecurityFlags(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key,
                          token_file=args.token_file,
                          client_auth=getattr(args, "client_auth", None),
                          insecure=args.insecure)
    return load_security(flags, role, command=command,
                         config_file=getattr(args, "config", None))

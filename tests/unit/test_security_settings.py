"""crossgrad/security.py and crossgrad/certs.py: what a process accepts as TLS material, what
the certificates name, and how a token is checked. No sockets (tests/rpc has the servers)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509

from crossgrad.certs import Made, make_run_certificates
from crossgrad.errors import ConfigError
from crossgrad.security import (
    ClientAuth,
    Role,
    Security,
    SecurityFlags,
    load_security,
    node_server_name,
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Made:
    return make_run_certificates(tmp_path_factory.mktemp("certs"), 3,
                                 hosts=["localhost", "127.0.0.1", "peer0.example.org"])


def flags_of(certs: Made, name: str, **more: object) -> SecurityFlags:
    return SecurityFlags(ca=str(certs.ca), cert=str(certs.cert(name)), key=str(certs.key(name)),
                         **more)  # type: ignore[arg-type]


def load(flags: SecurityFlags, role: Role = Role.SERVER, *, config_file: str | None = None,
         environ: dict[str, str] | None = None) -> Security:
    return load_security(flags, role, command="peer", config_file=config_file,
                         environ=environ or {})


def sans(path: Path) -> tuple[list[str], list[str], list[str]]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (ext.get_values_for_type(x509.UniformResourceIdentifier),
            ext.get_values_for_type(x509.DNSName),
            [str(ip) for ip in ext.get_values_for_type(x509.IPAddress)])


def test_each_certificate_names_its_identity_and_its_server_name(certs: Made) -> None:
    assert certs.names == ("ca", "bootstrap", "node-0", "node-1", "node-2", "client")
    uris, dns, ips = sans(certs.cert("node-2"))
    assert uris == ["crossgrad://node/2"]
    assert dns == [node_server_name(2), "localhost", "peer0.example.org"]
    assert ips == ["127.0.0.1"]
    assert sans(certs.cert("bootstrap"))[:2] == (["crossgrad://bootstrap"],
                                                 ["bootstrap.crossgrad", "localhost",
                                                  "peer0.example.org"])
    assert sans(certs.cert("client")) == (["crossgrad://client/admin"], [], [])
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    node = x509.load_pem_x509_certificate(certs.cert("node-0").read_bytes())
    node.verify_directly_issued_by(ca)


def test_keys_and_the_token_are_private(certs: Made) -> None:
    for path in (certs.key("ca"), certs.key("node-0"), certs.token):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert len(certs.token.read_text().strip()) >= 32


def test_more_nodes_from_the_same_ca_keep_the_token(certs: Made, tmp_path: Path) -> None:
    token = certs.token.read_text()
    more = make_run_certificates(certs.out, 4, ca=(certs.ca, certs.key("ca")))
    assert more.token.read_text() == token
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    x509.load_pem_x509_certificate(more.cert("node-3").read_bytes()).verify_directly_issued_by(ca)


def test_mutual_tls_is_the_default_with_a_ca_a_certificate_and_a_key(certs: Made) -> None:
    security = load(flags_of(certs, "node-0"))
    assert security.mutual and not security.insecure and security.token is None
    assert security.server_credentials() is not None
    assert security.channel_credentials() is not None
    assert "mutual TLS" in security.describe()


def test_nothing_starts_in_plaintext_unless_asked(certs: Made) -> None:
    for role in Role:
        with pytest.raises(ConfigError, match=r"no TLS material.*--insecure"):
            load(SecurityFlags(), role)
    plain = load(SecurityFlags(insecure=True))
    assert plain.insecure and plain.server_credentials() is None
    assert plain.channel_credentials() is None


@pytest.mark.parametrize(("flags", "message"), [
    (dict(insecure=True, ca="x"), "--insecure and TLS material"),
    (dict(cert="c", key="k"), "--tls-ca is missing"),
    (dict(ca="CA", cert="c"), "go together"),
    (dict(ca="CA"), "serves: it needs its certificate"),
])
def test_incomplete_or_contradictory_material_is_refused(flags: dict[str, object],
                                                         message: str, certs: Made) -> None:
    if flags.get("ca") == "CA":
        flags["ca"] = str(certs.ca)
    with pytest.raises(ConfigError, match=message):
        load(SecurityFlags(**flags))  # type: ignore[arg-type]


def test_a_client_needs_only_the_ca(certs: Made) -> None:
    security = load(SecurityFlags(ca=str(certs.ca)), Role.CLIENT)
    assert security.cert is None and security.channel_credentials() is not None


def test_unreadable_or_non_pem_files_are_named(certs: Made, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--tls-cert .*cannot read"):
        load(SecurityFlags(ca=str(certs.ca), cert=str(tmp_path / "nope.pem"),
                           key=str(certs.key("node-0"))))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ConfigError, match="not a PEM file"):
        load(SecurityFlags(ca=str(junk), cert=str(certs.cert("node-0")),
                           key=str(certs.key("node-0"))))


def test_token_mode_reads_the_token_from_a_file_or_the_environment(certs: Made,
                                                                   tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs the token"):
        load(flags_of(certs, "node-0", client_auth="token"))
    from_file = load(flags_of(certs, "node-0", client_auth="token",
                              token_file=str(certs.token)))
    assert from_file.client_auth is ClientAuth.TOKEN and not from_file.mutual
    token = certs.token.read_text().strip()
    assert from_file.token == token
    from_env = load(flags_of(certs, "node-0", client_auth="token"),
                    environ={"CROSSGRAD_TOKEN": token})
    assert from_env.token == token
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(ConfigError, match="at least 16"):
        load(flags_of(certs, "node-0", token_file=str(short)))
    with pytest.raises(ConfigError, match="--client-auth 'password'"):
        load(flags_of(certs, "node-0", client_auth="password"))


def test_token_check(certs: Made) -> None:
    security = load(flags_of(certs, "node-0", token_file=str(certs.token)))
    token = security.token
    assert token is not None
    assert security.token_matches({"authorization": f"Bearer {token}"})
    assert not security.token_matches({"authorization": f"Bearer {token[:-1]}x"})
    assert not security.token_matches({"authorization": token})
    assert not security.token_matches({})
    assert not security.token_matches({"authorization": "Bearer \u00e9\u00e9"})


def test_toml_table_and_environment_with_flags_on_top(certs: Made, tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[security]\nca = "{certs.ca}"\ncert = "{certs.cert("node-1")}"\n'
                      f'key = "{certs.key("node-1")}"\n')
    from_file = load(SecurityFlags(), config_file=str(config))
    assert from_file.cert == certs.cert("node-1").read_bytes()
    env = {"CROSSGRAD_TLS_CERT": str(certs.cert("node-2")),
           "CROSSGRAD_TLS_KEY": str(certs.key("node-2"))}
    from_env = load(SecurityFlags(), config_file=str(config), environ=env)
    assert from_env.cert == certs.cert("node-2").read_bytes()
    from_flag = load(SecurityFlags(cert=str(certs.cert("node-0")), key=str(certs.key("node-0"))),
                     config_file=str(config), environ=env)
    assert from_flag.cert == certs.cert("node-0").read_bytes()
    relative = tmp_path / "sub"
    relative.mkdir()
    for name in ("ca.pem", "node-0.pem", "node-0.key"):
        (relative / name).write_bytes((certs.out / name).read_bytes())
    (relative / "r.toml").write_text('[security]\nca = "ca.pem"\ncert = "node-0.pem"\n'
                                     'key = "node-0.key"\n')
    assert load(SecurityFlags(), config_file=str(relative / "r.toml")).ca is not None
    (tmp_path / "bad.toml").write_text('[security]\ncertificate = "x"\n')
    with pytest.raises(ConfigError, match="no key 'certificate'"):
        load(SecurityFlags(), config_file=str(tmp_path / "bad.toml"))
    plain = load(SecurityFlags(), environ={"CROSSGRAD_INSECURE": "1"})
    assert plain.insecure

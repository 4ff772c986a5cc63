"""docker-compose.yml and its TLS overlay are documentation that must stay true
(docs/conventions.md, "Deployment files are documentation").

docker-compose itself validates the file when it is installed (CI installs Debian's); every
service's `command:` goes through the CLI's own parser, and the addresses in them must fit the
services: peer ids 0..N-1 once each, --bootstrap naming the bootstrap service and its port,
--advertise naming the peer's own service, --expect the number of peers; and the run's settings
pass the CLI's validation. The main file runs plaintext and says so (CROSSGRAD_INSECURE); the
overlay docker-compose.tls.yml gives every process the certificate that names it, made by its
own `certs` service: the test makes them with that very command and loads each process's TLS
settings from its environment, as the process would.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from crossgrad.certs import make_run_certificates
from crossgrad.security import Role, SecurityFlags, load_security

from deployfiles import check_run_settings, identities, parse_command, split_address
from procs import REPO, ProcessGroup

COMPOSE = REPO / "docker-compose.yml"
TLS_OVERLAY = REPO / "docker-compose.tls.yml"


def services(path: Path = COMPOSE) -> dict[str, dict[str, Any]]:
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict) and isinstance(document.get("services"), dict)
    return document["services"]


def parse(name: str, service: dict[str, Any]) -> argparse.Namespace:
    return parse_command(name, service.get("command"))


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, TLS_OVERLAY]],
                         ids=["plaintext", "tls-overlay"])
def test_docker_compose_validates_the_file(files: list[Path], procs: ProcessGroup) -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (CI installs Debian's docker-compose)")
    proc = procs.run([binary, *(f"-f{f}" for f in files), "config"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "condition: service_healthy" in proc.stdout  # kept, not dropped, by this format
    merged = yaml.safe_load(proc.stdout)["services"]
    tls = len(files) > 1
    for name, service in merged.items():
        if name == "certs":
            continue
        assert service["environment"]["CROSSGRAD_INSECURE"] == ("0" if tls else "1"), name
        if tls:
            assert "service_completed_successfully" in str(service["depends_on"]), name
            assert any("/certs" in str(v) for v in service["volumes"]), name


def test_the_main_file_runs_plaintext_and_says_so() -> None:
    for name, service in services().items():
        env = {k: str(v) for k, v in service["environment"].items()}
        security = load_security(SecurityFlags(), Role.SERVER, command=name, environ=env)
        assert security.insecure, name


def test_the_overlay_gives_each_process_the_certificate_that_names_it(tmp_path: Path) -> None:
    main, overlay = services(), services(TLS_OVERLAY)
    assert set(overlay) == {"certs", *main}, "the overlay covers every service"
    certs_args = parse("certs", overlay["certs"])
    assert str(certs_args.out) == "/certs" and certs_args.if_missing
    peers = {name: parse(name, s) for name, s in main.items() if name != "bootstrap"}
    assert certs_args.nodes == len(peers)
    assert set(certs_args.hosts.split(",")) >= {"127.0.0.1", *main}
    made = make_run_certificates(tmp_path, certs_args.nodes, hosts=certs_args.hosts.split(","))
    for name, service in overlay.items():
        if name == "certs":
            continue
        env = {**{k: str(v) for k, v in main[name]["environment"].items()},
               **{k: str(v).replace("/certs", str(made.out))
                  for k, v in service["environment"].items()}}
        security = load_security(SecurityFlags(), Role.SERVER, command=name, environ=env)
        assert security.mutual, name
        uris = identities(security.cert or b"")
        want = ("crossgrad://bootstrap" if name == "bootstrap"
                else f"crossgrad://node/{peers[name].node_id}")
        assert uris == [want], f"{name} would present {uris}"


def test_every_command_parses_and_the_addresses_fit_the_services() -> None:
    parsed = {name: parse(name, service) for name, service in services().items()}
    boots = {name: args for name, args in parsed.items() if args.command == "bootstrap"}
    peers = {name: args for name, args in parsed.items() if args.command == "peer"}
    assert list(boots) == ["bootstrap"], f"one bootstrap service, got {sorted(boots)}"
    assert set(parsed) == {*boots, *peers}, "every service is the bootstrap or a peer"
    boot = boots["bootstrap"]
    _, boot_port = split_address(boot.bind)

    ids = sorted(args.node_id for args in peers.values())
    assert ids == list(range(len(peers))), f"peer ids must be 0..N-1 once each, got {ids}"
    assert boot.nodes == len(peers), (
        f"the bootstrap expects {boot.nodes} peers; the file has {len(peers)}")

    for name, args in peers.items():
        assert split_address(args.bootstrap) == ("bootstrap", boot_port), (
            f"{name}: --bootstrap {args.bootstrap} is not the bootstrap service's address")
        host, port = split_address(args.advertise)
        assert host == name, f"{name}: --advertise {args.advertise} names another host"
        assert port == split_address(args.bind)[1], (
            f"{name}: --advertise port is not the bound port")
        assert str(args.out).endswith(name), f"{name}: --out {args.out} is another peer's"


def test_the_bootstrap_settings_are_a_valid_run() -> None:
    """Parsing is not enough: the run's settings must pass the same validation the CLI runs."""
    check_run_settings("bootstrap", parse("bootstrap", services()["bootstrap"]))


def test_every_service_has_a_healthcheck_through_the_probe() -> None:
    for name, service in services().items():
        args = parse(name, service)
        port = split_address(args.bind)[1]
        test = service.get("healthcheck", {}).get("test")
        assert test == ["CMD", "python", "-m", "crossgrad.healthcheck", f"127.0.0.1:{port}"], (
            f"{name}: healthcheck {test}")
        if args.command == "peer":
            assert service["depends_on"] == {"bootstrap": {"condition": "service_healthy"}}

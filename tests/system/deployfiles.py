"""What the tests of deployment files share (docker-compose.yml, deploy/kubernetes/): a
container's arguments go through the CLI's own parser, its addresses split into host and port,
the bootstrap's run settings through the CLI's validation, and a certificate is read for the
identity it proves. Not a test module: test_compose.py and test_kubernetes.py import it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from dataclasses import fields
from typing import Any

import pytest
from cryptography import x509

from crossgrad.cli import build_parser
from crossgrad.config import RunConfig
from crossgrad.errors import ConfigError
from peer.builder import load_config


def parse_command(name: str, command: Any) -> argparse.Namespace:
    """`command` (a YAML list of strings) as `crossgrad` would parse it; a refusal fails the
    test with the CLI's own message."""
    assert isinstance(command, list), f"{name}: the command must be a YAML list of its flags"
    assert all(isinstance(arg, str) for arg in command), (
        f"{name}: quote every value, so that the command is a list of strings: {command}")
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            return build_parser().parse_args(command)
    except SystemExit as exc:
        pytest.fail(f"{name}: the CLI refuses its command (exit {exc.code}): "
                    f"{said.getvalue().strip()}; command {command}")


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    assert host and port.isdigit(), f"{address!r} is not HOST:PORT"
    return host, int(port)


def check_run_settings(name: str, args: argparse.Namespace) -> None:
    """Parsing is not enough: the run's settings must pass the same validation the CLI runs."""
    overrides = {f.name: getattr(args, f.name) for f in fields(RunConfig)}
    try:
        load_config(overrides, args.config, environ={})
    except ConfigError as exc:
        pytest.fail(f"{name}: the run's settings are refused: {exc}")


def identities(cert_pem: bytes) -> list[str]:
    """The URI SANs of a certificate: who it proves its holder is (crossgrad://node/N, ...)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)

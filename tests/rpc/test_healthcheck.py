"""crossgrad/healthcheck.py (the compose healthchecks' probe) against a real server on 127.0.0.1:0.

Exit code 0 only for SERVING; 1 with one line on stderr for NOT_SERVING, an unknown service and
nothing listening. Once in-process through main(), once as `python -m crossgrad.healthcheck`.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from crossgrad.healthcheck import main

from harness import PEER, Serve, peer_service
from procs import ProcessGroup


def probe(procs: ProcessGroup, *args: str) -> subprocess.CompletedProcess[str]:
    return procs.run([sys.executable, "-m", "crossgrad.healthcheck", "--insecure", *args],
                     timeout=60)


def test_not_serving_is_1_then_serving_is_0(serve: Serve,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    server = serve([peer_service()])
    assert main(["--insecure", server.address]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NOT_SERVING" in err[0] and server.address in err[0]

    server.set_serving()
    assert main(["--insecure", server.address]) == 0
    assert main(["--insecure", server.address, "--service", PEER]) == 0
    assert capsys.readouterr().err == ""

    server.set_serving(False)
    assert main(["--insecure", server.address, "--service", PEER]) == 1


def test_unknown_service_is_1(serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    server = serve([peer_service()])
    server.set_serving()
    assert main(["--insecure", server.address, "--service", "crossgrad.v1.Nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NOT_FOUND" in err[0]


def test_nothing_listening_is_1(serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    server = serve([])
    address = server.address
    server.stop(grace=0)  # the port is free again: nobody answers there
    assert main(["--insecure", address, "--timeout", "5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "UNAVAILABLE" in err[0]


def test_as_a_subprocess(serve: Serve, procs: ProcessGroup) -> None:
    server = serve([peer_service()])
    proc = probe(procs, server.address)
    assert proc.returncode == 1, proc.stderr
    warning, reason = proc.stderr.strip().splitlines()  # --insecure is said at start, always
    assert "PLAINTEXT (--insecure)" in warning and "NOT_SERVING" in reason

    server.set_serving()
    proc = probe(procs, server.address, "--service", PEER)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and "NOT_SERVING" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [warning]  # only the plaintext warning

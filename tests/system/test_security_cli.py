"""No command serves or connects in plaintext unless told to (docs/security.md).

Each command that serves (bootstrap, peer) or connects (status, the health probe) refuses to
start without TLS material and without --insecure: one line on stderr naming both ways out, exit
code 2, nothing listening. With --insecure it starts, and says at once, as a warning, that it
runs in plaintext. The demo makes its own certificates (tests/system/test_equivalence.py and
test_demo.py run it with mutual TLS).
"""

from __future__ import annotations

import os
import re
import sys

import pytest

from procs import ProcessGroup, crossgrad

# Every CROSSGRAD_* variable that could supply TLS material or --insecure is dropped.
ENV = {k: v for k, v in os.environ.items() if not k.startswith("CROSSGRAD_")}

COMMANDS = {
    "bootstrap": crossgrad("bootstrap", "--nodes", "2", "--bind", "127.0.0.1:0"),
    "peer": crossgrad("peer", "--id", "0", "--bootstrap", "127.0.0.1:9", "--bind",
                      "127.0.0.1:0"),
    "status": crossgrad("status", "127.0.0.1:9"),
    "healthcheck": [sys.executable, "-m", "crossgrad.healthcheck", "127.0.0.1:9"],
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_no_plaintext_start_without_insecure(name: str, procs: ProcessGroup) -> None:
    proc = procs.run(COMMANDS[name], timeout=60, env=ENV)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "no TLS material" in lines[0] and "--insecure" in lines[0]
    assert "--tls-ca" in lines[0] and "crossgrad certs" in lines[0]
    assert "serving" not in proc.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_insecure_and_tls_material_together_are_refused(name: str,
                                                        procs: ProcessGroup) -> None:
    proc = procs.run([*COMMANDS[name], "--insecure", "--tls-ca", "/nonexistent/ca.pem"],
                     timeout=60, env=ENV)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "--insecure and TLS material" in proc.stderr


def test_insecure_start_warns_at_once(procs: ProcessGroup) -> None:
    boot = procs.start([*COMMANDS["bootstrap"], "--insecure"], env=ENV)
    assert boot.stdout is not None and boot.stderr is not None
    assert re.search(r"bootstrap serving on 127\.0\.0\.1:\d+", boot.stdout.readline())
    warning = boot.stderr.readline()
    assert "WARNING" in warning and "PLAINTEXT (--insecure)" in warning
    procs.signal(boot, 15)
    assert boot.wait(timeout=30) == 0


def test_the_probe_reports_a_missing_flag_as_usage(procs: ProcessGroup) -> None:
    proc = procs.run([*COMMANDS["healthcheck"], "--tls-ca", "/nonexistent/ca.pem"], timeout=60,
                     env=ENV)
    assert proc.returncode == 2
    assert proc.stderr.startswith("healthcheck: error: --tls-ca /nonexistent/ca.pem: cannot")

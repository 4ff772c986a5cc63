"""`crossgrad demo` as a person runs it: Ctrl-C stops the bootstrap and every peer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def children_of_run(run_dir: Path) -> list[str]:
    """Processes whose command line names this run's directory (the demo's children do)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(run_dir) in cmdline and " demo " not in cmdline:
            found.append(cmdline)
    return found


def test_ctrl_c_stops_the_bootstrap_and_every_peer(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    demo = subprocess.Popen([sys.executable, "-m", "crossgrad", "demo", "--nodes", "2",
                             "--partition", "iid", "--rounds", "100000", "--out", str(run_dir)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert demo.stdout is not None
        deadline = time.monotonic() + 180
        trained = False
        while time.monotonic() < deadline:  # wait until both peers are training
            line = demo.stdout.readline()
            if not line:
                break
            if "n0" in line and "n1" in line and "loss" in line:
                trained = True
                break
        assert trained, "the peers never started training"
        assert len(children_of_run(run_dir)) == 3  # bootstrap + 2 peers
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) == 130
        assert demo.stderr is not None and "interrupted" in demo.stderr.read()
        assert children_of_run(run_dir) == []
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()


def test_sigterm_while_waiting_for_the_run_to_assemble_exits_cleanly(tmp_path: Path) -> None:
    """A peer whose partners never come stops at once on SIGTERM, exit code 0."""
    boot = subprocess.Popen([sys.executable, "-m", "crossgrad", "bootstrap", "--nodes", "2",
                             "--partition", "iid", "--bind", "127.0.0.1:0"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peer = None
    try:
        assert boot.stdout is not None
        address = boot.stdout.readline().split("serving on ")[1].split()[0]
        peer = subprocess.Popen([sys.executable, "-m", "crossgrad", "--log-level", "INFO",
                                 "peer", "--id", "0", "--bootstrap", address, "--bind",
                                 "127.0.0.1:0", "--out", str(tmp_path / "p0")], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert peer.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the second Join (with the sample count) is logged
            line = peer.stdout.readline()
            if not line or "waiting for the assignment" in line:
                break
        peer.send_signal(signal.SIGTERM)
        assert peer.wait(timeout=30) == 0
        assert "stopped before the run assembled" in peer.stdout.read()
    finally:
        for proc in (peer, boot):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()

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

"""A 500 MB and a 2 GB model cross a link between two processes with default settings
(bench/large_model.py: a real PeerRuntime serving, a real GrpcNeighborhood fetching).

Bound on memory: each side needs two models' worth (the sender its parameters and the published
snapshot, the receiver its own parameters and the received model); the test allows 3x the model
above the process's memory before its model was built, the third for the allocator's slack and
the transfer's buffers (measured: 2.3-2.6x, docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BOUND = 3.0  # (peak RSS - RSS before the model) / model size, on either side


@pytest.mark.slow
def test_500_mb_and_2_gb_models_cross_a_link_within_the_memory_bound() -> None:
    command = [sys.executable, "bench/large_model.py", "--sizes", "500MB,2GB", "--json"]
    # Its own session: the bench and the sender and receiver it starts are killed together.
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=1200)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, err
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [round(r["model_bytes"] / 1e9, 1) for r in results] == [0.5, 2.0]
    for r in results:
        size = r["model_bytes"]
        assert r["equal"], r
        assert r["device"] == "cpu"
        for side in ("sender", "receiver"):
            used = r[f"{side}_peak_rss"] - r[f"{side}_base_rss"]
            assert used < BOUND * size, (side, used / size, r)

"""`crossgrad demo --nodes 16`: sixteen peer processes and a bootstrap on one machine finish a
run, and every peer ends with the very model the simulator computes for the same config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crossgrad.config import RunConfig
from peer import simulate
from peer.builder import validate_config

from procs import ProcessGroup, crossgrad

NODES = 16
ROUNDS = 6
# s: 17 processes importing torch, TLS handshakes and 6 rounds on a shared 2-core machine
# (measured: 42 s for 20 rounds at load average 3; 6 rounds took over 4 minutes at load 30).
TIMEOUT = 600.0


@pytest.mark.slow
def test_demo_with_16_peers_finishes_and_matches_the_simulator(procs: ProcessGroup,
                                                               tmp_path: Path) -> None:
    flags = {"nodes": NODES, "model": "mlp", "partition": "shards:2", "rounds": ROUNDS,
             "eval_every": 3, "device": "cpu"}
    args = [a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    proc = procs.run(crossgrad("demo", *args, "--quiet", "--out", str(tmp_path / "demo")),
                     timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{ROUNDS} rounds in" in proc.stdout
    summaries = [json.loads((tmp_path / "demo" / f"node-{i}" / "summary.json").read_text())
                 for i in range(NODES)]
    assert [s["state"] for s in summaries] == ["DONE"] * NODES
    assert all(s["round"] == ROUNDS and s["missed_neighbor_answers"] == 0 for s in summaries)
    config = validate_config(RunConfig(**flags))  # type: ignore[arg-type]
    simulated = simulate.run(config, tmp_path / "simulated")
    expected = json.loads((tmp_path / "simulated" / "summary.json").read_text())["digests"]
    assert [s["digest"] for s in summaries] == [expected[str(i)] for i in range(NODES)]
    assert simulated.final.mean > 0.1

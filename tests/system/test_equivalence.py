"""A networked run (bootstrap + 3 peers as processes on loopback, CPU) equals the simulator.

Both build every node from the same RunConfig with the same seed; the networked peers exchange
models and cross-gradients over real gRPC streams. Their final models must be bit-identical to
the simulated ones (compared through SHA-256 digests of the raw parameter bytes).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from crossgrad.config import RunConfig, validate
from peer import simulate

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("algorithm", "compressor"), [
    ("dpsgd", ""), ("cga", ""), ("ngc", ""), ("compcga", "sign"), ("compngc", "topk:0.05")])
def test_networked_run_equals_simulation(algorithm: str, compressor: str,
                                         tmp_path: Path) -> None:
    settings = dict(nodes=3, topology="ring", algorithm=algorithm, dataset="digits",
                    partition="sorted", rounds=6, batch_size=16, eval_every=3, seed=11,
                    device="cpu", compressor=compressor)
    if algorithm.endswith("ngc"):
        settings["alpha"] = 0.5  # both the received and the local cross-gradients are used
    config = validate(RunConfig(**settings))  # type: ignore[arg-type]
    simulated = simulate.run(config, tmp_path / "sim")
    expected = json.loads((tmp_path / "sim" / "summary.json").read_text())["digests"]

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items() if v != ""]
    proc = subprocess.run([sys.executable, "-m", "crossgrad", "demo", *flags,
                           "--out", str(tmp_path / "net"), "--timeout", "60"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "average model accuracy" in proc.stdout
    for i in range(config.nodes):
        summary = json.loads((tmp_path / "net" / f"node-{i}" / "summary.json").read_text())
        assert summary["round"] == config.rounds
        assert summary["missed_neighbor_answers"] == 0
        assert summary["digest"] == expected[str(i)], f"node {i} differs from the simulation"
        assert summary["bytes_sent"] > 0 and summary["bytes_received"] > 0
    assert simulated.final.mean == pytest.approx(
        sum(json.loads((tmp_path / "net" / f"node-{i}" / "summary.json").read_text())["accuracy"]
            for i in range(3)) / 3)


def test_compressed_cross_gradients_are_smaller_on_the_wire(tmp_path: Path) -> None:
    """The bytes counted on the wire: sign-compressed cross-gradients are ~32x smaller."""
    settings = dict(nodes=3, topology="ring", algorithm="compcga", compressor="sign",
                    dataset="digits", partition="sorted", rounds=3, batch_size=16, eval_every=3,
                    seed=5, device="cpu")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    proc = subprocess.run([sys.executable, "-m", "crossgrad", "demo", *flags,
                           "--out", str(tmp_path / "net")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "net" / "node-0" / "summary.json").read_text())
    received = summary["traffic"]["received"]
    model = sum(n for key, n in received.items() if key.endswith(":model"))
    cross = sum(n for key, n in received.items() if key.endswith(":cross_gradient"))
    assert model > 0 and cross > 0
    assert model / cross > 20, (model, cross)  # headers make small tensors cost more than 1/32

"""The batched simulator engine against the per-node one on a small run (docs/benchmarks.md,
"Scale"): same accuracy within noise, models close, the same run records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crossgrad.errors import ConfigError
from peer import batched, simulate

from runs import run_config

DEFAULTS: dict[str, object] = dict(
    nodes=6, topology="ring", algorithm="cga", dataset="digits", model="mlp",
    partition="shards:2", rounds=30, batch_size=16, eval_every=10, device="cpu", seed=7)

# Final mean test accuracy of the two engines may differ by this much: they sum in another
# order, so the models drift apart by float32 round-off over the rounds (measured: identical to
# 4 decimals after 30 rounds; one test sample of 364 is 0.0027).
ACCURACY_TOLERANCE = 0.01
# Largest |x_batched - x_nodes| relative to max |x_nodes| over every tensor of every node
# (measured below 1e-5 after 30 rounds).
PARAM_TOLERANCE = 1e-4


# dpsgd is the simpler step (no QP); it runs with the slow tests to keep the default suite fast.
@pytest.mark.parametrize("algorithm", [pytest.param("dpsgd", marks=pytest.mark.slow), "cga"])
def test_batched_engine_matches_the_per_node_engine(algorithm: str, tmp_path: Path) -> None:
    cfg = run_config(DEFAULTS, algorithm=algorithm)
    nodes = simulate.run(cfg, tmp_path / "nodes", count_bytes=True)
    stacked = batched.run(cfg, tmp_path / "batched", count_bytes=True)
    assert abs(nodes.final.mean - stacked.final.mean) <= ACCURACY_TOLERANCE
    assert abs(nodes.final.average_accuracy - stacked.final.average_accuracy) \
        <= ACCURACY_TOLERANCE
    assert stacked.final.mean > 0.15  # it learned something (chance is 0.1)
    for i in range(cfg.nodes):
        for a, b in zip(nodes.models[i], stacked.models[i], strict=True):
            scale = float(a.abs().max())
            assert float((a - b).abs().max()) <= PARAM_TOLERANCE * scale
    # The same bytes on the wire but for a few varint bytes of the checksums, which depend on
    # the values: every message has the shapes and header fields a peer would send.
    for i in range(cfg.nodes):
        a, b = nodes.traffic[i].per_kind(), stacked.traffic[i].per_kind()
        assert a.keys() == b.keys()
        assert all(abs(a[k][1] - b[k][1]) <= 1e-5 * a[k][1] for k in a)
    if algorithm == "cga":
        assert sum(stacked.qp_fallbacks.values()) == 0


def test_batched_run_writes_the_per_node_records(tmp_path: Path) -> None:
    cfg = run_config(DEFAULTS, rounds=4, eval_every=2)
    batched.run(cfg, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    rounds = [r for r in lines if r["kind"] == "round"]
    assert len(rounds) == cfg.nodes * cfg.rounds
    assert {r["node"] for r in rounds} == set(range(cfg.nodes))
    assert all(r["answered"] and r["missing"] == [] for r in rounds)
    assert all(set(r["phases"]) == {"compute", "wait", "transfer", "qp", "mix"} for r in rounds)
    assert all(r["stats"]["qp_calls"] > 0 for r in rounds)
    assert [r["round"] for r in lines if r["kind"] == "eval"] == [2, 4]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["engine"] == "batched" and len(summary["digests"]) == cfg.nodes
    models = torch.load(tmp_path / "run" / "models.pt", weights_only=True)
    assert sorted(models) == list(range(cfg.nodes))


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"algorithm": "ngc"}, "--engine batched runs dpsgd and cga, not ngc"),
    ({"algorithm": "compcga", "compressor": "topk:0.1"}, "not compcga"),
    ({"algorithm": "cga", "compressor": "fp16"}, "--compressor fp16 runs with --engine nodes"),
    ({"consensus_step": 0.5}, "model replicas"),
])
def test_unsupported_combinations_are_refused(overrides: dict[str, object], expected: str,
                                              tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=expected.replace("-", r"\-")):
        batched.run(run_config(DEFAULTS, **overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written

"""The node's round logic through the in-memory neighborhood, on the embedded digits data."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from crossgrad.config import RunConfig
from peer import simulate
from peer.node import Node, Params
from peer.rounds import PHASES
from peer.simulate import InMemoryNeighborhood

from runs import build, run_config

DEFAULTS: dict[str, object] = dict(
    nodes=5, topology="ring", algorithm="cga", dataset="digits",
    partition="modulo", rounds=6, batch_size=16, eval_every=3,
    device="cpu", seed=7)


def config(**overrides: object) -> RunConfig:
    return run_config(DEFAULTS, **overrides)


class CountingNeighborhood(InMemoryNeighborhood):
    def __init__(self, me: int, nodes: dict[int, Node]) -> None:
        super().__init__(me, nodes)
        self.cross_calls = 0

    def cross_gradients(self, round_: int, neighbors: Sequence[int]) -> dict[int, Params]:
        self.cross_calls += 1
        return super().cross_gradients(round_, neighbors)


def run_rounds(nodes: list[Node], rounds: int) -> dict[int, CountingNeighborhood]:
    by_id = {n.id: n for n in nodes}
    hoods = {n.id: CountingNeighborhood(n.id, by_id) for n in nodes}
    for _ in range(rounds):
        for n in nodes:
            n.publish()
        for n in nodes:
            n.run_round(hoods[n.id])
    return hoods


@pytest.mark.parametrize("algorithm", ["dpsgd", "cga", "ngc"])
def test_same_seed_gives_bit_identical_models(algorithm: str, tmp_path: Path) -> None:
    cfg = config(algorithm=algorithm)
    a = simulate.run(cfg, tmp_path / "a")
    b = simulate.run(cfg, tmp_path / "b")
    c = simulate.run(config(algorithm=algorithm, seed=8), tmp_path / "c")
    for i in range(cfg.nodes):
        for pa, pb, _pc in zip(a.models[i], b.models[i], c.models[i], strict=True):
            assert torch.equal(pa, pb)
        assert any(not torch.equal(pa, pc) for pa, pc in zip(a.models[i], c.models[i],
                                                             strict=True))
    digests = json.loads((tmp_path / "a" / "summary.json").read_text())["digests"]
    assert digests == json.loads((tmp_path / "b" / "summary.json").read_text())["digests"]


def test_run_directory_holds_config_metrics_and_models(tmp_path: Path) -> None:
    cfg = config(rounds=4, eval_every=2)
    result = simulate.run(cfg, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["algorithm"] == "cga"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r["kind"] == "round"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(rounds) == cfg.rounds * cfg.nodes
    assert [e["round"] for e in evals] == [2, 4]
    assert all(r["stats"]["qp_calls"] == 6 for r in rounds)  # one QP per tensor (mlp: 6)
    for r in rounds:  # the round's time split: in memory, nothing waits or crosses a wire
        phases = r["phases"]
        assert sorted(phases) == sorted(PHASES)
        assert phases["wait"] == phases["transfer"] == 0
        assert phases["compute"] > 0 and phases["qp"] > 0 and phases["mix"] > 0
        assert sum(phases.values()) <= r["seconds"]
    saved = torch.load(tmp_path / "models.pt", weights_only=True)
    assert all(torch.equal(saved[i][0], result.models[i][0]) for i in range(cfg.nodes))
    text = simulate.table(result)
    assert "average model accuracy" in text and "QP fallbacks" in text


def test_ngc_with_alpha_zero_makes_no_cross_gradient_requests() -> None:
    nodes = build(config(algorithm="ngc", alpha=0.0))
    hoods = run_rounds(nodes, 3)
    assert all(h.cross_calls == 0 for h in hoods.values())
    # It still used its neighbors' models on its own data (the model-variant term).
    assert all(n.has_cross_gradient(n.assignment.neighbors[0], 2) for n in nodes)
    nodes = build(config(algorithm="ngc", alpha=1.0))
    hoods = run_rounds(nodes, 3)
    assert all(h.cross_calls == 3 for h in hoods.values())


def test_dpsgd_full_graph_nodes_average_then_take_their_own_momentum_step() -> None:
    cfg = config(algorithm="dpsgd", topology="full", nodes=4, partition="iid")
    nodes = build(cfg)
    mu = cfg.momentum
    momentum = {n.id: [torch.zeros_like(p) for p in n.params] for n in nodes}
    by_id = {n.id: n for n in nodes}
    hoods = {n.id: InMemoryNeighborhood(n.id, by_id) for n in nodes}
    for t in range(3):
        for n in nodes:
            n.publish()
        before = {n.id: [p.clone() for p in n.params] for n in nodes}
        grads = {n.id: n.trainer.gradient(before[n.id], t, "self")[1] for n in nodes}
        for n in nodes:
            n.run_round(hoods[n.id])
        for n in nodes:
            lr = n.trainer.lr(t)
            for k, p in enumerate(n.params):
                momentum[n.id][k] = mu * momentum[n.id][k] + grads[n.id][k]
                avg = torch.stack([before[j][k] for j in by_id]).mean(dim=0)
                expected = avg - lr * (grads[n.id][k] + mu * momentum[n.id][k])
                torch.testing.assert_close(p, expected, atol=1e-6, rtol=0)


def test_a_missing_neighbor_gives_its_weight_to_the_node() -> None:
    nodes = build(config(algorithm="cga", nodes=3, topology="full", partition="iid"))
    by_id = {n.id: n for n in nodes}

    class Lossy(InMemoryNeighborhood):
        def models(self, round_: int, neighbors: Sequence[int]) -> dict[int, Params]:
            return {j: m for j, m in super().models(round_, neighbors).items() if j != 2}

    for n in nodes:
        n.publish()
    record = nodes[0].run_round(Lossy(0, by_id))
    assert record.answered == [1] and record.missing == [2]


class _Huge(InMemoryNeighborhood):
    """Node 2's model arrives multiplied by 1e30: finite, so it passes every wire check."""

    def models(self, round_: int, neighbors: Sequence[int]) -> dict[int, Params]:
        got = super().models(round_, neighbors)
        if 2 in got:
            got[2] = [p * 1e30 for p in got[2]]
        return got


class _Without2(InMemoryNeighborhood):
    def models(self, round_: int, neighbors: Sequence[int]) -> dict[int, Params]:
        return {j: m for j, m in super().models(round_, neighbors).items() if j != 2}


def _attacked_and_control(cfg: RunConfig, rounds: int,
                          caplog: pytest.LogCaptureFixture) -> None:
    """Node 0 gets node 2's model x 1e30 every round; a control run never gets node 2's model.
    Node 0 must end each round exactly as in the control run: finite, node 2 left out."""
    attacked, control = build(cfg), build(cfg)
    for _ in range(rounds):
        for nodes, hood in ((attacked, _Huge), (control, _Without2)):
            by_id = {n.id: n for n in nodes}
            for n in nodes:
                n.publish()
            record = nodes[0].run_round(hood(0, by_id))
            assert record.answered == [1] and record.missing == [2]
            for n in nodes[1:]:
                n.run_round(InMemoryNeighborhood(n.id, by_id))
        assert all(bool(torch.isfinite(p).all()) for p in attacked[0].params)
        for p, q in zip(attacked[0].params, control[0].params, strict=True):
            assert torch.equal(p, q)
    assert "node 2's model is left out of the round" in caplog.text


@pytest.mark.parametrize("algorithm", ["dpsgd", "cga", "compcga", "ngc", "compngc"])
def test_a_huge_finite_neighbor_model_is_left_out_not_fatal(
        algorithm: str, caplog: pytest.LogCaptureFixture) -> None:
    """Mixing in a finite but huge model would make the node's model huge and its gradients
    NaN (seen: dpsgd and ngc went NaN, cga stopped with 'training diverged', compcga with a
    refused compression); the node leaves such a model out of the round instead."""
    alpha = {"ngc": 0.5, "compngc": 0.5}.get(algorithm, 1.0)
    cfg = config(algorithm=algorithm, alpha=alpha, nodes=3, topology="full", partition="iid")
    _attacked_and_control(cfg, rounds=3, caplog=caplog)
    assert "holds values up to 1.25e+29" in caplog.text


@pytest.mark.parametrize("algorithm", ["ngc", "compngc"])
def test_a_neighbor_model_with_a_non_finite_local_gradient_is_left_out(
        algorithm: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The second line of defence, with the magnitude bound lifted: NGC's model-variant term
    computes the gradient of each neighbor's model on this node's data, and a NaN or Inf one
    leaves that neighbor out of the round."""
    import peer.node

    monkeypatch.setattr(peer.node, "PLAUSIBLE_RATIO", math.inf)
    cfg = config(algorithm=algorithm, alpha=0.5, nodes=3, topology="full", partition="iid")
    nodes = build(cfg)
    for n in nodes:
        n.publish()
    huge = [p * 1e30 for p in nodes[2].model(0)]
    grads = nodes[0].trainer.gradient(huge, 0, "probe")[1]
    assert not all(bool(torch.isfinite(g).all()) for g in grads)  # the premise
    _attacked_and_control(cfg, rounds=2, caplog=caplog)
    assert "finite" in caplog.text  # "NaN or Inf ... finite tensors" or "must be a finite number"

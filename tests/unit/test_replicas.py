"""Model replicas (CHOCO-style gossip) in the simulator: docs/algorithms.md, "Compressed models:
replicas". No sockets: the in-memory neighborhood of peer/simulate.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from crossgrad.config import RunConfig
from crossgrad.errors import ConfigError
from peer import simulate
from peer.builder import assignments, load_run_data, make_node, validate_config
from peer.node import Node, Params
from peer.simulate import InMemoryNeighborhood, simulate_round

ALGORITHMS = ("dpsgd", "cga", "compcga", "ngc", "compngc")


def config(**overrides: object) -> RunConfig:
    base: dict[str, object] = dict(nodes=5, topology="ring", dataset="digits", partition="modulo",
                                   rounds=4, batch_size=16, eval_every=4, device="cpu", seed=5)
    base.update(overrides)
    return validate_config(RunConfig(**base))  # type: ignore[arg-type]


def build(cfg: RunConfig) -> tuple[list[Node], dict[int, InMemoryNeighborhood]]:
    data = load_run_data(cfg)
    _, assigned = assignments(cfg)
    nodes = {i: make_node(cfg, data, i, assigned[i], torch.device("cpu"))
             for i in range(cfg.nodes)}
    hoods: dict[int, InMemoryNeighborhood] = {}
    hoods.update({i: InMemoryNeighborhood(i, nodes, peers=hoods) for i in nodes})
    return [nodes[i] for i in sorted(nodes)], hoods


def assert_replicas_agree(nodes: list[Node]) -> None:
    """Every neighbor's copy of x^_i equals i's own x^_i, bit for bit."""
    for node in nodes:
        assert node.replicas is not None
        for l in node.assignment.neighbors:
            other = nodes[l].replicas
            assert other is not None
            copy, own = other.latest_copy(node.id), node.replicas.current
            assert copy is not None
            assert (copy.round, copy.digest) == (own.round, own.digest)
            assert all(torch.equal(a, b) for a, b in zip(copy.params, own.params, strict=True))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("compressor", ["topk:0.1", "sign"])
def test_every_neighbor_holds_the_nodes_replica_bit_for_bit(algorithm: str,
                                                             compressor: str) -> None:
    nodes, hoods = build(config(algorithm=algorithm, model_compressor=compressor,
                                consensus_step=0.5))
    start = [p.clone() for p in nodes[0].params]
    for _ in range(4):
        simulate_round(nodes, hoods)
        assert_replicas_agree(nodes)
    assert nodes[0].replicas is not None
    own = nodes[0].replicas.own
    assert not all(torch.equal(a, b) for a, b in zip(own, start, strict=True))  # it moved
    # Q is lossy: the replica lags the model (what Q dropped is sent in later rounds).
    assert not all(torch.equal(a, b) for a, b in zip(own, nodes[0].params, strict=True))


def local_steps(reference: list[Node], xs: dict[int, Params], momentum: dict[int, Params],
                t: int, mu: float) -> dict[int, Params]:
    """dpsgd's local step written out: x - lr (g + mu m), m <- mu m + g (Nesterov), per node
    (`momentum` updated in place)."""
    half: dict[int, Params] = {}
    for node in reference:
        i = node.id
        _, grads = node.trainer.gradient(xs[i], t, "self")
        lr = node.trainer.lr(t)
        for m, g in zip(momentum[i], grads, strict=True):
            m.mul_(mu).add_(g)
        half[i] = [x - lr * (g + mu * m) for x, g, m in zip(xs[i], grads, momentum[i],
                                                               strict=True)]
    return half


def test_none_with_step_one_is_adapt_then_combine() -> None:
    """x_i^{t+1} = sum_l pi_il (x_l^t - lr (g_l + mu m_l)), written out here for dpsgd."""
    cfg = config(algorithm="dpsgd", model_compressor="none", consensus_step=1.0, rounds=6)
    nodes, hoods = build(cfg)
    reference, _ = build(config(algorithm="dpsgd", rounds=6))
    _, assigned = assignments(cfg)
    xs: dict[int, Params] = {n.id: [p.clone() for p in n.params] for n in reference}
    momentum = {i: [torch.zeros_like(p) for p in x] for i, x in xs.items()}
    for t in range(cfg.rounds):
        simulate_round(nodes, hoods)
        half = local_steps(reference, xs, momentum, t, cfg.momentum)
        xs = {i: [sum(w * half[l][k] for l, w in sorted(assigned[i].weights.items()))
                  for k in range(len(half[i]))] for i in half}  # type: ignore[misc]
        for node in nodes:  # equal up to the rounding of x^ + (x - x^), a few ulps a round
            for a, b in zip(node.params, xs[node.id], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def top_k(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """The k largest magnitudes of x kept, the rest zeroed; ties toward the lower index."""
    flat = x.reshape(-1)
    k = min(flat.numel(), max(1, round(fraction * flat.numel())))
    kept = torch.argsort(-flat.abs(), stable=True)[:k]
    out = torch.zeros_like(flat)
    out[kept] = flat[kept]
    return out.reshape(x.shape)


def test_topk_replicas_are_choco_sgd_written_out() -> None:
    """CHOCO-SGD (Koloskova et al. 2019, algorithm 2) with Nesterov momentum, written out with
    one replica per node: x^{t+1/2} = x - lr d; x^_i += topk(x^{t+1/2} - x^_i);
    x_i += gamma sum_l pi_il (x^_l - x^_i). Bit for bit over 12 rounds; top-k meets ties on
    this data within them (torch.topk's tie rule fails here), so the tie rule is checked too."""
    step, fraction = 0.1, 0.01
    cfg = config(algorithm="dpsgd", model_compressor=f"topk:{fraction}",
                 consensus_step=step, rounds=12)
    nodes, hoods = build(cfg)
    reference, _ = build(config(algorithm="dpsgd", rounds=12))
    _, assigned = assignments(cfg)
    xs: dict[int, Params] = {n.id: [p.clone() for p in n.params] for n in reference}
    hats: dict[int, Params] = {i: [p.clone() for p in x] for i, x in xs.items()}
    momentum = {i: [torch.zeros_like(p) for p in x] for i, x in xs.items()}
    for t in range(cfg.rounds):
        simulate_round(nodes, hoods)
        half = local_steps(reference, xs, momentum, t, cfg.momentum)
        hats = {i: [h + top_k(x - h, fraction) for x, h in zip(half[i], hats[i], strict=True)]
                for i in half}
        xs = {i: [x + step * sum(assigned[i].weights[l] * (hats[l][k] - hats[i][k])
                                 for l in sorted(assigned[i].neighbors))
                  for k, x in enumerate(half[i])] for i in half}
        for node in nodes:
            assert node.replicas is not None
            assert all(torch.equal(a, b) for a, b in zip(node.params, xs[node.id], strict=True))
            assert all(torch.equal(a, b)
                       for a, b in zip(node.replicas.own, hats[node.id], strict=True))


def test_a_checkpoint_mid_run_continues_bit_for_bit() -> None:
    cfg = config(algorithm="cga", model_compressor="topk:0.05", consensus_step=0.4)
    straight, hoods = build(cfg)
    for _ in range(4):
        simulate_round(straight, hoods)
    first, hoods = build(cfg)
    for _ in range(2):
        simulate_round(first, hoods)
    states = [n.state_dict() for n in first]
    resumed, hoods = build(cfg)
    for node, state in zip(resumed, states, strict=True):
        node.load_state_dict(state)
    for _ in range(2):
        simulate_round(resumed, hoods)
    for a, b in zip(straight, resumed, strict=True):
        assert a.round == b.round == 4
        assert all(torch.equal(x, y) for x, y in zip(a.params, b.params, strict=True))
        assert a.replicas is not None and b.replicas is not None
        assert all(torch.equal(x, y)
                   for x, y in zip(a.replicas.own, b.replicas.own, strict=True))
    assert_replicas_agree(resumed)


def test_a_checkpoint_without_replicas_is_refused_by_a_replica_node() -> None:
    from peer.training.checkpoint import CheckpointError

    plain, _ = build(config(algorithm="cga"))
    nodes, _ = build(config(algorithm="cga", model_compressor="sign", consensus_step=0.5))
    with pytest.raises(CheckpointError, match="replicas"):
        nodes[0].load_state_dict(plain[0].state_dict())


def kinds(result: simulate.SimulationResult) -> dict[str, int]:
    out: dict[str, int] = {}
    for traffic in result.traffic.values():
        for kind, (_, got) in traffic.per_kind().items():
            out[kind] = out.get(kind, 0) + got
    return out


def test_compressed_models_cut_the_model_bytes(tmp_path: Path) -> None:
    dense = kinds(simulate.run(config(algorithm="cga", rounds=3), tmp_path / "dense",
                               count_bytes=True))
    topk = kinds(simulate.run(config(algorithm="cga", rounds=3, model_compressor="topk:0.01",
                                     consensus_step=0.5), tmp_path / "topk", count_bytes=True))
    assert dense["model"] > 0 and "model_update" not in dense
    assert topk.get("model", 0) == 0  # no dense model travels under replicas
    assert 0 < topk["model_update"] < dense["model"] / 20
    # the same dense cross-gradients (their frames' varints differ by a byte or so)
    assert abs(topk["cross_gradient"] - dense["cross_gradient"]) < 100


@pytest.mark.parametrize(("overrides", "message"), [
    ({"model_compressor": "topk:0.1"}, "needs --consensus-step"),
    ({"model_compressor": "topk:0.1", "consensus_step": 1.5}, r"in \(0, 1\]"),
    ({"consensus_step": -0.1}, r"in \(0, 1\]"),
    ({"model_compressor": "zip", "consensus_step": 0.5}, "known compressors"),
])
def test_bad_replica_settings_fail_at_start(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(**overrides)



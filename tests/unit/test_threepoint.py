"""EF21 and CLAG for cross-gradients (--feedback, docs/algorithms.md, "Three-point compressors
for cross-gradients"), through the simulator and on the state object alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crossgrad.config import RunConfig
from crossgrad.errors import ConfigError
from peer import simulate
from peer.builder import assignments, load_run_data, make_node, validate_config
from peer.compression import make as make_compressor
from peer.compression.threepoint import ThreePoint, parse_feedback
from peer.node import Node
from peer.simulate import InMemoryNeighborhood

BASE: dict[str, object] = dict(nodes=5, topology="ring", dataset="digits", partition="modulo",
                               rounds=4, batch_size=16, eval_every=4, device="cpu", seed=5,
                               algorithm="compcga", compressor="topk:0.1")


def cfg(**overrides: object) -> RunConfig:
    return validate_config(RunConfig(**{**BASE, **overrides}))  # type: ignore[arg-type]


def nodes_of(config: RunConfig) -> dict[int, Node]:
    data = load_run_data(config)
    _, assigned = assignments(config)
    return {i: make_node(config, data, i, assigned[i], torch.device("cpu"))
            for i in range(config.nodes)}


def play(nodes: dict[int, Node], rounds: int) -> list[dict[str, float]]:
    """Run `rounds` rounds as the simulator does; every round's stats of every node."""
    hoods = {i: InMemoryNeighborhood(i, nodes) for i in nodes}
    stats: list[dict[str, float]] = []
    for _ in range(rounds):
        for n in nodes.values():
            n.publish()
        stats += [n.run_round(hoods[i]).stats for i, n in nodes.items()]
    return stats


def same(a: dict[int, Node], b: dict[int, Node]) -> bool:
    return all(torch.equal(x, y) for i in a for x, y in zip(a[i].params, b[i].params, strict=True))


@pytest.mark.parametrize("algorithm", ["compcga", "compngc"])
@pytest.mark.parametrize("feedback", ["ef21", "clag:0.5"])
def test_both_ends_hold_the_same_estimates_after_every_round(algorithm: str,
                                                            feedback: str) -> None:
    nodes = nodes_of(cfg(algorithm=algorithm, feedback=feedback))
    for _ in range(3):
        play(nodes, 1)
        checked = 0
        for i, node in nodes.items():
            for j in node.assignment.neighbors:
                for k in range(len(node.params)):
                    sent = nodes[j].threepoint.estimate("sent", i, k)  # type: ignore[union-attr]
                    got = node.threepoint.estimate("received", j, k)  # type: ignore[union-attr]
                    assert sent is not None and got is not None
                    assert torch.equal(sent, got), (i, j, k)
                    checked += 1
        assert checked == 5 * 2 * len(nodes[0].params)


@pytest.mark.parametrize("algorithm", ["compcga", "compngc"])
def test_clag_with_z_zero_is_ef21_bit_for_bit(algorithm: str) -> None:
    a, b = nodes_of(cfg(algorithm=algorithm, feedback="ef21")), nodes_of(
        cfg(algorithm=algorithm, feedback="clag:0"))
    play(a, 4)
    play(b, 4)
    assert same(a, b)


def test_ef21_changes_the_run_and_ef_stays_the_default() -> None:
    assert RunConfig().feedback == "ef"
    a, b = nodes_of(cfg()), nodes_of(cfg(feedback="ef21"))
    assert a[0].threepoint is None and a[0].feedback is not None
    play(a, 2)
    play(b, 2)
    assert not same(a, b)


def test_a_large_z_skips_and_the_skips_are_counted(tmp_path: Path) -> None:
    config = cfg(feedback="clag:1000", rounds=4, compressor="sign")
    result = simulate.run(config, tmp_path / "run", count_bytes=True)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    tensors = 5 * 2 * 4 * len(result.models[0])  # nodes x neighbors x rounds x tensors
    skips = sum(summary["cross_skips"].values())
    assert 0 < skips < tensors  # the first round always sends (h = y = 0 gives ||g||^2 > 0)
    assert skips + sum(summary["cross_sent"].values()) == tensors
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert sum(r["cross_skips"] for r in rounds if r["kind"] == "round") == skips
    # skipped tensors cost a few bytes: fewer cross-gradient bytes than ef21
    ef21 = simulate.run(cfg(feedback="ef21", rounds=4, compressor="sign"), tmp_path / "ef21",
                        count_bytes=True)

    def cross_bytes(r: simulate.SimulationResult) -> int:
        return sum(t.per_kind()["cross_gradient"][1] for t in r.traffic.values())

    assert cross_bytes(result) < cross_bytes(ef21)


def test_a_checkpoint_round_trip_continues_bit_identically() -> None:
    config = cfg(feedback="clag:0.5")
    straight, resumed = nodes_of(config), nodes_of(config)
    play(straight, 2)
    play(resumed, 2)
    states = {i: n.state_dict() for i, n in resumed.items()}
    assert states[0]["threepoint"]["received"]
    fresh = nodes_of(config)
    for i, n in fresh.items():
        n.load_state_dict(states[i])
    play(straight, 2)
    play(fresh, 2)
    assert same(straight, fresh)
    for i in fresh:
        assert fresh[i].threepoint.skips == straight[i].threepoint.skips  # type: ignore[union-attr]


def test_a_checkpoint_of_another_feedback_is_refused() -> None:
    from peer.training.checkpoint import CheckpointError

    ef = nodes_of(cfg())
    three = nodes_of(cfg(feedback="ef21"))
    with pytest.raises(CheckpointError, match="--feedback"):
        three[0].load_state_dict(ef[0].state_dict())


@pytest.mark.parametrize(("value", "words"), [
    ("ef22", "not known"), ("clag", "not known"), ("clag:-1", ">= 0"), ("clag:nan", ">= 0"),
    ("clag:x", ">= 0"), ("ef21:3", "not known")])
def test_bad_values_are_refused(value: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        cfg(feedback=value)


def test_feedback_other_than_ef_needs_a_compressed_algorithm() -> None:
    with pytest.raises(ConfigError, match="compcga and compngc"):
        cfg(algorithm="cga", feedback="ef21")


def test_the_state_object_skips_only_above_the_threshold() -> None:
    tp = ThreePoint(make_compressor("none"), parse_feedback("clag:1"))
    g = torch.ones(8)
    record, delta, h = tp.send(1, 0, g, seed=0)  # y = h = 0: ||g||^2 > ||g||^2 fails? no: equal
    assert record is None and tp.skips == 1 and torch.equal(h, torch.zeros(8))
    record, delta, h = tp.send(1, 0, 2 * g, seed=0)  # ||2g||^2 = 32 > ||g||^2 = 8: sent
    assert record is not None and torch.equal(h, 2 * g)
    assert torch.equal(tp.receive(1, 0, delta), h)

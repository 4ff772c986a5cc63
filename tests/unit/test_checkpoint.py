"""Checkpoints: the file format and the store (atomic writes, keep, damaged files), and the
round trip save, load, continue == an uninterrupted run, bit for bit, on the embedded digits."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from crossgrad.config import RunConfig
from peer import simulate
from peer.metrics import digest
from peer.node import Node
from peer.simulate import InMemoryNeighborhood
from peer.training.checkpoint import (
    MAGIC,
    Checkpoint,
    CheckpointError,
    CheckpointStore,
    decode,
    encode,
    make_checkpoint,
    run_identity,
)

from runs import build, run_config


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The digits MLP gains nothing from intra-op threads, and on a busy shared machine their
    waiting costs 40x (measured here: 6 ms per gradient with one thread, 260 ms with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DEFAULTS: dict[str, object] = dict(
    nodes=3, topology="ring", algorithm="cga", dataset="digits",
    partition="iid", rounds=4, batch_size=8, eval_every=3,
    device="cpu", seed=7)


def config(**overrides: object) -> RunConfig:
    return run_config(DEFAULTS, **overrides)


def run_rounds(nodes: list[Node], rounds: int) -> None:
    by_id = {n.id: n for n in nodes}
    for _ in range(rounds):
        for n in nodes:
            n.publish()
        for n in nodes:
            n.run_round(InMemoryNeighborhood(n.id, by_id))


def equal(a: object, b: object) -> bool:
    """Recursive equality; tensors bit for bit, with dtype."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


class Crash(Exception):
    """Stands for the process dying mid-run."""


def crash_at(round_: int) -> Callable[[str], None]:
    def say(line: str) -> None:
        if line.startswith(f"round {round_:>5}/"):
            raise Crash
    return say


# ---- the round trip ------------------------------------------------------------------------
VARIANTS = [("dpsgd", ""), ("cga", ""), ("ngc", ""), ("compcga", "sign"), ("compcga", "topk:0.1"),
            ("compngc", "sign"), ("compngc", "topk:0.1")]


@pytest.mark.parametrize(("algorithm", "compressor"), VARIANTS)
def test_save_load_continue_equals_an_uninterrupted_run(algorithm: str, compressor: str,
                                                        tmp_path: Path) -> None:
    # alpha 0.5: NGC uses both its received and its local (model-variant) cross-gradients.
    cfg = config(algorithm=algorithm, compressor=compressor,
                 alpha=0.5 if "ngc" in algorithm else 1.0)
    whole = simulate.run(cfg, tmp_path / "whole")
    with pytest.raises(Crash):  # checkpoints at round 2, then dies after round 3
        simulate.run(cfg, tmp_path / "died", progress=crash_at(3), checkpoint_every=2)
    saved = sorted(p.name for p in (tmp_path / "died" / "checkpoints").iterdir())
    assert saved == [f"node-{i}-round-000000002.ckpt" for i in range(cfg.nodes)]
    lines: list[str] = []
    resumed = simulate.run(cfg, tmp_path / "resumed", progress=lines.append,
                           resume_from=tmp_path / "died" / "checkpoints")
    assert any("resumed every node from round 2" in line for line in lines)
    for i in range(cfg.nodes):
        assert digest(resumed.models[i]) == digest(whole.models[i])
    assert round_records(tmp_path / "resumed") == round_records(tmp_path / "whole")[2:]


def round_records(run_dir: Path) -> list[dict[int, tuple[float, list[int]]]]:
    """Per round: {node: (train loss, answered neighbors)} from metrics.jsonl."""
    out: dict[int, dict[int, tuple[float, list[int]]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "round":
            out.setdefault(record["round"], {})[record["node"]] = (record["loss"],
                                                                   record["answered"])
    return [out[r] for r in sorted(out)]


def test_a_damaged_newest_checkpoint_resumes_every_node_from_the_previous(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(rounds=5, eval_every=5)
    whole = simulate.run(cfg, tmp_path / "whole")
    with pytest.raises(Crash):  # checkpoints at rounds 2 and 4, then dies after round 5
        simulate.run(cfg, tmp_path / "died", progress=crash_at(5), checkpoint_every=2)
    ckpts = tmp_path / "died" / "checkpoints"
    newest = ckpts / "node-1-round-000000004.ckpt"
    newest.write_bytes(newest.read_bytes()[:-10])  # node 1 only: the others have round 4
    with caplog.at_level(logging.WARNING, logger="peer.training.checkpoint"):
        resumed = simulate.run(cfg, tmp_path / "resumed", resume_from=ckpts)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(newest) in warnings[0] and "truncated" in warnings[0]
    assert all(digest(resumed.models[i]) == digest(whole.models[i]) for i in range(cfg.nodes))


def test_resume_without_a_usable_checkpoint_says_so(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no usable checkpoint of node 0") as err:
        simulate.run(config(), tmp_path / "out", resume_from=tmp_path / "empty")
    assert "\n" not in str(err.value)


def test_a_node_loaded_from_a_file_continues_as_if_never_stopped(tmp_path: Path) -> None:
    cfg = config(algorithm="compcga", compressor="topk:0.1")
    reference, nodes = build(cfg), build(cfg)
    run_rounds(reference, 5)
    run_rounds(nodes, 2)
    store = CheckpointStore(tmp_path, node_id=0)
    store.save(make_checkpoint(cfg, 0, nodes[0].assignment.epoch, nodes[0].state_dict()))
    fresh = build(cfg)[0]
    found = store.latest(run_identity(cfg), accept=lambda c: fresh.load_state_dict(c.state))
    assert found is not None and found.round == 2 and fresh.round == 2
    nodes[0] = fresh  # node 0 restarted; its neighbors ran on
    run_rounds(nodes, 3)
    for mine, ref in zip(nodes, reference, strict=True):
        assert digest(mine.params) == digest(ref.params)
        a, b = mine.state_dict(), ref.state_dict()
        a_stats, b_stats = a.pop("stats"), b.pop("stats")
        assert equal(a, b)  # momentum, duals, every error-feedback memory
        assert a_stats.pop("qp_seconds") > 0 and b_stats.pop("qp_seconds") > 0  # a timing
        assert a_stats == b_stats == {"qp_calls": 5 * len(a["params"])}


@pytest.mark.parametrize(("algorithm", "compressor", "parts"), [
    ("compcga", "topk:0.1", ("momentum", "previous_v", "self_memory")),
    ("compngc", "sign", ("momentum", "self_memory")),
    ("ngc", "", ("momentum",)),
])
def test_every_checkpointed_tensor_is_restored(algorithm: str, compressor: str,
                                               parts: tuple[str, ...], tmp_path: Path) -> None:
    cfg = config(algorithm=algorithm, compressor=compressor, alpha=0.5)
    nodes = build(cfg)
    run_rounds(nodes, 2)
    state = nodes[0].state_dict()
    for part in parts:  # the premise: every memory holds something
        assert state["algorithm"][part], part
    assert (state["feedback"] is None) == (compressor == "")
    assert state["feedback"] is None or len(state["feedback"]) == 2 * len(state["params"])
    path = CheckpointStore(tmp_path, 0).save(make_checkpoint(cfg, 0, 0, state))
    fresh = build(cfg)[0]
    fresh.load_state_dict(CheckpointStore(tmp_path, 0).read(path).state)
    assert equal(fresh.state_dict(), state)
    assert fresh.algorithm.stats == nodes[0].algorithm.stats
    assert fresh.latest_published() == -1  # the old rounds' caches are gone


def test_a_state_of_another_model_is_refused_and_changes_nothing() -> None:
    nodes = build(config(algorithm="cga"))
    state = nodes[0].state_dict()
    target = build(config(algorithm="cga"))[0]
    before = target.state_dict()
    bad = {**state, "params": [torch.zeros(3, 3), *state["params"][1:]]}
    with pytest.raises(CheckpointError, match=r"params\[0\]: expected .* found \(3, 3\)"):
        target.load_state_dict(bad)
    run_rounds(nodes, 1)  # now with momentum and previous duals
    state = nodes[0].state_dict()
    momentum = state["algorithm"]["momentum"]
    bad = {**state, "algorithm": {**state["algorithm"],
                                  "momentum": [m.double() for m in momentum]}}
    with pytest.raises(CheckpointError, match=r"algorithm momentum\[0\]: .*float64"):
        target.load_state_dict(bad)
    assert equal(target.state_dict(), before)


MALFORMED: dict[str, tuple[dict[str, Any], str]] = {
    "names not a list": ({"names": 5}, "parameters 5"),
    "params not a list": ({"params": "x"}, "params: expected a list of 6 tensors"),
    "negative round": ({"round": -1}, "round -1"),
    "stats not a table": ({"stats": [1]}, "stats"),
    "feedback where none": ({"feedback": {"0.0": torch.zeros(1)}}, "no error feedback"),
    "rng of another size": ({"torch_rng": torch.zeros(3, dtype=torch.uint8)}, "torch_rng"),
    "momentum not tensors": ({"algorithm": {"momentum": [1] * 6}}, "momentum[0]: expected a "
                             "tensor"),
    "duals of no tensor": ({"algorithm": {"momentum": None, "previous_v": {99: torch.zeros(2)}}},
                           "previous_v: key 99"),
    "a part missing": ({"feedback": ...}, "missing ['feedback']"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_state_gets_one_line_naming_the_part(case: str) -> None:
    cfg = config(algorithm="cga")
    node = build(cfg)[0]
    change, reason = MALFORMED[case]
    state = {**node.state_dict(), **change}
    state = {k: v for k, v in state.items() if v is not ...}
    with pytest.raises(CheckpointError) as err:
        node.load_state_dict(state)
    assert reason in str(err.value) and "\n" not in str(err.value)


# ---- the store -------------------------------------------------------------------------------
def fake_state(round_: int, value: float = 1.0) -> dict[str, Any]:
    return {"round": round_, "params": [torch.full((2, 3), value)], "note": "x"}


def checkpoint(round_: int, node_id: int = 0, run_id: str = "run-a",
               state: dict[str, Any] | None = None) -> Checkpoint:
    return Checkpoint(node_id=node_id, round=round_, epoch=1, run_id=run_id,
                      config={"rounds": 10}, state=state or fake_state(round_))


def test_encode_decode_round_trip() -> None:
    ckpt = checkpoint(5)
    data = encode(ckpt)
    assert data.startswith(MAGIC)
    back = decode(data)
    assert dataclasses.replace(back, state={}) == dataclasses.replace(ckpt, state={})
    assert equal(back.state, ckpt.state)


def test_only_the_newest_two_remain_and_no_temp_file(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpt", node_id=3)
    other = CheckpointStore(tmp_path / "ckpt", node_id=31)  # a prefix of no concern
    other.save(checkpoint(1, node_id=31))
    for r in (2, 4, 6, 8):
        path = store.save(checkpoint(r, node_id=3))
        assert path.name == f"node-3-round-{r:09d}.ckpt"
    assert [p.name for p in store.paths()] == ["node-3-round-000000006.ckpt",
                                               "node-3-round-000000008.ckpt"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "node-3-round-000000006.ckpt", "node-3-round-000000008.ckpt",
        "node-31-round-000000001.ckpt"]
    latest = store.latest("run-a")
    assert latest is not None and latest.round == 8 and latest.epoch == 1


def test_a_crash_before_the_rename_leaves_a_temp_file_that_is_ignored(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, node_id=0)
    store.save(checkpoint(2))
    # What a crash between write and rename leaves: the temp file of round 4, half written.
    temp = tmp_path / ".node-0-round-000000004.ckpt.abc123.tmp"
    temp.write_bytes(encode(checkpoint(4))[:50])
    assert [p.name for p in store.paths()] == ["node-0-round-000000002.ckpt"]
    latest = store.latest()
    assert latest is not None and latest.round == 2
    store.save(checkpoint(4))  # the next save clears the leftover
    assert not temp.exists()


def test_a_save_after_resuming_from_an_older_one_drops_the_abandoned_newer(
        tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, node_id=0)
    for r in (4, 6):
        store.save(checkpoint(r))
    store.save(checkpoint(5))  # resumed from 4 (6 did not verify), saved at 5
    assert [p.name for p in store.paths()] == ["node-0-round-000000004.ckpt",
                                               "node-0-round-000000005.ckpt"]


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _directory_instead(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _rewrite(path: Path, ckpt: Checkpoint) -> None:
    path.write_bytes(encode(ckpt))  # valid checksum, wrong content


DAMAGE: dict[str, tuple[Callable[[Path], object], str]] = {
    "flipped payload byte": (lambda p: _flip(p, p.stat().st_size - 100), "checksum mismatch"),
    "flipped header byte": (lambda p: _flip(p, len(MAGIC) + 2), "header"),
    "flipped magic": (lambda p: _flip(p, 0), "not a crossgrad checkpoint"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-7]), "truncated"),
    "truncated in the header": (lambda p: p.write_bytes(p.read_bytes()[:len(MAGIC) + 10]),
                                "truncated"),
    "empty": (lambda p: p.write_bytes(b""), "not a crossgrad checkpoint"),
    "garbage": (lambda p: p.write_bytes(bytes(range(256)) * 8), "not a crossgrad checkpoint"),
    "another run": (lambda p: _rewrite(p, checkpoint(6, run_id="run-b")), "another run"),
    "another node": (lambda p: _rewrite(p, checkpoint(6, node_id=2)), "node 2's state"),
    "another round": (lambda p: _rewrite(p, checkpoint(7)), "holds round 7"),
    "a pickled object": (lambda p: _rewrite(p, checkpoint(6, state={"round": 6, "x": Path("/")})),
                         "payload not readable"),
    "unreadable": (_directory_instead, "unreadable"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_is_reported_in_one_line_and_the_previous_used(
        damage: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = CheckpointStore(tmp_path, node_id=0)
    store.save(checkpoint(4, state=fake_state(4, 4.0)))
    newest = store.save(checkpoint(6))
    harm, reason = DAMAGE[damage]
    harm(newest)
    with caplog.at_level(logging.WARNING, logger="peer.training.checkpoint"):
        found = store.latest("run-a")
    assert found is not None and found.round == 4
    assert torch.equal(found.state["params"][0], torch.full((2, 3), 4.0))
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, caplog.text
    message = lines[0].getMessage()
    assert str(newest) in message and reason in message and "\n" not in message
    assert lines[0].exc_info is None  # no traceback


def test_every_bad_file_gets_its_line_and_none_usable_gives_none(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = CheckpointStore(tmp_path, node_id=0, keep=3)
    for r in (2, 4, 6):
        store.save(checkpoint(r))
    for path in store.paths():
        path.write_bytes(path.read_bytes()[:-1])
    with caplog.at_level(logging.WARNING, logger="peer.training.checkpoint"):
        assert store.latest() is None
    assert len(caplog.records) == 3
    assert CheckpointStore(tmp_path / "absent", node_id=0).latest() is None


def test_wrong_shapes_with_a_valid_checksum_are_skipped_via_accept(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(algorithm="dpsgd")
    node = build(cfg)[0]
    good = node.state_dict()
    store = CheckpointStore(tmp_path, node_id=0)
    store.save(make_checkpoint(cfg, 0, 0, good))
    wrong = {**good, "round": 3, "params": [torch.zeros(5, 5), *good["params"][1:]]}
    newest = store.save(make_checkpoint(cfg, 0, 0, wrong))
    target = build(cfg)[0]
    with caplog.at_level(logging.WARNING, logger="peer.training.checkpoint"):
        found = store.latest(run_identity(cfg), accept=lambda c: target.load_state_dict(c.state))
    assert found is not None and found.round == 0
    assert len(caplog.records) == 1
    assert str(newest) in caplog.records[0].getMessage()
    assert "params[0]" in caplog.records[0].getMessage()


def test_run_identity_ignores_the_local_settings_only() -> None:
    a = config()
    assert run_identity(a) == run_identity(dataclasses.replace(a, data_dir="/x", device="auto"))
    assert run_identity(a) != run_identity(dataclasses.replace(a, seed=8))
    assert run_identity(a) != run_identity(dataclasses.replace(a, rounds=5))
    assert len(run_identity(a)) == 64

"""A networked run (bootstrap + 3 peers as processes on loopback, CPU) equals the simulator.

Both build every node from the same RunConfig with the same seed; the networked peers exchange
models and cross-gradients over real gRPC streams. Their final models must be bit-identical to
the simulated ones (compared through SHA-256 digests of the raw parameter bytes).

`crossgrad demo` runs with mutual TLS (certificates made in its run directory); the same run in
plaintext (--insecure) and over TLS with a token ends bit-identical too: the transport's
security changes nothing a node computes.

On the fast gradient path (`--memory-format auto` picks channels_last for a conv model on the
CPU: peer/training/layout.py) the networked run equals the simulation bit for bit as well.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from crossgrad.certs import make_run_certificates
from crossgrad.cluster import LocalCluster
from crossgrad.config import RunConfig
from peer import simulate
from peer.builder import validate_config
from peer.metrics import digest

from procs import ProcessGroup, crossgrad


def check_bytes_by_kind(summary: dict[str, Any], algorithm: str) -> None:
    """summary.json's bytes per kind: both kinds listed, summing to the totals and to the
    per-(peer, kind) counters; models always cross, cross-gradients for all but dpsgd."""
    by_kind = summary["bytes_by_kind"]
    assert sorted(by_kind) == ["cross_gradient", "model"]
    for side, total in (("sent", "bytes_sent"), ("received", "bytes_received")):
        assert sum(n[side] for n in by_kind.values()) == summary[total]
        for kind, n in by_kind.items():
            assert n[side] == sum(v for key, v in summary["traffic"][side].items()
                                  if key.endswith(f":{kind}"))
    assert by_kind["model"]["sent"] > 0 and by_kind["model"]["received"] > 0
    cross = by_kind["cross_gradient"]
    if algorithm == "dpsgd":
        assert cross == {"sent": 0, "received": 0}
    else:
        assert cross["sent"] > 0 and cross["received"] > 0


@pytest.mark.parametrize(("algorithm", "compressor"), [
    ("dpsgd", ""), ("cga", ""), ("ngc", ""), ("compcga", "sign"), ("compngc", "topk:0.05")])
def test_networked_run_equals_simulation(algorithm: str, compressor: str, procs: ProcessGroup,
                                         tmp_path: Path) -> None:
    settings = dict(nodes=3, topology="ring", algorithm=algorithm, dataset="digits",
                    partition="sorted", rounds=6, batch_size=16, eval_every=3, seed=11,
                    device="cpu", compressor=compressor)
    if algorithm.endswith("ngc"):
        settings["alpha"] = 0.5  # both the received and the local cross-gradients are used
    config = validate_config(RunConfig(**settings))  # type: ignore[arg-type]
    simulated = simulate.run(config, tmp_path / "sim")
    expected = json.loads((tmp_path / "sim" / "summary.json").read_text())["digests"]

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items() if v != ""]
    proc = procs.run(crossgrad("demo", *flags, "--out", str(tmp_path / "net"), "--timeout", "60"),
                     timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "average model accuracy" in proc.stdout
    assert "xgrad recv" in proc.stdout  # the final table's bytes per message kind
    summaries = [json.loads((tmp_path / "net" / f"node-{i}" / "summary.json").read_text())
                 for i in range(config.nodes)]
    for i, summary in enumerate(summaries):
        assert summary["round"] == config.rounds
        assert summary["missed_neighbor_answers"] == 0
        assert summary["digest"] == expected[str(i)], f"node {i} differs from the simulation"
        assert summary["bytes_sent"] > 0 and summary["bytes_received"] > 0
        check_bytes_by_kind(summary, algorithm)
    for kind in ("model", "cross_gradient"):  # every byte one node sent, another received
        assert (sum(s["bytes_by_kind"][kind]["sent"] for s in summaries)
                == sum(s["bytes_by_kind"][kind]["received"] for s in summaries)), kind
    assert simulated.final.mean == pytest.approx(
        sum(json.loads((tmp_path / "net" / f"node-{i}" / "summary.json").read_text())["accuracy"]
            for i in range(3)) / 3)


@pytest.mark.slow
def test_the_fast_gradient_path_runs_bit_identical_networked(procs: ProcessGroup,
                                                             tmp_path: Path) -> None:
    settings = dict(nodes=3, topology="ring", algorithm="cga", dataset="digits", model="cganet",
                    partition="sorted", rounds=4, batch_size=16, eval_every=4, seed=11,
                    device="cpu", memory_format="auto")
    config = validate_config(RunConfig(**settings))  # type: ignore[arg-type]
    simulate.run(config, tmp_path / "sim")
    expected = json.loads((tmp_path / "sim" / "summary.json").read_text())["digests"]
    contiguous = simulate.run(replace(config, memory_format="contiguous"), tmp_path / "ref")
    # The layouts differ in the last bits, so equal digests below mean the same path was taken...
    assert digest(contiguous.models[0]) != expected["0"]
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    proc = procs.run(crossgrad("demo", *flags, "--out", str(tmp_path / "net"), "--timeout", "60"),
                     timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for i in range(config.nodes):  # ...and every node of the run takes the same one
        summary = json.loads((tmp_path / "net" / f"node-{i}" / "summary.json").read_text())
        assert summary["digest"] == expected[str(i)], f"node {i} differs from the simulation"


def test_compressed_cross_gradients_are_smaller_on_the_wire(procs: ProcessGroup,
                                                            tmp_path: Path) -> None:
    """The bytes counted on the wire: sign-compressed cross-gradients are ~32x smaller."""
    settings = dict(nodes=3, topology="ring", algorithm="compcga", compressor="sign",
                    dataset="digits", partition="sorted", rounds=3, batch_size=16, eval_every=3,
                    seed=5, device="cpu")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    proc = procs.run(crossgrad("demo", *flags, "--out", str(tmp_path / "net")), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "net" / "node-0" / "summary.json").read_text())
    check_bytes_by_kind(summary, "compcga")
    model = summary["bytes_by_kind"]["model"]["received"]
    cross = summary["bytes_by_kind"]["cross_gradient"]["received"]
    assert model > 0 and cross > 0
    assert model / cross > 20, (model, cross)  # headers make small tensors cost more than 1/32


@pytest.mark.parametrize("mode", ["insecure", "token"])
def test_plaintext_and_token_runs_equal_the_simulation(mode: str, tmp_path: Path) -> None:
    config = validate_config(RunConfig(nodes=3, topology="ring", algorithm="cga", dataset="digits",
                                partition="sorted", rounds=6, batch_size=16, eval_every=3,
                                seed=11, device="cpu"))
    simulate.run(config, tmp_path / "sim")
    expected = json.loads((tmp_path / "sim" / "summary.json").read_text())["digests"]
    certs = None if mode == "insecure" else make_run_certificates(tmp_path / "certs", 3)
    with LocalCluster(config, tmp_path / "net", certs=certs, token=mode == "token",
                      peer_args=["--timeout", "60"]) as cluster:
        cluster.start_bootstrap()
        cluster.start_peers()
        assert cluster.wait_peers(300) == {0: 0, 1: 0, 2: 0}
    for i in range(3):
        log = (tmp_path / "net" / f"node-{i}.log").read_text()
        assert ("PLAINTEXT" in log) == (mode == "insecure")
        assert ("callers authenticated by the shared token" in log) == (mode == "token")
        summary = json.loads((tmp_path / "net" / f"node-{i}" / "summary.json").read_text())
        assert summary["missed_neighbor_answers"] == 0
        assert summary["digest"] == expected[str(i)], f"node {i} differs ({mode})"


COMPRESSED_ROUNDS = [  # (algorithm, flags): model replicas and three-point feedback
    pytest.param("cga", dict(model_compressor="topk:0.1", consensus_step=0.5),
                 id="cga+topk models"),
    pytest.param("dpsgd", dict(model_compressor="sign", consensus_step=0.3),
                 id="dpsgd+sign models", marks=pytest.mark.slow),
    pytest.param("ngc", dict(model_compressor="topk:0.1", consensus_step=0.5, alpha=0.5),
                 id="ngc+topk models", marks=pytest.mark.slow),
    pytest.param("compcga", dict(compressor="topk:0.1", feedback="ef21",
                                 model_compressor="none", consensus_step=1.0),
                 id="compcga+ef21+none models", marks=pytest.mark.slow),
    pytest.param("compngc", dict(compressor="sign", feedback="clag:1", alpha=0.5,
                                 model_compressor="sign", consensus_step=0.5),
                 id="compngc+clag+sign models", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("algorithm", "extra"), COMPRESSED_ROUNDS)
def test_a_compressed_round_over_the_network_equals_the_simulation(
        algorithm: str, extra: dict[str, object], procs: ProcessGroup, tmp_path: Path) -> None:
    """Replicas and estimates over real processes: the same models bit for bit, and the same
    bytes per message kind as the simulator counts (model updates instead of models)."""
    settings: dict[str, object] = dict(nodes=3, topology="ring", algorithm=algorithm,
                                       dataset="digits", partition="sorted", rounds=5,
                                       batch_size=16, eval_every=5, seed=11, device="cpu",
                                       **extra)
    config = validate_config(RunConfig(**settings))  # type: ignore[arg-type]
    simulated = simulate.run(config, tmp_path / "sim", count_bytes=True)
    expected = json.loads((tmp_path / "sim" / "summary.json").read_text())["digests"]
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    proc = procs.run(crossgrad("demo", *flags, "--out", str(tmp_path / "net"), "--timeout", "60",
                               "--insecure", "--quiet"), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for i in range(3):
        summary = json.loads((tmp_path / "net" / f"node-{i}" / "summary.json").read_text())
        assert summary["digest"] == expected[str(i)], f"node {i} differs from the simulation"
        assert summary["missed_neighbor_answers"] == 0 and summary["resyncs"] == 0
        received = {k: n["received"] for k, n in summary["bytes_by_kind"].items() if n["received"]}
        counted = {k: got for k, (_, got) in simulated.traffic[i].per_kind().items() if got}
        assert received == counted, i
        assert "model" not in received and received["model_update"] > 0
    if str(extra.get("feedback", "ef")).startswith("clag"):
        assert "cross-gradient tensors skipped (clag)" in proc.stdout

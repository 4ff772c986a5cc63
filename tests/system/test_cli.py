"""The real `crossgrad` command in a subprocess: bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from procs import ProcessGroup, crossgrad

TIMEOUT = 120.0  # s: importing torch and training a few rounds on a busy 2-core machine


CASES = [
    (["--algorithm", "sgd"], "known algorithms: cga, compcga, compngc, dpsgd, ngc"),
    (["--topology", "star"], "known topologies: bipartite, erdos-renyi:p, file:PATH, full"),
    (["--partition", "random"], "known partitions: dirichlet:A, iid, modulo, shards:C, sorted"),
    (["--dataset", "imagenet"], "known datasets: cifar10, digits, fashion-mnist, mnist"),
    (["--model", "gpt"], "known models: cganet, cnn5, mlp, resnet20, vgg11"),
    (["--partition", "shards:11"], "more classes per node than classes"),
    (["--nodes", "5000", "--partition", "iid"], "more than the 1433 training samples"),
    (["--dataset", "mnist", "--data-dir", "{empty}"], "train-images-idx3-ubyte"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--lr", "fast"], "invalid float value: 'fast'"),
    (["--topology", "regular:3"], "regular:d needs n*d even"),
    (["--nodes", "3"], "partition 'modulo' needs the number of nodes (3) to divide"),
    (["--algorithm", "compcga", "--feedback", "clag:-1"], "Z must be a finite number >= 0"),
    (["--engine", "batched", "--algorithm", "ngc"], "--engine batched runs dpsgd and cga, not"),
]


@pytest.mark.parametrize(("args", "expected"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_clear_line_and_exit_2(args: list[str], expected: str,
                                                procs: ProcessGroup, tmp_path: Path) -> None:
    args = [a.replace("{empty}", str(tmp_path)) for a in args]
    proc = procs.run(crossgrad("simulate", *args, "--out", str(tmp_path / "run")),
                     timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr


def test_missing_data_files_are_named(procs: ProcessGroup, tmp_path: Path) -> None:
    proc = procs.run(crossgrad("simulate", "--dataset", "mnist", "--data-dir", str(tmp_path)),
                     timeout=TIMEOUT)
    assert proc.returncode == 2
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        assert name in proc.stderr


def test_simulate_runs_and_prints_the_table(procs: ProcessGroup, tmp_path: Path) -> None:
    proc = procs.run(crossgrad("simulate", "--rounds", "4", "--eval-every", "2", "--batch-size",
                               "16", "--out", str(tmp_path / "run")), timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "samples" in out  # the per-node partition summary printed at start
    assert "round     2/4" in out and "round     4/4" in out
    for word in ("average model accuracy", "consensus distance", "QP fallbacks", "mean", "min"):
        assert word in out
    for name in ("config.json", "metrics.jsonl", "summary.json", "models.pt"):
        assert (tmp_path / "run" / name).exists()


def test_toml_config_env_and_flags_in_order(procs: ProcessGroup, tmp_path: Path) -> None:
    (tmp_path / "run.toml").write_text('[run]\nalgorithm = "ngc"\nrounds = 3\nbatch-size = 8\n')
    env = {**os.environ, "CROSSGRAD_ROUNDS": "2"}
    proc = procs.run(crossgrad("simulate", "--config", str(tmp_path / "run.toml"),
                               "--batch-size", "16", "--quiet", "--out", str(tmp_path / "out")),
                     timeout=TIMEOUT, env=env)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (saved["algorithm"], saved["rounds"], saved["batch_size"]) == ("ngc", 2, 16)


@pytest.mark.parametrize("command", ["demo", "bootstrap"])
def test_networked_runs_refuse_three_point_feedback_without_compressed_cross_gradients(
        command: str, procs: ProcessGroup, tmp_path: Path) -> None:
    """--feedback ef21 / clag:Z apply to compcga and compngc (docs/algorithms.md): one line."""
    extra = ["--out", str(tmp_path / "run")] if command == "demo" else ["--bind", "127.0.0.1:0"]
    proc = procs.run(crossgrad(command, "--algorithm", "cga", "--feedback", "ef21", *extra),
                     timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "compcga and compngc" in lines[0], proc.stderr

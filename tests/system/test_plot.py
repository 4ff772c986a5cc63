"""`crossgrad plot` through the real CLI: on two simulate runs, and on a finished demo (which
plots itself at the end). The PNGs are checked as files; the numbers behind them against the
records, worked out here without crossgrad/series.py's help where the runs give a reference."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from crossgrad.cli import main
from crossgrad.config import RunConfig
from crossgrad.plots import FILES
from crossgrad.series import accuracy_by_bytes, band, evaluations, read_run
from peer import simulate

from procs import ProcessGroup, crossgrad

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk of a PNG file; fails on anything else."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR", f"{path} is not a PNG"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def assert_plots(out: Path) -> None:
    for name in FILES:
        width, height = png_size(out / name)
        assert 500 <= width <= 2000 and 300 <= height <= 1000, (name, width, height)
        assert (out / name).stat().st_size > 15_000, name  # axes, text and lines, not a blank


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_plot_of_two_simulate_runs(procs: ProcessGroup, tmp_path: Path) -> None:
    runs = {}
    for algorithm in ("dpsgd", "compcga"):
        config = RunConfig(nodes=2, algorithm=algorithm, rounds=6, eval_every=3, batch_size=16,
                           device="cpu", seed=3)
        runs[algorithm] = simulate.run(config, tmp_path / algorithm, count_bytes=True)
    proc = procs.run(crossgrad("plot", str(tmp_path / "dpsgd"), str(tmp_path / "compcga"),
                               "--out", str(tmp_path / "plots")), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(tmp_path / "plots" / name) for name in FILES]
    assert_plots(tmp_path / "plots")

    for algorithm, result in runs.items():
        lines = records(tmp_path / algorithm / "metrics.jsonl")
        evals = [r for r in lines if r["kind"] == "eval"]
        acc = band(evaluations(lines, "accuracy"))
        # the simulator wrote its own mean and min over the nodes: the band agrees
        assert acc.rounds == [e["round"] for e in evals] == [3, 6]
        assert acc.mean == pytest.approx([e["mean"] for e in evals])
        assert acc.low == pytest.approx([e["min"] for e in evals])
        assert acc.high == pytest.approx([max(e["accuracy"].values()) for e in evals])
        assert acc.mean[-1] == pytest.approx(result.final.mean)
        # bytes at the last round: what the run counted, per node, in all
        mib, _ = accuracy_by_bytes(lines)
        received = [sum(t.snapshot()["received"].values()) for t in result.traffic.values()]
        assert mib[-1] * 1024 * 1024 == pytest.approx(sum(received) / len(received))
    assert read_run(tmp_path / "compcga").label == "compcga (sign)"
    compressed = accuracy_by_bytes(records(tmp_path / "compcga" / "metrics.jsonl"))[0][-1]
    assert compressed > accuracy_by_bytes(records(tmp_path / "dpsgd" / "metrics.jsonl"))[0][-1]


def test_plot_of_a_directory_that_is_no_run_is_one_line_and_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"crossgrad plot: error: {tmp_path} holds no metrics.jsonl nor node-*/metrics.jsonl; "
        "give the run directory that crossgrad simulate, demo or peer wrote (--out)")


@pytest.mark.slow  # a demo of 2 peers: 10 s on an idle machine, a minute on a busy one
def test_a_finished_demo_plots_itself_and_crossgrad_plot_reads_it(
        procs: ProcessGroup, tmp_path: Path) -> None:
    run = tmp_path / "demo"
    demo = procs.run(crossgrad("demo", "--nodes", "2", "--rounds", "8", "--eval-every", "4",
                               "--partition", "iid", "--insecure", "--out", str(run)),
                     timeout=300)
    assert demo.returncode == 0, demo.stderr
    lines = demo.stdout.splitlines()
    assert any(line.startswith("average model accuracy") for line in lines)
    assert lines[-1] == "plots: " + ", ".join(str(run / "plots" / name) for name in FILES)
    assert_plots(run / "plots")

    proc = procs.run(crossgrad("plot", str(run)), timeout=120)  # default: RUN/plots
    assert proc.returncode == 0, proc.stderr
    assert_plots(run / "plots")
    # by hand: each peer's own evaluations and summary
    per_peer = [[r for r in records(run / f"node-{i}" / "metrics.jsonl") if r["kind"] == "eval"]
                for i in range(2)]
    acc = band(evaluations(read_run(run).records, "accuracy"))
    assert acc.rounds == [4, 8]
    for k in range(2):
        values = [peer[k]["accuracy"] for peer in per_peer]
        assert (acc.low[k], acc.high[k]) == (min(values), max(values))
        assert acc.mean[k] == pytest.approx(sum(values) / 2)
    summaries = [json.loads((run / f"node-{i}" / "summary.json").read_text()) for i in range(2)]
    assert acc.mean[-1] == pytest.approx(sum(s["accuracy"] for s in summaries) / 2)
    mib, _ = accuracy_by_bytes(read_run(run).records)
    # the last round record's bytes; the summary also counts what was served after it
    assert 0 < mib[-1] * 1024 * 1024 <= sum(s["bytes_received"] for s in summaries) / 2

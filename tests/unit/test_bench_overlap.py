"""bench/overlap.py's summary of a run directory: ratios and the share of time spent computing,
from metrics.jsonl records written here with known phases."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is no package of the wheel
from bench import overlap


def record(round_: int, seconds: float, compute: float, served: float, qp: float = 0.0,
           mix: float = 0.0) -> str:
    return json.dumps({"kind": "round", "round": round_, "seconds": seconds,
                       "served_seconds": served,
                       "phases": {"compute": compute, "qp": qp, "mix": mix, "wait": 0.0,
                                  "transfer": 0.0, "checkpoint": 0.0}})


def test_the_summary_of_two_nodes(tmp_path: Path) -> None:
    rows = {0: [record(0, 9.0, 1.0, 1.0),  # the warm-up round: left out
                record(1, 1.0, 0.5, 0.5), record(2, 2.0, 0.5, 0.5)],
            1: [record(0, 9.0, 1.0, 1.0),
                record(1, 1.0, 0.4, 0.4, qp=0.1, mix=0.1), record(2, 4.0, 1.0, 1.0)]}
    for node, lines in rows.items():
        (tmp_path / f"node-{node}").mkdir()
        (tmp_path / f"node-{node}" / "metrics.jsonl").write_text(
            "\n".join([*lines, json.dumps({"kind": "final", "round": 3})]) + "\n")
    f = overlap.summarize(tmp_path, nodes=2, warmup=1, load=0.5)
    assert f.rounds == 4
    # round / compute per round: 1.0, 2.0, 1.0, 2.0; compute 1, 1, 1, 2 over 1 + 2 + 1 + 4 s
    assert f.ratio_median == pytest.approx(1.5)
    assert f.ratio_p90 == pytest.approx(2.0)
    assert f.grad_median == pytest.approx((1.0 / 0.8 + 2.0) / 2)  # gradients leave QP and mix out
    assert f.computing == pytest.approx(5.0 / 8.0)
    assert f.wall == pytest.approx(1.5) and f.load == 0.5

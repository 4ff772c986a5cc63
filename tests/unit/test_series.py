"""Run records to plotted series (crossgrad/series.py): both layouts, checked against numbers
worked out by hand from the records written here."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from crossgrad.errors import DataError
from crossgrad.series import (
    MIB,
    accuracy_by_bytes,
    band,
    evaluations,
    labels,
    phase_means,
    read_run,
    received_bytes,
    round_values,
)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def round_record(node: int, t: int, seconds: float, received: int | None = None,
                 **extra: Any) -> dict[str, Any]:
    record = {"kind": "round", "node": node, "round": t, "loss": 1.0, "seconds": seconds, **extra}
    if received is not None:
        record["bytes"] = [0, received]
    return record


# A simulator's run: 3 nodes, evaluations after rounds 2 and 4 with every node's figures.
SIMULATED = [
    *(round_record(i, t, 0.1 * (i + 1), received=1000 * (t + 1) * (i + 1))
      for t in range(4) for i in range(3)),
    {"kind": "eval", "round": 2, "accuracy": {"0": 0.5, "1": 0.7, "2": 0.6},
     "loss": {"0": 2.0, "1": 1.0, "2": 1.5}, "mean": 0.6, "min": 0.5},
    {"kind": "eval", "round": 4, "accuracy": {"0": 0.8, "1": 0.9, "2": 0.7},
     "loss": {"0": 0.5, "1": 0.25, "2": 0.75}, "mean": 0.8, "min": 0.7},
]


def test_a_simulated_run_gives_the_mean_and_the_min_max_band_per_round() -> None:
    acc = band(evaluations(SIMULATED, "accuracy"))
    assert acc.rounds == [2, 4]
    assert acc.mean == pytest.approx([0.6, 0.8])  # (0.5+0.7+0.6)/3, (0.8+0.9+0.7)/3
    assert (acc.low, acc.high) == ([0.5, 0.7], [0.7, 0.9])
    loss = band(evaluations(SIMULATED, "loss"))
    assert loss.mean == pytest.approx([1.5, 0.5]) and loss.low == [1.0, 0.25]
    seconds = band(round_values(SIMULATED, "seconds"))
    assert seconds.rounds == [1, 2, 3, 4]  # round record t counts t + 1 rounds done
    assert seconds.mean == pytest.approx([0.2] * 4) and seconds.high == pytest.approx([0.3] * 4)


def test_accuracy_against_bytes_pairs_each_evaluation_with_the_mean_bytes_so_far() -> None:
    mib, acc = accuracy_by_bytes(SIMULATED)
    # after round 2 (record t=1) nodes hold 2000, 4000, 6000 bytes: mean 4000
    assert mib == pytest.approx([4000 / MIB, 8000 / MIB])
    assert acc.rounds == [2, 4] and acc.mean == pytest.approx([0.6, 0.8])


def test_a_band_over_peers_that_miss_rounds_uses_those_present() -> None:
    b = band({0: {5: 0.2, 10: 0.4}, 1: {10: 0.8}})
    assert (b.rounds, b.mean, b.low, b.high) == ([5, 10], [0.2, pytest.approx(0.6)], [0.2, 0.4],
                                                 [0.2, 0.8])


def test_a_restarted_peers_bytes_go_on_from_where_they_were() -> None:
    records = [round_record(0, 0, 1.0, 100), round_record(0, 1, 1.0, 250),
               round_record(0, 2, 1.0, 40),  # a new process: counters from 0
               round_record(0, 3, 1.0, 90)]
    assert received_bytes(records) == {0: {1: 100, 2: 250, 3: 290, 4: 340}}


def test_phases_are_averaged_over_every_round_and_absent_means_none() -> None:
    assert phase_means(SIMULATED) is None
    records = [round_record(0, 0, 1.0, phases={"compute": 0.2, "wait": 0.6}),
               round_record(1, 0, 1.0, phases={"compute": 0.4, "wait": 0.2})]
    assert phase_means(records) == pytest.approx({"compute": 0.3, "wait": 0.4})


def demo_dir(tmp_path: Path) -> Path:
    """The demo's layout: node-I/ per peer; peer 1 was resumed and evaluates round 2 twice."""
    run = tmp_path / "demo"
    for i, (accs, config) in enumerate([((0.4, 0.6), True), ((0.5, 0.7), False)]):
        records = [round_record(i, t, 0.5, received=10 * (t + 1)) for t in range(4)]
        records += [{"kind": "eval", "round": 2, "loss": 1.0, "accuracy": accs[0]},
                    {"kind": "eval", "round": 4, "loss": 0.5, "accuracy": accs[1]}]
        if i == 1:
            records.insert(2, {"kind": "eval", "round": 2, "loss": 9.0, "accuracy": 0.1})
            records.append({"kind": "event", "event": "resume", "round": 2})
        write_jsonl(run / f"node-{i}" / "metrics.jsonl", records)
        if config:
            (run / f"node-{i}" / "config.json").write_text(
                json.dumps({"algorithm": "compcga", "compressor": "sign", "nodes": 2}))
    return run


def test_the_demo_layout_reads_as_one_run_with_a_node_per_directory(tmp_path: Path) -> None:
    run = read_run(demo_dir(tmp_path))
    assert run.label == "compcga (sign)"
    accuracy = evaluations(run.records, "accuracy")
    assert accuracy == {0: {2: 0.4, 4: 0.6}, 1: {2: 0.5, 4: 0.7}}  # the later round-2 kept
    b = band(accuracy)
    assert b.mean == pytest.approx([0.45, 0.65]) and (b.low, b.high) == ([0.4, 0.6], [0.5, 0.7])


def test_a_simulate_directory_and_labels_that_collide(tmp_path: Path) -> None:
    for name in ("a", "b"):
        write_jsonl(tmp_path / name / "metrics.jsonl", SIMULATED)
        (tmp_path / name / "config.json").write_text(json.dumps({"algorithm": "cga",
                                                                "compressor": "none"}))
    runs = [read_run(tmp_path / "a"), read_run(tmp_path / "b")]
    assert len(runs[0].records) == len(SIMULATED)
    assert labels(runs) == ["cga (none) [a]", "cga (none) [b]"]
    assert labels(runs[:1]) == ["cga (none)"]


def test_a_torn_last_line_is_left_out_and_a_bad_line_elsewhere_is_an_error(
        tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    good = json.dumps(round_record(0, 0, 1.0))
    path.write_text(f"{good}\n{good[:20]}")  # killed mid-write
    assert len(read_run(tmp_path).records) == 1
    path.write_text(f"{good[:20]}\n{good}\n")
    with pytest.raises(DataError, match=r"metrics.jsonl:1: not a JSON record"):
        read_run(tmp_path)
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=r"expected a JSON object with a \"kind\""):
        read_run(tmp_path)


def test_a_directory_without_records_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"holds no metrics\.jsonl"):
        read_run(tmp_path)
    with pytest.raises(DataError, match="is not a directory"):
        read_run(tmp_path / "missing")


def test_an_empty_band_is_empty() -> None:
    b = band({})
    assert b.rounds == [] and not any(math.isnan(v) for v in b.mean)

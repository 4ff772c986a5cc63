"""Run directories read back as series to plot: pure functions from records to numbers.

Two layouts hold the same records (peer/records.py writes both, in one schema):

    simulate     RUN/config.json, RUN/metrics.jsonl with every node's records
    demo         RUN/node-I/config.json, RUN/node-I/metrics.jsonl, one per peer
    (a single deployed peer's directory is the simulate layout with one node)

What differs is an evaluation: the simulator writes one line per evaluation with every node's
accuracy and loss ({"accuracy": {"0": 0.9, ...}}), a peer one line with its own ({"accuracy":
0.9}). `evaluations` turns both into node -> round -> value.

Rounds: a round record's "round" is the round it ran, from 0; an evaluation's is the number of
rounds done. Series here count rounds done, so round record t is plotted at t + 1, where an
evaluation after it is.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossgrad.errors import DataError

log = logging.getLogger(__name__)

Record = dict[str, Any]
PerNode = dict[int, dict[int, float]]  # node -> rounds done -> value
MIB = 1024 * 1024


@dataclass(frozen=True)
class Band:
    """A quantity over the peers at each round: the mean, and the min-max band around it."""

    rounds: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]


@dataclass(frozen=True)
class RunRecords:
    """One run directory's configuration (config.json of its first node) and every record."""

    path: Path
    config: dict[str, Any]
    records: list[Record]

    @property
    def label(self) -> str:
        """Algorithm and cross-gradient compressor, as the legend shows them."""
        algorithm = self.config.get("algorithm", "?")
        return f"{algorithm} ({self.config.get('compressor') or 'none'})"


def read_metrics(path: Path) -> list[Record]:
    """The records of one metrics.jsonl. A torn last line (a process killed mid-write) is left
    out with a warning; a bad line anywhere else is a DataError naming it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records: list[Record] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                log.warning("%s:%d: torn last line left out (%s)", path, number, exc)
                continue
            raise DataError(f"{path}:{number}: not a JSON record ({exc}); metrics.jsonl holds "
                            "one JSON object per line") from exc
        if not isinstance(record, dict) or "kind" not in record:
            raise DataError(f"{path}:{number}: expected a JSON object with a \"kind\", got "
                            f"{line[:80]!r}")
        records.append(record)
    return records


def _with_node(records: list[Record]) -> list[Record]:
    """A peer's evaluations carry no node id: give them the node of its round records."""
    nodes = {r["node"] for r in records if r["kind"] == "round" and "node" in r}
    if len(nodes) != 1:
        return records
    node = nodes.pop()
    return [{**r, "node": node} if r["kind"] == "eval" and "node" not in r else r
            for r in records]


def read_run(path: Path) -> RunRecords:
    """Read a run directory in either layout (see the module docstring)."""
    if not path.is_dir():
        raise DataError(f"{path} is not a directory; give the run directory that crossgrad "
                        "simulate, demo or peer wrote (--out)")
    files = [path / "metrics.jsonl"] if (path / "metrics.jsonl").is_file() else sorted(
        path.glob("node-*/metrics.jsonl"), key=lambda p: (len(p.parent.name), p.parent.name))
    if not files:
        raise DataError(f"{path} holds no metrics.jsonl nor node-*/metrics.jsonl; give the run "
                        "directory that crossgrad simulate, demo or peer wrote (--out)")
    records = [r for f in files for r in _with_node(read_metrics(f))]
    configs = [f.parent / "config.json" for f in files if (f.parent / "config.json").is_file()]
    config = json.loads(configs[0].read_text()) if configs else {}
    return RunRecords(path=path, config=config, records=records)


def evaluations(records: Iterable[Record], field: str) -> PerNode:
    """node -> rounds done -> the evaluation's `field` ("accuracy" or "loss"), from either
    layout. A round evaluated twice (a peer resumed from an earlier checkpoint) keeps the
    later value."""
    out: PerNode = {}
    for r in records:
        if r["kind"] != "eval" or field not in r:
            continue
        value = r[field]
        per_node = value.items() if isinstance(value, dict) else [(r.get("node", 0), value)]
        for node, v in per_node:
            out.setdefault(int(node), {})[int(r["round"])] = float(v)
    return out


def round_values(records: Iterable[Record], field: str) -> PerNode:
    """node -> rounds done -> a round record's numeric `field` (e.g. "seconds", "loss")."""
    out: PerNode = {}
    for r in records:
        if r["kind"] == "round" and field in r:
            out.setdefault(int(r["node"]), {})[int(r["round"]) + 1] = float(r[field])
    return out


def received_bytes(records: Iterable[Record]) -> PerNode:
    """node -> rounds done -> bytes received so far (round records' "bytes": [sent, received]).

    Received, not sent: the simulator counts only what arrives, and every byte sent is some
    peer's byte received. A restarted peer counts from 0 again; its counts go on from where
    they were, so the series only grows."""
    out: PerNode = {}
    for node, series in _raw_received(records).items():
        offset, last, grown = 0.0, 0.0, {}
        for round_ in sorted(series):
            if series[round_] < last:  # the counters of a new process
                offset += last
            last = series[round_]
            grown[round_] = offset + last
        out[node] = grown
    return out


def _raw_received(records: Iterable[Record]) -> PerNode:
    out: PerNode = {}
    for r in records:
        if r["kind"] == "round" and "bytes" in r:
            out.setdefault(int(r["node"]), {})[int(r["round"]) + 1] = float(r["bytes"][1])
    return out


def band(per_node: Mapping[int, Mapping[int, float]]) -> Band:
    """Mean, min and max over the nodes that have a value at each round, rounds in order."""
    rounds = sorted({t for series in per_node.values() for t in series})
    rows = [[series[t] for series in per_node.values() if t in series] for t in rounds]
    return Band(rounds=rounds, mean=[sum(v) / len(v) for v in rows],
                low=[min(v) for v in rows], high=[max(v) for v in rows])


def accuracy_by_bytes(records: list[Record]) -> tuple[list[float], Band]:
    """Accuracy against bytes on the wire: at each evaluated round where bytes were counted,
    the mean over peers of MiB received so far (x) and the accuracy band (y)."""
    accuracy = band(evaluations(records, "accuracy"))
    received = band(received_bytes(records))
    at = dict(zip(received.rounds, received.mean, strict=True))
    keep = [i for i, t in enumerate(accuracy.rounds) if t in at]
    mib = [at[accuracy.rounds[i]] / MIB for i in keep]
    return mib, Band(rounds=[accuracy.rounds[i] for i in keep],
                     mean=[accuracy.mean[i] for i in keep], low=[accuracy.low[i] for i in keep],
                     high=[accuracy.high[i] for i in keep])


def phase_means(records: Iterable[Record]) -> dict[str, float] | None:
    """Mean seconds per round of each phase in round records' "phases" ({name: seconds}), over
    every round of every peer; None when the run recorded no per-phase split."""
    totals: dict[str, float] = {}
    count = 0
    for r in records:
        if r["kind"] == "round" and isinstance(r.get("phases"), dict):
            count += 1
            for name, seconds in r["phases"].items():
                totals[name] = totals.get(name, 0.0) + float(seconds)
    return {name: total / count for name, total in totals.items()} if count else None


def labels(runs: list[RunRecords]) -> list[str]:
    """Each run's legend label; runs that would share one get their directory's name too."""
    plain = [run.label for run in runs]
    return [f"{label} [{run.path.name}]" if plain.count(label) > 1 else label
            for run, label in zip(runs, plain, strict=True)]

"""`crossgrad plot`: PNGs of one or more finished runs, drawn headless (matplotlib's Agg canvas).

    curves.png   test accuracy and test loss per round: the mean over peers, the min-max band
    bytes.png    test accuracy against MiB received per peer (bytes on the wire)
    time.png     seconds per round, and its split into phases when the run recorded one

One line and one colour per run, the same in every figure, labelled by algorithm and
compressor. The numbers come from crossgrad/series.py; this module only draws them.
Figures are built on matplotlib.figure.Figure, not pyplot: no global state, no display needed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from crossgrad.series import (
    Band,
    RunRecords,
    accuracy_by_bytes,
    band,
    evaluations,
    labels,
    phase_means,
    read_run,
    round_values,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

FILES = ("curves.png", "bytes.png", "time.png")
DPI = 120


def _figure(width: float, height: float, columns: int) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure  # imported here: a second to load, only for plots

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, columns, squeeze=False)[0]
    return fig, list(axes)


def _draw_band(ax: Axes, x: Sequence[float], b: Band, label: str, colour: str) -> None:
    ax.plot(x, b.mean, color=colour, label=label, linewidth=1.6, marker="." if len(x) < 40
            else None)
    ax.fill_between(x, b.low, b.high, color=colour, alpha=0.2, linewidth=0)


def _note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", wrap=True,
            fontsize=9, color="0.3")


def _colours(n: int) -> list[str]:
    return [f"C{i % 10}" for i in range(n)]


def _title(runs: Sequence[RunRecords]) -> str:
    """What the runs share: data set, partition, nodes, topology (one run's, when they differ)."""
    keys = ("dataset", "partition", "nodes", "topology")
    seen = {k: {str(run.config.get(k, "?")) for run in runs} for k in keys}
    parts = [f"{k} {', '.join(sorted(v))}" for k, v in seen.items()]
    return "; ".join(parts)


def draw_curves(runs: Sequence[RunRecords], names: Sequence[str], path: Path) -> Path:
    fig, (acc_ax, loss_ax) = _figure(11, 4.2, 2)
    for run, name, colour in zip(runs, names, _colours(len(runs)), strict=True):
        for ax, field in ((acc_ax, "accuracy"), (loss_ax, "loss")):
            b = band(evaluations(run.records, field))
            if b.rounds:
                _draw_band(ax, b.rounds, b, name, colour)
    acc_ax.set(xlabel="round", ylabel="test accuracy",
               title="test accuracy (mean over peers, band: min-max)")
    loss_ax.set(xlabel="round", ylabel="test loss",
                title="test loss (mean over peers, band: min-max)")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(_title(runs), fontsize=10)
    fig.savefig(path)
    return path


def draw_bytes(runs: Sequence[RunRecords], names: Sequence[str], path: Path) -> Path:
    fig, (ax,) = _figure(6.5, 4.2, 1)
    missing = []
    for run, name, colour in zip(runs, names, _colours(len(runs)), strict=True):
        mib, b = accuracy_by_bytes(run.records)
        if b.rounds:
            _draw_band(ax, mib, b, name, colour)
        else:
            missing.append(name)
    ax.set(xlabel="MiB received per peer (mean over peers)", ylabel="test accuracy",
           title="test accuracy against bytes on the wire")
    ax.grid(alpha=0.3)
    if len(missing) < len(runs):
        ax.legend(fontsize=8)
    if missing:
        _note(ax, "no bytes recorded by: " + ", ".join(missing))
    fig.suptitle(_title(runs), fontsize=10)
    fig.savefig(path)
    return path


def draw_time(runs: Sequence[RunRecords], names: Sequence[str], path: Path) -> Path:
    """Left: seconds per round over the run. Right: mean seconds per round of each run, split
    into the recorded phases; a run without a split shows its total as one bar, and says so."""
    fig, (line_ax, bar_ax) = _figure(11, 4.2, 2)
    colours = _colours(len(runs))
    unsplit = []
    phase_names: list[str] = []
    splits = []
    for run, name, colour in zip(runs, names, colours, strict=True):
        seconds = band(round_values(run.records, "seconds"))
        if seconds.rounds:
            _draw_band(line_ax, seconds.rounds, seconds, name, colour)
        phases = phase_means(run.records)
        if phases is None:
            unsplit.append(name)
            phases = {"round (no split)": sum(seconds.mean) / max(1, len(seconds.mean))}
        phase_names += [p for p in phases if p not in phase_names]
        splits.append(phases)
    line_ax.set_ylim(bottom=0)
    line_ax.set(xlabel="round", ylabel="seconds",
                title="seconds per round (mean over peers, band: min-max)")
    line_ax.grid(alpha=0.3)
    line_ax.legend(fontsize=8)
    y = list(range(len(runs)))
    left = [0.0] * len(runs)
    for k, phase in enumerate(phase_names):
        widths = [split.get(phase, 0.0) for split in splits]
        bar_ax.barh(y, widths, left=left, color="0.6" if phase == "round (no split)"
                    else f"C{k % 10}", label=phase)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    bar_ax.set_yticks(y, labels=list(names))
    bar_ax.invert_yaxis()
    bar_ax.set(xlabel="mean seconds per round", title="round time by phase")
    bar_ax.legend(fontsize=8, loc="lower right")
    if unsplit:  # say so: a grey bar is the whole round, not a phase
        who = "these runs" if len(unsplit) == len(runs) else ", ".join(unsplit)
        bar_ax.set_title(f"round time by phase\n(no per-phase split recorded by {who}: "
                         "the whole round)", fontsize=9)
    fig.suptitle(_title(runs), fontsize=10)
    fig.savefig(path)
    return path


def plot_runs(run_dirs: Sequence[Path], out: Path) -> list[Path]:
    """Read every run directory and write FILES under `out`; the paths written."""
    runs = [read_run(Path(d)) for d in run_dirs]
    names = labels(runs)
    out.mkdir(parents=True, exist_ok=True)
    written = [draw_curves(runs, names, out / FILES[0]), draw_bytes(runs, names, out / FILES[1]),
               draw_time(runs, names, out / FILES[2])]
    log.info("plotted %d run(s) into %s", len(runs), out)
    return written

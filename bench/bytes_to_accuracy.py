"""Bytes on the wire to reach dense cga's accuracy: model replicas, EF21 and CLAG against dense cga.

    python bench/bytes_to_accuracy.py --data-dir DATA/mnist    # 2 seeds, ~16 min on 2 cores
    python bench/bytes_to_accuracy.py --rounds 300 --replica-rounds 0 --jobs 8

5 nodes, ring, `modulo` partition, model `mlp`, real MNIST, in the simulator with bytes counted
exactly as a networked node would put them on the wire (peer/simulate.py, count_bytes). The
configurations: dense cga; compcga with top-k 1% and with the scaled sign; compcga (top-k 1%
cross-gradients) with model replicas, top-k 1% and sign models (`--model-compressor`, consensus
step tuned); compcga (top-k 1%) with `--feedback ef21` and `clag:Z` (Z tuned); and the best
combination of both (the better model compressor with its step, and the better of ef21 and clag).

Target: the mean over seeds of dense cga's final mean node accuracy, minus 0.5 points. For each
run, the total bytes received by all nodes (every byte sent is some node's byte received), all
message kinds, until the first evaluation at which the mean node accuracy reaches the target;
"-" when it never does. Tuning runs (one seed, `--tune-rounds`) pick the consensus step and Z:
the candidate with the fewest bytes to within 1 point of the best candidate's final accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from crossgrad.config import RunConfig  # noqa: E402
from crossgrad.series import band, evaluations, read_run, received_bytes  # noqa: E402
from peer import simulate  # noqa: E402
from peer.builder import validate_config  # noqa: E402
from peer.training.datasets import data_home  # noqa: E402

MIB = 1024 * 1024
TOPK = "topk:0.01"


@dataclass(frozen=True)
class Spec:
    """One configuration of the table; `name` labels its rows, runs and plot line."""

    name: str
    algorithm: str = "compcga"
    compressor: str = TOPK
    model_compressor: str = ""
    consensus_step: float = 0.0
    feedback: str = "ef"


@dataclass(frozen=True)
class Curve:
    """One run read back: per evaluation, total bytes on the wire so far and mean accuracy."""

    spec: Spec
    seed: int
    rounds: list[int]
    total_bytes: list[float]
    accuracy: list[float]

    def bytes_to(self, target: float) -> float | None:
        return next((b for b, a in zip(self.total_bytes, self.accuracy, strict=True)
                     if a >= target), None)

    @property
    def final(self) -> float:
        return self.accuracy[-1]


def run_one(spec: Spec, seed: int, rounds: int, eval_every: int, data_dir: Path,
            out: Path) -> Curve:
    """Simulate one run into `out` and read its records back (runs in a worker process)."""
    torch.set_num_threads(1)  # one core per worker: --jobs workers share the machine
    config = validate_config(RunConfig(
        nodes=5, topology="ring", algorithm=spec.algorithm, dataset="mnist",
        data_dir=str(data_dir), partition="modulo", model="mlp", rounds=rounds,
        eval_every=eval_every, device="cpu", seed=seed, compressor=spec.compressor,
        model_compressor=spec.model_compressor, consensus_step=spec.consensus_step,
        feedback=spec.feedback))
    simulate.run(config, out, count_bytes=True)
    records = read_run(out).records
    accuracy = band(evaluations(records, "accuracy"))
    received = received_bytes(records)
    total = [sum(series[t] for series in received.values()) for t in accuracy.rounds]
    return Curve(spec, seed, accuracy.rounds, total, accuracy.mean)


def run_all(pool: ProcessPoolExecutor, jobs: Sequence[tuple[Spec, int, int]],
            args: argparse.Namespace) -> list[Curve]:
    """Every (spec, seed, rounds) at once over the pool; curves in the order given."""
    futures = []
    for spec, seed, rounds in jobs:
        # Every field in the name: tuning candidates share a label but not a directory.
        tag = "-".join(str(v) for v in (spec.algorithm, spec.compressor, spec.model_compressor,
                                        spec.consensus_step, spec.feedback, rounds, seed))
        tag = "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in tag)
        futures.append(pool.submit(run_one, spec, seed, rounds, args.eval_every,
                                   args.data_dir, args.out / tag))
    curves = []
    for future in futures:
        curve = future.result()
        curves.append(curve)
        print(f"  done {curve.spec.name} seed {curve.seed} ({curve.rounds[-1]} rounds): "
              f"final {curve.final:.4f}, {curve.total_bytes[-1] / MIB:.1f} MiB", flush=True)
    return curves


def pick(curves: Sequence[Curve]) -> Curve:
    """The tuning winner: fewest bytes to within 1 point of the best candidate's final accuracy
    (a candidate far below it never gets there), ties to the higher final accuracy."""
    near = max(c.final for c in curves) - 0.01
    return min(curves, key=lambda c: (c.bytes_to(near) or math.inf, -c.final))


@dataclass(frozen=True)
class Row:
    spec: Spec
    final: float
    bytes_to: float | None  # mean over seeds; None when a seed never reached the target
    reached: int
    seeds: int
    total: float  # total bytes of the whole run, mean over seeds


def summarize(spec: Spec, curves: Sequence[Curve], target: float) -> Row:
    mine = [c for c in curves if c.spec == spec]
    hits = [c.bytes_to(target) for c in mine]
    reached = [h for h in hits if h is not None]
    return Row(spec, sum(c.final for c in mine) / len(mine),
               sum(reached) / len(reached) if len(reached) == len(mine) else None,
               len(reached), len(mine), sum(c.total_bytes[-1] for c in mine) / len(mine))


def plot(curves: Sequence[Curve], specs: Sequence[Spec], target: float, path: Path) -> None:
    from matplotlib.figure import Figure  # Agg canvas, no display: as crossgrad/plots.py

    fig = Figure(figsize=(9, 5), dpi=120, layout="constrained")
    ax = fig.subplots()
    for i, spec in enumerate(specs):
        mine = [c for c in curves if c.spec == spec]
        for k, c in enumerate(mine):  # one line per seed, one colour per configuration
            ax.plot([b / MIB for b in c.total_bytes], c.accuracy, color=f"C{i % 10}",
                    linewidth=1.4, alpha=0.9 if k == 0 else 0.5,
                    label=spec.name if k == 0 else None)
    ax.axhline(target, color="0.4", linestyle="--", linewidth=1,
               label=f"target {target:.4f} (dense cga - 0.5 pt)")
    ax.set_xscale("log")
    ax.set(xlabel="MiB on the wire, all 5 nodes together (log)",
           ylabel="mean node test accuracy",
           title="real MNIST, 5 nodes, ring, modulo, mlp: accuracy against bytes")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def fmt_bytes(n: float | None) -> str:
    return "-" if n is None else f"{n / MIB:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=data_home("mnist"),
                        help="MNIST's IDX files (default $CROSSGRAD_DATA/mnist, else data/mnist)")
    parser.add_argument("--rounds", type=int, default=600, help="rounds of the table's runs")
    parser.add_argument("--replica-rounds", type=int, default=1800,
                        help="rounds of the table's runs with model replicas (0: --rounds); the "
                             "metric is bytes, and a replica round costs ~1/70 of a dense one")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=2, help="seeds of the table's runs")
    parser.add_argument("--tune-rounds", type=int, default=150, help="rounds of a tuning run")
    parser.add_argument("--steps", default="0.05,0.1,0.2,0.4,0.8", help="consensus steps to try")
    parser.add_argument("--z", default="0.5,2,8", help="CLAG's Z values to try")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one core each)")
    parser.add_argument("--out", type=Path, default=Path("runs/bytes-to-accuracy"),
                        help="run directories and results.json go here")
    parser.add_argument("--plot", type=Path, default=REPO / "docs/images/bytes-to-accuracy.png")
    args = parser.parse_args()
    if not args.data_dir.exists():
        parser.error(f"{args.data_dir} not found: give MNIST's directory with --data-dir")
    seeds = list(range(1, args.seeds + 1))
    args.replica_rounds = args.replica_rounds or args.rounds

    def rounds_of(spec: Spec) -> int:
        return args.replica_rounds if spec.model_compressor else args.rounds

    steps = [float(s) for s in args.steps.split(",")]
    zs = args.z.split(",")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.jobs} jobs, "
          f"torch {torch.__version__}; {date.today()}")
    print("command: python " + " ".join(sys.argv), flush=True)

    dense = Spec("cga dense", algorithm="cga", compressor="")
    fixed = [dense, Spec("compcga topk 1%"), Spec("compcga sign", compressor="sign"),
             Spec("compcga topk + ef21", feedback="ef21")]
    tuning = {model: [Spec(f"compcga topk + {model} models", model_compressor=model,
                           consensus_step=g) for g in steps] for model in (TOPK, "sign")}
    tuning["clag"] = [Spec("compcga topk + clag", feedback=f"clag:{z}") for z in zs]
    with ProcessPoolExecutor(args.jobs) as pool:
        # The fixed configurations and every tuning run need nothing from each other.
        print("tuning and fixed configurations:", flush=True)
        jobs = [(s, seed, rounds_of(s)) for s in fixed for seed in seeds]
        tunes = [(s, 1, args.tune_rounds) for group in tuning.values() for s in group]
        done = run_all(pool, jobs + tunes, args)
        curves, tried = done[:len(jobs)], done[len(jobs):]
        tuned_curves = {k: [c for c in tried if c.spec in group] for k, group in tuning.items()}
        chosen = {k: pick(group).spec for k, group in tuned_curves.items()}
        for k, group in tuned_curves.items():
            line = ", ".join(f"{c.spec.consensus_step or c.spec.feedback}: final "
                             f"{c.final:.4f}" for c in group)
            print(f"tuning {k}: {line}; chosen {chosen[k].consensus_step or chosen[k].feedback}",
                  flush=True)
        tuned = [replace(s, name=f"{s.name} (step {s.consensus_step:g})")
                 for s in (chosen[TOPK], chosen["sign"])]
        tuned.append(replace(chosen["clag"], name=f"compcga topk + {chosen['clag'].feedback}"))
        print("tuned configurations:", flush=True)
        curves += run_all(pool, [(s, seed, rounds_of(s)) for s in tuned for seed in seeds],
                          args)

        target = sum(c.final for c in curves if c.spec == dense) / args.seeds - 0.005

        def cost(spec: Spec) -> tuple[float, float]:
            """Fewest bytes to the target; a configuration that misses it ranks by accuracy."""
            row = summarize(spec, curves, target)
            return (math.inf if row.bytes_to is None else row.bytes_to, -row.final)

        model = min(tuned[:2], key=cost)
        feedback = min([fixed[3], tuned[2]], key=cost).feedback
        both = Spec(f"compcga topk + {model.model_compressor} models "
                    f"(step {model.consensus_step:g}) + {feedback}",
                    model_compressor=model.model_compressor,
                    consensus_step=model.consensus_step, feedback=feedback)
        print("best combination:", flush=True)
        curves += run_all(pool, [(both, seed, rounds_of(both)) for seed in seeds], args)

    specs = [*fixed[:3], *tuned[:2], fixed[3], tuned[2], both]
    rows = [summarize(s, curves, target) for s in specs]
    base = rows[0].bytes_to
    print()
    print(f"5 nodes, ring, modulo, mlp, real MNIST, seeds {seeds}, "
          f"evaluated every {args.eval_every}; target {target:.4f} (dense cga's final "
          "accuracy - 0.5 pt)")
    print("| configuration | rounds | final acc | MiB to target | vs dense cga | MiB whole run |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = (f"1/{base / r.bytes_to:.1f}" if base and r.bytes_to and r is not rows[0]
                 else "1" if r is rows[0] and base else "-")
        missed = "" if r.reached == r.seeds else f" ({r.reached}/{r.seeds} seeds)"
        print(f"| {r.spec.name} | {rounds_of(r.spec)} | {r.final:.4f} | "
              f"{fmt_bytes(r.bytes_to)}{missed} | {ratio} | {r.total / MIB:.1f} |")
    plot(curves, specs, target, args.plot)
    print(f"plot: {args.plot}")
    results = {"target": target, "rounds": args.rounds, "replica_rounds": args.replica_rounds,
               "seeds": seeds,
               "chosen": {k: s.__dict__ for k, s in chosen.items()},
               "rows": [{**r.spec.__dict__, "final": r.final, "bytes_to": r.bytes_to,
                         "reached": r.reached, "total": r.total} for r in rows],
               "curves": [{**c.spec.__dict__, "seed": c.seed, "rounds": c.rounds,
                           "total_bytes": c.total_bytes, "accuracy": c.accuracy}
                          for c in curves]}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

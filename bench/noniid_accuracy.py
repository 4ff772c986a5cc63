"""Accuracy on non-IID data: dpsgd vs cga vs ngc, with dpsgd on an iid split as the upper reference.

    python bench/noniid_accuracy.py                               # digits + real MNIST, all cells
    python bench/noniid_accuracy.py --datasets digits --seeds 1   # a quick look

5 nodes; ring and full topologies; the `modulo` partition (node r holds classes r and r+5); the
same budget (rounds, batch size, learning rate, model) for every algorithm. Each cell runs the
in-process simulator (the same node code as a deployment) for every seed and reports the mean
over seeds of: the mean and the minimum over nodes of each node's test accuracy on the full test
set, the accuracy of the average model, and the consensus distance. The last column is the gain
in mean node accuracy over dpsgd on the same topology and partition, measured in this run.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from crossgrad.config import RunConfig  # noqa: E402
from peer import simulate  # noqa: E402
from peer.builder import validate_config  # noqa: E402
from peer.training.datasets import data_home  # noqa: E402


@dataclass
class Cell:
    dataset: str
    topology: str
    partition: str
    algorithm: str
    mean: float
    min: float
    average_model: float
    consensus: float
    fallbacks: int
    seconds: float


def run_cell(base: RunConfig, seeds: list[int], workdir: Path) -> Cell:
    means, mins, avgs, cons, falls, secs = [], [], [], [], [], []
    for seed in seeds:
        cfg = validate_config(RunConfig(**{**base.__dict__, "seed": seed}))
        out = workdir / f"{cfg.dataset}-{cfg.topology}-{cfg.partition}-{cfg.algorithm}-{seed}"
        result = simulate.run(cfg, out)
        means.append(result.final.mean)
        mins.append(result.final.min)
        avgs.append(result.final.average_accuracy)
        cons.append(result.final.consensus)
        falls.append(sum(result.qp_fallbacks.values()))
        secs.append(result.seconds)
    k = len(seeds)
    return Cell(base.dataset, base.topology, base.partition, base.algorithm, sum(means) / k,
                sum(mins) / k, sum(avgs) / k, sum(cons) / k, sum(falls), sum(secs) / k)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="digits,mnist")
    parser.add_argument("--topologies", default="ring,full")
    parser.add_argument("--algorithms", default="dpsgd,cga,ngc")
    parser.add_argument("--seeds", type=int, default=3, help="runs per cell (seeds 1..N)")
    parser.add_argument("--rounds", default="digits=500,mnist=1000",
                        help="rounds per data set, e.g. digits=500,mnist=1000")
    parser.add_argument("--model", default="digits=mlp,mnist=mlp",
                        help="model per data set (cnn5 and cganet are ~30x slower on a CPU)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--mnist-dir", type=Path, default=data_home("mnist"),
                        help="MNIST's IDX files (default $CROSSGRAD_DATA/mnist, else data/mnist)")
    args = parser.parse_args()
    rounds = dict(item.split("=") for item in args.rounds.split(","))
    models = dict(item.split("=") for item in args.model.split(","))
    seeds = list(range(1, args.seeds + 1))
    torch.set_num_threads(max(1, torch.get_num_threads()))

    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print("command: python " + " ".join(sys.argv))
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets.split(","):
            data_dir = str(args.mnist_dir) if dataset == "mnist" else None
            if dataset == "mnist" and not args.mnist_dir.exists():
                print(f"skipping mnist: {args.mnist_dir} not found")
                continue
            for topology in args.topologies.split(","):
                plan = [(a, "modulo") for a in args.algorithms.split(",")] + [("dpsgd", "iid")]
                for algorithm, partition in plan:
                    base = RunConfig(nodes=5, topology=topology, algorithm=algorithm,
                                     dataset=dataset, data_dir=data_dir, partition=partition,
                                     model=models.get(dataset, ""),
                                     rounds=int(rounds.get(dataset, 500)),
                                     batch_size=args.batch_size, lr=args.lr, device="cpu",
                                     eval_every=int(rounds.get(dataset, 500)))
                    started = time.perf_counter()
                    cell = run_cell(base, seeds, Path(tmp))
                    cells.append(cell)
                    print(f"  done {dataset} {topology} {partition} {algorithm}: mean "
                          f"{cell.mean:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    print()
    print(f"5 nodes, batch {args.batch_size}, lr {args.lr}, momentum 0.9, seeds {seeds}; "
          f"rounds {args.rounds}; models {args.model}")
    header = (f"| {'dataset':<7} | {'topology':<8} | {'partition':<9} | {'algorithm':<9} | "
              f"{'mean acc':>8} | {'min acc':>7} | {'avg-model acc':>13} | {'consensus':>9} | "
              f"{'QP fallbacks':>12} | {'s/run':>6} | {'mean - dpsgd':>12} |")
    print(header)
    print("|" + "|".join("-" * (len(part) + 0) for part in header.split("|")[1:-1]) + "|")
    for c in cells:
        ref = next((d for d in cells if (d.dataset, d.topology, d.partition, d.algorithm)
                    == (c.dataset, c.topology, c.partition, "dpsgd")), None)
        gain = f"{100 * (c.mean - ref.mean):+.1f} pt" if ref and c.algorithm != "dpsgd" else ""
        print(f"| {c.dataset:<7} | {c.topology:<8} | {c.partition:<9} | {c.algorithm:<9} | "
              f"{c.mean:>8.4f} | {c.min:>7.4f} | {c.average_model:>13.4f} | "
              f"{c.consensus:>9.4f} | {c.fallbacks:>12} | {c.seconds:>6.1f} | {gain:>12} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

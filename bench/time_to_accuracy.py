"""Time to a given accuracy per model, on the gradient path before and after issue 12's work.

    python bench/time_to_accuracy.py --mnist DATA/mnist --cifar DATA/cifar10
    python bench/time_to_accuracy.py --models mlp cganet --mnist DATA/mnist --rounds 150
    python bench/time_to_accuracy.py --models resnet20 --cifar DIR --paths before --rounds 10

For each model, `crossgrad simulate` of the issue's setup (CGA, 5 nodes, ring, batch 128, the
data set's default partition, --seed) in a subprocess per path, one after the other:

  before  `--memory-format contiguous` and glibc's default allocator: every pass in PyTorch's
          default layout, its activations faulted in afresh (the path before this work; the
          batch built once per round instead of once per pass is the only change left in it)
  after   the defaults: `--memory-format auto` and freed memory kept for the next pass
          (peer/training/layout.py, peer/training/allocator.py)

Mean node test accuracy every --eval-every rounds. Per model and path it prints: s/round (every
node's round records summed, per round: evaluations and start-up excluded), the round of the
first evaluation at or above the model's target, the seconds of the rounds up to it, and the
accuracy at the end. mlp, cganet and cnn5 train on MNIST (--mnist), resnet20 and vgg11 on
CIFAR-10 (--cifar: the official binary batches; any of data_batch_1..5.bin and test_batch.bin).
Both paths of a model take the same bits where `auto` keeps the contiguous layout (the
allocator changes where buffers come from, never what is computed); where it switches to
channels_last, the models differ in the last bits (tests/unit/test_gradient_paths.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DATASET = {"mlp": "mnist", "cganet": "mnist", "cnn5": "mnist", "resnet20": "cifar10",
           "vgg11": "cifar10"}
# Targets: reached within the default rounds on this setup (2-class non-IID shards per node).
TARGET = {"mlp": 0.80, "cganet": 0.90, "cnn5": 0.90, "resnet20": 0.20, "vgg11": 0.25}
# The "before" path: the simulator without its call to keep glibc's freed memory.
BEFORE = ("import sys; import peer.simulate as s; s.keep_freed_memory = lambda: False; "
          "from crossgrad.cli import main; sys.exit(main(sys.argv[1:]))")


@dataclass
class Result:
    model: str
    path: str
    per_round: float
    rounds: int
    reached: int | None  # the round of the first evaluation at or above the target
    seconds: float | None  # the rounds' time up to it
    accuracy: float


def simulate(model: str, path: str, data_dir: Path, args: argparse.Namespace,
             out: Path) -> Result:
    flags = ["simulate", "--nodes", "5", "--topology", "ring", "--algorithm", "cga",
             "--dataset", DATASET[model], "--data-dir", str(data_dir), "--model", model,
             "--batch-size", "128", "--rounds", str(args.rounds),
             "--eval-every", str(args.eval_every), "--seed", str(args.seed), "--out", str(out),
             "--quiet"]
    if path == "before":
        command = [sys.executable, "-c", BEFORE, *flags, "--memory-format", "contiguous"]
    else:
        command = [sys.executable, "-m", "crossgrad", *flags]
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    per_round: dict[int, float] = {}
    evals: list[tuple[int, float]] = []
    for line in (out / "metrics.jsonl").open():
        record = json.loads(line)
        if record["kind"] == "round":
            per_round[record["round"]] = per_round.get(record["round"], 0.0) + record["seconds"]
        elif record["kind"] == "eval":
            evals.append((int(record["round"]), float(record["mean"])))
    target = args.target.get(model, TARGET[model])
    reached = next((r for r, acc in evals if acc >= target), None)
    seconds = None if reached is None else sum(s for r, s in per_round.items() if r < reached)
    return Result(model, path, sum(per_round.values()) / len(per_round), len(per_round),
                  reached, seconds, evals[-1][1] if evals else float("nan"))


def row(r: Result, target: float) -> str:
    reached = "-" if r.reached is None else str(r.reached)
    seconds = "-" if r.seconds is None else f"{r.seconds:.0f}"
    return (f"| {r.model} | {r.path} | {r.per_round:.3f} | {target:.2f} | {reached} | "
            f"{seconds} | {r.accuracy:.4f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DATASET), choices=list(DATASET))
    parser.add_argument("--paths", nargs="+", default=["before", "after"],
                        choices=["before", "after"])
    parser.add_argument("--mnist", type=Path, help="MNIST's IDX files")
    parser.add_argument("--cifar", type=Path, help="CIFAR-10's binary batches")
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--target", nargs="*", default=[], metavar="MODEL=ACC",
                        help=f"accuracy to reach, per model (default {TARGET})")
    args = parser.parse_args()
    args.target = {k: float(v) for k, v in (t.split("=", 1) for t in args.target)}
    dirs = {"mnist": args.mnist, "cifar10": args.cifar}
    print(f"# {platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f}; cga, 5 nodes, ring, batch 128, {args.rounds} rounds, "
          f"seed {args.seed}, evaluated every {args.eval_every}")
    print("| model | path | s/round | target | round reached | s to target | accuracy at end |")
    print("|---|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="crossgrad-tta-") as tmp:
        for model in args.models:
            data_dir = dirs[DATASET[model]]
            if data_dir is None:
                print(f"| {model} | skipped: no --{DATASET[model].replace('10', '')} given |",
                      flush=True)
                continue
            for path in args.paths:
                result = simulate(model, path, data_dir, args, Path(tmp) / f"{model}-{path}")
                print(row(result, args.target.get(model, TARGET[model])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

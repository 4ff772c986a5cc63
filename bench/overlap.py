"""Overlap in a deployed peer: a round's wall time against the node's own compute time.

    python bench/overlap.py                              # 3 and 5 peers, cganet on digits
    python bench/overlap.py --baseline /tmp/before       # the same, first with the code in DIR
    python bench/overlap.py --nodes 3 --rounds 60 --batch-size 256
    python bench/overlap.py --nodes 3 --dataset mnist --data-dir DATA/mnist --threads 1

A real run through the real CLI (crossgrad.cluster.LocalCluster): a bootstrap and --nodes peers,
each its own process, on loopback, plaintext, training CGA on a ring with --model on --dataset,
evaluating only at the end. Each peer's metrics.jsonl gives, per round, its time (`seconds`), its
phases and `served_seconds` (docs/metrics.md, "Where a round's time goes"). The node's own compute
time for a round is counted two ways: its gradients, `compute + served_seconds` (its own and the
cross-gradients it computed for its neighbors, each counted once), and all of it, the QP and the
mixing (`qp + mix`) too. The table gives, over every node's rounds after --warmup, the median
round time, the median compute time and the median and 90th percentile of the round's time over
it: 1.0 would be a round with no time spent on anything but computing. "computing" is the share
of all the nodes' time they spent computing (every round's compute over every round's time): with
more peers than cores, a node that waits while the others use every core lowers it without the
machine losing any time.

--threads N runs each peer with N torch threads (OMP_NUM_THREADS); by default torch's own
choice (one per core: with 3 peers on 2 cores, 6 threads contend for 2 cores).

--baseline DIR runs everything first with the crossgrad checkout in DIR (e.g. `git archive
COMMIT | tar -x -C DIR`; it must record served_seconds), then with this one; --repeat N does
that N times, alternating, so that a change in the machine's load hits both alike.

The peers share the machine's cores with each other (and here with other jobs): the load average
before each run is printed, and compute times include the slowdown that sharing causes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CODE = Path(os.environ.get("OVERLAP_CODE", str(REPO)))  # the checkout whose peers run
sys.path.insert(0, str(CODE))


@dataclass(frozen=True)
class Figures:
    """One run's summary over every node's rounds after the warm-up."""

    rounds: int
    wall: float  # median round seconds
    gradients: float  # median compute + served_seconds
    grad_median: float  # of round seconds / gradient seconds
    grad_p90: float
    compute: float  # median compute + served_seconds + qp + mix
    ratio_median: float  # of round seconds / compute seconds
    ratio_p90: float
    computing: float  # all rounds' compute seconds over all rounds' seconds
    load: float  # 1-minute load average before the run


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(out: Path, nodes: int, warmup: int, load: float) -> Figures:
    walls, grads, grad_ratios, computes, ratios = [], [], [], [], []
    for i in range(nodes):
        for line in (out / f"node-{i}" / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r["kind"] != "round" or r["round"] < warmup:
                continue
            phases = r["phases"]
            gradients = phases["compute"] + r["served_seconds"]
            own = gradients + phases["qp"] + phases["mix"]
            walls.append(r["seconds"])
            grads.append(gradients)
            grad_ratios.append(r["seconds"] / gradients)
            computes.append(own)
            ratios.append(r["seconds"] / own)
    return Figures(len(walls), statistics.median(walls), statistics.median(grads),
                   statistics.median(grad_ratios), quantile(grad_ratios, 0.9),
                   statistics.median(computes), statistics.median(ratios),
                   quantile(ratios, 0.9), sum(computes) / sum(walls), load)


def run_cluster(args: argparse.Namespace, nodes: int, out: Path) -> None:
    """One run with the code in CODE (this process imports it; the peers run it)."""
    from crossgrad.cluster import LocalCluster
    from crossgrad.config import RunConfig

    config = RunConfig(nodes=nodes, topology="ring", algorithm="cga", dataset=args.dataset,
                       data_dir=None if args.data_dir is None else str(args.data_dir),
                       partition="iid", rounds=args.rounds, eval_every=args.rounds,
                       batch_size=args.batch_size, model=args.model, seed=1, device="cpu")
    with LocalCluster(config, out, peer_args=["--timeout", "60"]) as cluster:
        cluster.start_bootstrap()
        cluster.start_peers()
        codes = cluster.wait_peers(args.run_timeout)
    if any(codes.values()):
        raise SystemExit(f"peers exited with {codes}; see the logs in {out}")


def measure(args: argparse.Namespace, code: Path, nodes: int, out: Path) -> Figures:
    """Run the cluster in a child process whose imports (and peers) come from `code`."""
    load = os.getloadavg()[0]
    env = {**os.environ, "OVERLAP_CODE": str(code), "PYTHONPATH": str(code)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(out),
                    "--nodes", str(nodes), "--rounds", str(args.rounds), "--model", args.model,
                    "--batch-size", str(args.batch_size), "--dataset", args.dataset,
                    *([] if args.data_dir is None else ["--data-dir", str(args.data_dir)])],
                   env=env, cwd=code, check=True)
    return summarize(out, nodes, args.warmup, load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="first rounds left out")
    parser.add_argument("--model", default="cganet")
    parser.add_argument("--dataset", default="digits",
                        help="digits (shipped with scikit-learn) or e.g. mnist with --data-dir")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per peer")
    parser.add_argument("--baseline", type=Path, help="a checkout to measure first")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each, alternating")
    parser.add_argument("--run-timeout", type=float, default=900.0)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        run_cluster(args, args.nodes[0], args.worker)
        return

    codes = [("before", args.baseline)] if args.baseline is not None else []
    codes.append(("this", REPO))
    print(f"# {platform.node()}: {os.cpu_count()} cores, python {platform.python_version()}; "
          f"CGA, ring, {args.model} on {args.dataset}, batch {args.batch_size}, "
          f"{args.rounds} rounds (first {args.warmup} left out), torch threads per peer: "
          f"{args.threads or 'default'}")
    print("| code | peers | rounds | round ms | gradients ms | round / gradients (p90) | "
          "compute ms | round / compute (p90) | computing | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="overlap-") as tmp:
        for nodes in args.nodes:
            for rep, (label, code) in itertools.product(range(args.repeat), codes):
                f = measure(args, code, nodes, Path(tmp) / f"{label}-{nodes}-{rep}")
                print(f"| {label} | {nodes} | {f.rounds} | {1e3 * f.wall:.1f} | "
                      f"{1e3 * f.gradients:.1f} | {f.grad_median:.2f} ({f.grad_p90:.2f}) | "
                      f"{1e3 * f.compute:.1f} | {f.ratio_median:.2f} ({f.ratio_p90:.2f}) | "
                      f"{f.computing:.1%} | {f.load:.1f} |", flush=True)


if __name__ == "__main__":
    main()

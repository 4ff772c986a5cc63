"""Many nodes: the per-node simulator engine against the batched one (peer/batched.py).

    python bench/scale.py                              # 64 nodes mlp and cganet, 256 nodes mlp
    python bench/scale.py --cases 64:mlp --rounds 5    # a quick look

Each case (nodes, model) runs `crossgrad simulate` with both engines on the same config (cga,
ring, digits, shards:2 so any node count partitions, batch 32) for the same rounds, in this
process, and prints: seconds per round (the sum of the round records' seconds: the lockstep
rounds only, without start-up and evaluations), the speed-up of the batched engine over the
per-node one measured in this run, and the final mean test accuracy over nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from crossgrad.config import RunConfig  # noqa: E402
from peer import batched, simulate  # noqa: E402
from peer.builder import validate_config  # noqa: E402


@dataclass
class Row:
    engine: str
    nodes: int
    model: str
    rounds: int
    per_round: float
    accuracy: float


def round_seconds(out: Path) -> float:
    """Mean seconds per lockstep round: every node's round records summed, over the rounds."""
    total, rounds = 0.0, set()
    for line in (out / "metrics.jsonl").open():
        record = json.loads(line)
        if record["kind"] == "round":
            total += float(record["seconds"])
            rounds.add(record["round"])
    return total / max(1, len(rounds))


def run_case(nodes: int, model: str, args: argparse.Namespace, workdir: Path) -> list[Row]:
    cfg = validate_config(RunConfig(nodes=nodes, model=model, algorithm=args.algorithm,
                                    topology=args.topology, dataset="digits",
                                    partition=args.partition, rounds=args.rounds,
                                    batch_size=args.batch_size, eval_every=args.rounds,
                                    device="cpu", seed=args.seed))
    rows = []
    for engine, run in (("nodes", simulate.run), ("batched", batched.run)):
        out = workdir / f"{engine}-{nodes}-{model}"
        result = run(cfg, out)
        rows.append(Row(engine, nodes, model, cfg.rounds, round_seconds(out), result.final.mean))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="64:mlp,64:cganet,256:mlp",
                        help="comma-separated NODES:MODEL (default 64:mlp,64:cganet,256:mlp)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--algorithm", default="cga")
    parser.add_argument("--topology", default="ring")
    parser.add_argument("--partition", default="shards:2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{load:.1f} at start; {args.algorithm}, {args.topology}, digits/{args.partition}, "
          f"batch {args.batch_size}, {args.rounds} rounds")
    print(f"{'engine':<8} {'nodes':>5} {'model':<7} {'rounds':>6} {'s/round':>8} "
          f"{'speed-up':>8} {'final acc':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            nodes, model = case.split(":")
            rows = run_case(int(nodes), model, args, Path(tmp))
            base = rows[0].per_round
            for r in rows:
                print(f"{r.engine:<8} {r.nodes:>5} {r.model:<7} {r.rounds:>6} "
                      f"{r.per_round:>8.3f} {base / r.per_round:>7.1f}x {r.accuracy:>9.4f}",
                      flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

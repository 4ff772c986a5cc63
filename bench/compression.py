"""What compression buys: accuracy and bytes per round, dense vs compressed cross-gradients.

    python bench/compression.py                          # digits + real MNIST
    python bench/compression.py --datasets digits --seeds 1

5 nodes, ring, `modulo` partition, the same budget for every configuration: dpsgd, cga, compcga
with the scaled sign, top-k 1% and QSGD with 4 bits (s = 7 levels and a sign bit), ngc, compngc
with the scaled sign. Bytes are those a networked node would put on the wire: every message is
encoded with peer/wire.py exactly as a peer sends it (header, codec parameters, gRPC and HTTP/2
framing) and counted at the receiver; "per round" is per node, averaged over nodes and rounds.
The last column compares cross-gradient bytes with dense cga's, measured in the same run.
Compressor throughput on 10M floats (against torch.topk and a plain copy) is
bench/compressors.py.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from crossgrad.config import RunConfig  # noqa: E402
from crossgrad.errors import CrossgradError  # noqa: E402
from peer import simulate  # noqa: E402
from peer.builder import validate_config  # noqa: E402
from peer.training.datasets import data_home  # noqa: E402

CONFIGS = [("dpsgd", "none"), ("cga", "none"), ("compcga", "sign"), ("compcga", "topk:0.01"),
           ("compcga", "qsgd:7"), ("ngc", "none"), ("compngc", "sign")]


@dataclass
class Row:
    dataset: str
    algorithm: str
    compressor: str
    mean: float
    min: float
    model_bytes: float  # per node per round
    cross_bytes: float  # per node per round


def run_config(base: RunConfig, seeds: list[int], workdir: Path) -> Row:
    means, mins, model, cross = [], [], 0.0, 0.0
    for seed in seeds:
        cfg = validate_config(RunConfig(**{**base.__dict__, "seed": seed}))
        name = f"{cfg.dataset}-{cfg.algorithm}-{cfg.compressor.replace(':', '_')}-{seed}"
        result = simulate.run(cfg, workdir / name, count_bytes=True)
        means.append(result.final.mean)
        mins.append(result.final.min)
        for traffic in result.traffic.values():
            for (_, kind), n in traffic.received.items():
                if kind == "model":
                    model += n
                else:
                    cross += n
    per = len(seeds) * base.nodes * base.rounds
    return Row(base.dataset, base.algorithm, base.compressor, sum(means) / len(means),
               sum(mins) / len(mins), model / per, cross / per)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="digits,mnist")
    parser.add_argument("--seeds", type=int, default=2, help="how many seeds")
    parser.add_argument("--first-seed", type=int, default=1, help="seeds start here")
    parser.add_argument("--configs", default=",".join(f"{a}:{c}" for a, c in CONFIGS),
                        help="algorithm:compressor pairs, comma-separated (default: all)")
    parser.add_argument("--rounds", default="digits=500,mnist=600")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mnist-dir", type=Path, default=data_home("mnist"),
                        help="MNIST's IDX files (default $CROSSGRAD_DATA/mnist, else data/mnist)")
    args = parser.parse_args()
    rounds = dict(item.split("=") for item in args.rounds.split(","))
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    configs = [tuple(item.split(":", 1)) for item in args.configs.split(",")]
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}")
    print("command: python " + " ".join(sys.argv))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets.split(","):
            if dataset == "mnist" and not args.mnist_dir.exists():
                print(f"skipping mnist: {args.mnist_dir} not found")
                continue
            n = int(rounds.get(dataset, 500))
            for algorithm, compressor in configs:
                base = RunConfig(nodes=5, topology="ring", algorithm=algorithm, dataset=dataset,
                                 data_dir=str(args.mnist_dir) if dataset == "mnist" else None,
                                 partition="modulo", model="mlp", rounds=n,
                                 batch_size=args.batch_size, eval_every=n, device="cpu",
                                 compressor=compressor)
                try:
                    row = run_config(base, seeds, Path(tmp))
                except CrossgradError as exc:  # e.g. a diverged run: say so in the table
                    print(f"  FAILED {dataset} {algorithm} {compressor}: {exc}", flush=True)
                    row = Row(dataset, algorithm, compressor, float("nan"), float("nan"), 0.0,
                              0.0)
                rows.append(row)
                print(f"  done {dataset} {algorithm} {compressor}: mean {row.mean:.4f}",
                      flush=True)
    print()
    print(f"5 nodes, ring, modulo, model mlp, batch {args.batch_size}, lr 0.01, momentum 0.9, "
          f"seeds {seeds}, rounds {args.rounds}")
    print("| dataset | algorithm | compressor | mean acc | min acc | model KiB/round | "
          "cross-grad KiB/round | cross-grad vs cga | acc vs uncompressed |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        dense = next((d for d in rows if d.dataset == r.dataset and d.algorithm == "cga"), None)
        plain = next((d for d in rows if d.dataset == r.dataset
                      and d.algorithm == r.algorithm.removeprefix("comp")
                      and d.compressor == "none"), None)
        ratio = (f"{dense.cross_bytes / r.cross_bytes:.1f}x smaller"
                 if dense and r.cross_bytes and r is not dense else "")
        delta = (f"{100 * (r.mean - plain.mean):+.1f} pt"
                 if plain and r.algorithm.startswith("comp") else "")
        print(f"| {r.dataset} | {r.algorithm} | {r.compressor} | {r.mean:.4f} | {r.min:.4f} | "
              f"{r.model_bytes / 1024:.1f} | {r.cross_bytes / 1024:.1f} | {ratio} | {delta} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

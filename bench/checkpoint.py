"""What a checkpoint costs against a round, per default model: the basis of --checkpoint-every.

    python bench/checkpoint.py                      # 3 models, 2 algorithms, CPU, 1 torch thread
    python bench/checkpoint.py --rounds 20 --saves 20 --threads 2 --dir /var/tmp

For each default model (digits/mlp; mnist/cnn5 and cifar10/resnet20 on synthetic inputs of their
shapes, so that the data files need not be present) three nodes on a full graph (each the ring
degree 2) run simulated rounds through the in-memory neighborhood, batch 32 (RunConfig's
default), and the table gives, in milliseconds, the mean time of one node's round (`round`), and
the mean time of one checkpoint save of node 0 (`save`: Node.state_dict, encoding, write,
flush + fsync, rename, fsync of the directory, pruning to the last two), with the file's size.

Two algorithms bracket the rounds: `dpsgd`, the cheapest round (one gradient and a step) with
the smallest state (x_i and momentum), and `compcga` with the sign compressor, the largest state
(x_i, momentum, the self-gradient memory, a sender memory per neighbor: 5 model copies) with a
round of three gradients and a QP per tensor. "save/round" is save over round; "K for 2%" the
smallest K with save <= 2% of K rounds. Rounds and saves alternate, so that load from other work
on the machine falls on both alike. The suggested default (twice the largest K over the rows,
rounded up to 1, 2 or 5 x 10^n; see MARGIN) is printed last.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from crossgrad.config import RunConfig  # noqa: E402
from peer import algorithms  # noqa: E402
from peer.compression import ErrorFeedback  # noqa: E402
from peer.node import Node  # noqa: E402
from peer.rounds import Assignment  # noqa: E402
from peer.simulate import InMemoryNeighborhood  # noqa: E402
from peer.training.checkpoint import CheckpointStore, make_checkpoint  # noqa: E402
from peer.training.models import make_model  # noqa: E402
from peer.training.trainer import Schedule, Trainer, seeded_model  # noqa: E402

# (data set, model, input shape (C, H, W)): RunConfig's DEFAULT_MODEL per data set.
MODELS = [("digits", "mlp", (1, 8, 8)), ("mnist", "cnn5", (1, 28, 28)),
          ("cifar10", "resnet20", (3, 32, 32))]
ALGORITHMS = [("dpsgd", "none"), ("compcga", "sign")]
NODES = 3
# The suggested default is MARGIN times the largest K found: the smallest model's save is bound
# by fsync, a fixed cost, while its round is a few ms that a quieter or faster machine (or a
# GPU) shortens further, which raises the K that 2% needs.
MARGIN = 2


def build(model: str, shape: tuple[int, int, int], algorithm: str, compressor: str,
          batch: int, seed: int) -> dict[int, Node]:
    """NODES nodes on a full graph with synthetic data of the model's input shape."""
    gen = torch.Generator().manual_seed(seed)
    nodes: dict[int, Node] = {}
    for i in range(NODES):
        net = seeded_model(lambda: make_model(model, shape, 10), seed)
        x = torch.randn(8 * batch, *shape, generator=gen)  # (n, C, H, W)
        y = torch.randint(0, 10, (8 * batch,), generator=gen)  # (n,)
        trainer = Trainer(i, net, x, y, Schedule(batch_size=batch), seed, torch.device("cpu"))
        hp = algorithms.Hyperparameters(compressor=compressor)
        neighbors = tuple(j for j in range(NODES) if j != i)
        assignment = Assignment(neighbors, {j: 1.0 / NODES for j in range(NODES)})
        feedback = None if compressor == "none" else ErrorFeedback(compressor)
        nodes[i] = Node(i, trainer, algorithms.make(algorithm, hp), assignment,
                        [p.detach() for p in net.parameters()], feedback=feedback)
    return nodes


def one_round(nodes: dict[int, Node]) -> float:
    """Milliseconds of one node's round, averaged over the nodes."""
    for node in nodes.values():
        node.publish()
    total = 0.0
    for node in nodes.values():
        start = time.perf_counter()
        node.run_round(InMemoryNeighborhood(node.id, nodes))
        total += time.perf_counter() - start
    return total / len(nodes) * 1e3


def one_save(node: Node, store: CheckpointStore, config: RunConfig) -> tuple[float, int]:
    """Milliseconds of one save of `node` and the file's size in bytes."""
    start = time.perf_counter()
    path = store.save(make_checkpoint(config, node.id, 0, node.state_dict()))
    return (time.perf_counter() - start) * 1e3, path.stat().st_size


def suggested_every(k: int) -> int:
    """The smallest 1, 2 or 5 x 10^n at or above MARGIN * k."""
    target = MARGIN * k
    n = 0
    while True:
        for m in (1, 2, 5):
            if m * 10 ** n >= target:
                return m * 10 ** n
        n += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds after 2 warm-up")
    parser.add_argument("--saves", type=int, default=10, help="timed saves (one per round)")
    parser.add_argument("--batch", type=int, default=32, help="samples per node per round")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the checkpoints go (a real disk: fsync is measured)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} torch thread(s), batch {args.batch}, {NODES} nodes (full graph), "
          f"checkpoints in {args.dir}; means over {args.rounds} rounds and {args.saves} saves")
    header = (f"| {'model':<16} | {'params':>9} | {'algorithm':<12} | {'round ms':>9} | "
              f"{'state MB':>8} | {'save ms':>8} | {'save/round':>10} | {'K for 2%':>8} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    worst = 1
    for dataset, model, shape in MODELS:
        for algorithm, compressor in ALGORITHMS:
            nodes = build(model, shape, algorithm, compressor, args.batch, args.seed)
            config = RunConfig(nodes=NODES, topology="full", algorithm=algorithm,
                               dataset=dataset, model=model, compressor=compressor,
                               batch_size=args.batch, seed=args.seed)
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                store = CheckpointStore(Path(tmp), node_id=0)
                for _ in range(2):  # warm-up: allocator, caches, the first memories
                    one_round(nodes)
                    one_save(nodes[0], store, config)
                rounds, saves, size = [], [], 0
                for r in range(max(args.rounds, args.saves)):
                    if r < args.rounds:
                        rounds.append(one_round(nodes))
                    if r < args.saves:
                        ms, size = one_save(nodes[0], store, config)
                        saves.append(ms)
            round_ms, save_ms = statistics.mean(rounds), statistics.mean(saves)
            k = max(1, math.ceil(save_ms / (0.02 * round_ms)))
            worst = max(worst, k)
            n_params = sum(p.numel() for p in nodes[0].params)
            print(f"| {dataset + '/' + model:<16} | {n_params:>9,} | {algorithm:<12} | "
                  f"{round_ms:>9.2f} | {size / 2**20:>8.2f} | {save_ms:>8.2f} | "
                  f"{save_ms / round_ms:>10.3f} | {k:>8} |")
    default = suggested_every(worst)
    print(f"# largest K for 2%: {worst}; times {MARGIN}, rounded up: --checkpoint-every "
          f"{default}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

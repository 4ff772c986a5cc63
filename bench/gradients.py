"""Gradient passes per memory layout, per model; then a simulated CGA round under each layout.

    python bench/gradients.py                                   # every model, batch 128 and 32
    python bench/gradients.py --models cganet --batches 128 --reps 10
    python bench/gradients.py --data-dir DATA/mnist --rounds 10 # + the CGA round on real MNIST

Part 1, per model of the registry (mlp, cganet and cnn5 on MNIST-shaped inputs, resnet20 and
vgg11 on CIFAR-shaped ones; random inputs, so no data files are needed): the mean time of one
forward+backward pass through Trainer.gradient (the path every node runs) in the contiguous
layout (today's path) and channels_last, their ratio, and the largest absolute difference of
any gradient entry between the two. The layouts alternate pass by pass, so that load from other
work on the machine falls on both alike. `auto` is what `--memory-format auto` picks.

Part 2 (with --data-dir, MNIST's IDX files): `crossgrad simulate`'s setup of issue 12 (CGA, 5
nodes, ring, cganet, batch 128, bytes counted as the CLI counts them), one node set per layout,
rounds alternating between the two sets: the mean time per round, the share of it spent in
gradient passes, and whether the two runs' models still agree within the tolerance.

--malloc: "kept" (default) first calls peer.training.allocator.keep_freed_memory(), as
`crossgrad simulate` and every peer do, so each pass reuses the memory the last one freed;
"default" keeps glibc's defaults, where a pass faults its ~100 MB of activations in afresh (the
path before that call was added). It applies to the whole process, so to both layouts alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from crossgrad.config import RunConfig  # noqa: E402
from peer.builder import assignments, load_run_data, make_node  # noqa: E402
from peer.metrics import Traffic  # noqa: E402
from peer.node import Node  # noqa: E402
from peer.simulate import InMemoryNeighborhood, simulate_round  # noqa: E402
from peer.training.allocator import keep_freed_memory  # noqa: E402
from peer.training.datasets import data_home  # noqa: E402
from peer.training.layout import LAYOUTS, resolve_memory_format  # noqa: E402
from peer.training.models import MODELS, make_model  # noqa: E402
from peer.training.trainer import Params, Schedule, Trainer, seeded_model  # noqa: E402

# Input shape of each model's usual data set: MNIST for the small ones, CIFAR-10 for the deep.
SHAPES: dict[str, tuple[int, int, int]] = {"mlp": (1, 28, 28), "cganet": (1, 28, 28),
                                           "cnn5": (1, 28, 28), "resnet20": (3, 32, 32),
                                           "vgg11": (3, 32, 32)}
CPU = torch.device("cpu")


def trainers(model: str, batch: int, seed: int) -> dict[str, Trainer]:
    """One Trainer per layout over the same random batch and initial model."""
    shape = SHAPES[model]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=gen)  # (b, C, H, W)
    y = torch.randint(0, 10, (batch,), generator=gen)  # (b,)
    return {name: Trainer(0, seeded_model(lambda: make_model(model, shape, 10), seed), x, y,
                          Schedule(batch_size=batch), seed, CPU, layout)
            for name, layout in LAYOUTS.items()}


def max_diff(a: Params, b: Params) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a, b, strict=True))


def pass_row(model: str, batch: int, reps: int, seed: int) -> str:
    by_layout = trainers(model, batch, seed)
    params = [p.detach() for p in by_layout["contiguous"].model.parameters()]
    grads = {name: t.gradient(params, 0, "bench")[1] for name, t in by_layout.items()}  # warm-up
    seconds = dict.fromkeys(by_layout, 0.0)
    for _ in range(reps):
        for name, trainer in by_layout.items():
            started = time.perf_counter()
            trainer.gradient(params, 0, "bench")
            seconds[name] += time.perf_counter() - started
    ms = {name: 1000 * s / reps for name, s in seconds.items()}
    auto = "channels_last" if resolve_memory_format("auto", model, CPU) != torch.contiguous_format \
        else "contiguous"
    return (f"| {model:<8} | {batch:>5} | {ms['contiguous']:>9.1f} | {ms['channels_last']:>9.1f} "
            f"| {ms['channels_last'] / ms['contiguous']:>5.2f} | "
            f"{max_diff(grads['contiguous'], grads['channels_last']):>8.1e} | {auto:<13} |")


def timed_gradients(node: Node, spent: list[float]) -> None:
    """Wrap the node's Trainer.gradient to add each call's seconds to spent[0] (bench only)."""
    inner: Callable[..., tuple[float, Params]] = node.trainer.gradient

    def gradient(*args: object) -> tuple[float, Params]:
        started = time.perf_counter()
        try:
            return inner(*args)
        finally:
            spent[0] += time.perf_counter() - started

    node.trainer.gradient = gradient  # type: ignore[method-assign]


def simulate_rows(data_dir: Path, rounds: int) -> list[str]:
    config = RunConfig(nodes=5, topology="ring", algorithm="cga", dataset="mnist",
                       data_dir=str(data_dir), partition="modulo", model="cganet",
                       batch_size=128, rounds=rounds + 1, device="cpu")
    data = load_run_data(config)
    _, assigned = assignments(config)
    runs = {}
    for name in LAYOUTS:
        cfg = replace(config, memory_format=name)
        nodes = {i: make_node(cfg, data, i, assigned[i], CPU) for i in range(cfg.nodes)}
        spent = [0.0]
        for node in nodes.values():
            timed_gradients(node, spent)
        hoods = {i: InMemoryNeighborhood(i, nodes, Traffic()) for i in nodes}
        runs[name] = ([nodes[i] for i in sorted(nodes)], hoods, spent)
    seconds = dict.fromkeys(runs, 0.0)
    for t in range(rounds + 1):  # round 0 is a warm-up
        for name, (ordered, hoods, spent) in runs.items():
            if t == 1:
                spent[0] = 0.0
            started = time.perf_counter()
            simulate_round(ordered, hoods)
            if t:
                seconds[name] += time.perf_counter() - started
    base = seconds["contiguous"]
    rows = []
    for name, (_, _, spent) in runs.items():
        rows.append(f"| {name:<13} | {seconds[name] / rounds:>7.3f} | "
                    f"{seconds[name] / base:>5.2f} | {spent[0] / seconds[name]:>8.0%} |")
    models = {name: ordered[0].params for name, (ordered, _, _) in runs.items()}
    rows.append(f"node 0's model after {rounds + 1} rounds, channels_last vs contiguous: max "
                f"|difference| {max_diff(models['contiguous'], models['channels_last']):.1e}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[128, 32])
    parser.add_argument("--reps", type=int, default=5, help="timed passes per layout")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"MNIST's IDX files for part 2 (e.g. {data_home('mnist')})")
    parser.add_argument("--rounds", type=int, default=10, help="timed CGA rounds per layout")
    parser.add_argument("--malloc", choices=("kept", "default"), default="kept",
                        help="keep freed memory for the next pass (as crossgrad does) or not")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.malloc == "kept":
        keep_freed_memory()
    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} torch threads, malloc {args.malloc}, "
          f"load average {os.getloadavg()[0]:.2f}; "
          f"means over {args.reps} passes per layout")
    print("| model    | batch | contig ms | chlast ms | ratio | max|dg|  | auto picks    |")
    print("|----------|------:|----------:|----------:|------:|---------:|---------------|")
    for model in args.models:
        for batch in args.batches:
            print(pass_row(model, batch, args.reps, args.seed), flush=True)
    if args.data_dir is not None:
        print(f"\n# simulate cga, 5 nodes, ring, cganet, batch 128, MNIST: {args.rounds} rounds "
              f"per layout (after 1 warm-up), load average {os.getloadavg()[0]:.2f}")
        print("| layout        | s/round | ratio | gradient |")
        print("|---------------|--------:|------:|---------:|")
        for row in simulate_rows(args.data_dir, args.rounds):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

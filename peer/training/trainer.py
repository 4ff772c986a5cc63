"""Local computation of one node: its mini-batches, gradients of any model on them, evaluation.

A model here is a list of parameter tensors in `named_parameters()` order (the wire order); the
nn.Module is only a template evaluated with torch.func.functional_call, so the same trainer takes
gradients of its own model and of its neighbors' models without copying weights into modules.

Determinism (docs/algorithms.md, "Determinism"): the batch order of epoch e is a permutation drawn
from (seed, "batches", node, e); every gradient runs under a torch RNG forked and seeded from
(seed, node, round, purpose), so dropout-like randomness (none of our models has any yet) cannot
make two runs differ.

Layout (peer/training/layout.py): every pass runs with its 4-D tensors (conv weights, image
batches) in the run's memory format; gradients come back contiguous whatever the layout, so
everything downstream (the QP, the wire) sees the same tensors either way.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from crossgrad.seeding import derive_seed, numpy_rng
from peer.training.layout import to_layout

Params = list[torch.Tensor]


@dataclass(frozen=True)
class Schedule:
    """Batch size and learning rate over rounds.

    batch_size: samples per local step (the CGA code uses 128, the NGC code 32).
    lr: the initial learning rate; lr_decay: multiplied in once per local epoch (x0.981 in the
    CGA code), an epoch being floor(n_local / batch_size) rounds (at least one).
    """

    batch_size: int = 32
    lr: float = 0.01
    lr_decay: float = 0.981


# torch's default CPU generator is one per process, and get_rng_state / set_rng_state hold its
# mutex while they make and free Python objects: a garbage collection in there can free a tensor
# with autograd history, which lets go of the GIL, and a thread in set_rng_state (or a second
# get_rng_state) then holds the GIL and waits for the mutex, for ever. Seen as a hung round in
# a test (both stacks in py-spy); gradients in one thread and the state read in another, as a
# peer serving a cross-gradient while its round loop checkpoints, hung in 3 runs of 3 (10 s
# each), and tests/unit/test_generator_lock.py's script without this lock in 2 of 2. So every
# use of the generator's state takes this lock, and a gradient holds it throughout: the draws of
# one pass come from its own seed even with several nodes in one process.
GENERATOR_LOCK = threading.RLock()


def generator_state() -> torch.Tensor:
    """torch.random.get_rng_state(), under GENERATOR_LOCK."""
    with GENERATOR_LOCK:
        return torch.random.get_rng_state()


def restore_generator(state: torch.Tensor) -> None:
    """torch.random.set_rng_state(state), under GENERATOR_LOCK."""
    with GENERATOR_LOCK:
        torch.random.set_rng_state(state)


def seed_rng(seed: int, device: torch.device) -> None:
    """Seed the CPU generator (and the device's, on CUDA). Not torch.manual_seed: it also
    queues lazy seeding of every accelerator backend, capturing a stack trace each call
    (measured: 2 ms per gradient on this machine)."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def seeded_model(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a model with the torch RNG seeded from (seed, "init"): every node starts from the
    same parameters (docs/algorithms.md, "Learning rate": the CGA code's defaults), whatever
    its process."""
    with GENERATOR_LOCK, torch.random.fork_rng(devices=[]):
        seed_rng(derive_seed(seed, "init"), torch.device("cpu"))
        return factory()


class Trainer:
    """One node's data and the pure functions over it."""

    def __init__(self, node: int, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 schedule: Schedule, seed: int, device: torch.device,
                 layout: torch.memory_format = torch.contiguous_format) -> None:
        self.node = node
        self.model = model.to(device)
        self.model.train()
        self.names = [name for name, _ in self.model.named_parameters()]
        self.device = device
        self.x = x.to(device)  # (n, C, H, W)
        self.y = y.to(device)  # (n,)
        self.schedule = schedule
        self.seed = seed
        self.layout = layout  # of every pass's 4-D tensors: a run setting (layout.py)
        self.n = int(self.y.shape[0])
        self.rounds_per_epoch = max(1, self.n // schedule.batch_size)
        # Batch orders of the last few epochs: a node serving a neighbor's cross-gradient of
        # round t may already be in the next epoch itself. Guarded: servers call from threads.
        self._perms: dict[int, np.ndarray] = {}
        # B_i^t of the last rounds, gathered once: the self-gradient and every cross-gradient
        # of round t take the same batch (1 + degree passes per round).
        self._batches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()
        # functional_call swaps the template module's parameters for the duration of a call, so
        # two threads (the round driver and a server thread) must never run one at once.
        self._compute = threading.Lock()

    def epoch(self, round_: int) -> int:
        return round_ // self.rounds_per_epoch

    def lr(self, round_: int) -> float:
        return self.schedule.lr * self.schedule.lr_decay ** self.epoch(round_)

    def batch(self, round_: int) -> tuple[torch.Tensor, torch.Tensor]:
        """B_i^t: the same mini-batch for the self-gradient and every cross-gradient of round t,
        its images in the run's layout."""
        epoch = self.epoch(round_)
        with self._lock:
            cached = self._batches.get(round_)
            if cached is not None:
                return cached
            perm = self._perms.get(epoch)
            if perm is None:
                perm = numpy_rng(self.seed, "batches", self.node, epoch).permutation(self.n)
                self._perms[epoch] = perm
                for old in [e for e in self._perms if e < epoch - 1]:
                    del self._perms[old]
            b = min(self.schedule.batch_size, self.n)
            j = round_ % self.rounds_per_epoch
            idx = torch.as_tensor(perm[j * b:(j + 1) * b], device=self.device)
            batch = to_layout([self.x[idx]], self.layout)[0], self.y[idx]  # (b, C, H, W), (b,)
            self._batches[round_] = batch
            for old in [r for r in self._batches if r < round_ - 1]:
                del self._batches[old]
            return batch

    def gradient(self, params: Sequence[torch.Tensor], round_: int,
                 purpose: str) -> tuple[float, Params]:
        """(loss, grad F_i(params; B_i^round)) with the RNG seeded by (node, round, purpose)."""
        x, y = self.batch(round_)  # (b, C, H, W) in the run's layout, (b,)
        leaves = [p.requires_grad_(True) for p in
                  to_layout([p.detach().to(self.device) for p in params], self.layout)]
        devices = [self.device] if self.device.type == "cuda" else []
        with self._compute, GENERATOR_LOCK, torch.random.fork_rng(devices=devices):
            seed_rng(derive_seed(self.seed, self.node, round_, purpose), self.device)
            logits = functional_call(self.model, dict(zip(self.names, leaves, strict=True)), (x,))
            loss = nn.functional.cross_entropy(logits, y)
            grads = torch.autograd.grad(loss, leaves)
        # contiguous() copies only what the layout changed (conv weights under channels_last)
        return float(loss.detach()), [g.detach().contiguous() for g in grads]

    @torch.no_grad()
    def evaluate(self, params: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                 batch_size: int = 1000) -> tuple[float, float]:
        """(mean loss, accuracy) of `params` on (x, y), e.g. the full held-out test set."""
        weights = dict(zip(self.names, to_layout([p.to(self.device) for p in params],
                                                 self.layout), strict=True))
        with self._compute:
            return self._evaluate(weights, x, y, batch_size)

    def _evaluate(self, weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                  batch_size: int) -> tuple[float, float]:
        total_loss, correct = 0.0, 0
        for start in range(0, int(y.shape[0]), batch_size):
            xb = to_layout([x[start:start + batch_size].to(self.device)],
                           self.layout)[0]  # (b, C, H, W)
            yb = y[start:start + batch_size].to(self.device)  # (b,)
            logits = functional_call(self.model, weights, (xb,))  # (b, K)
            total_loss += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(dim=1) == yb).sum())
        n = max(1, int(y.shape[0]))
        return total_loss / n, correct / n

"""peer/training/allocator.py: a gradient pass reuses the memory the last one freed instead of
faulting fresh pages in (glibc's defaults cost ~9,000 page faults per cganet pass at batch 128)."""

from __future__ import annotations

import resource

import torch

from peer.training.allocator import keep_freed_memory
from peer.training.models import make_model
from peer.training.trainer import Schedule, Trainer, seeded_model

CPU = torch.device("cpu")


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_gradient_passes_reuse_freed_memory() -> None:
    assert keep_freed_memory()  # glibc, as on every machine this project runs on
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 28, 28, generator=gen)  # (256, 1, 28, 28)
    y = torch.randint(0, 10, (256,), generator=gen)  # (256,)
    net = seeded_model(lambda: make_model("cganet", (1, 28, 28), 10), 1)
    trainer = Trainer(0, net, x, y, Schedule(batch_size=128), 1, CPU, torch.channels_last)
    params = [p.detach() for p in net.parameters()]
    for round_ in range(3):  # the allocator's heap grows to what a pass needs
        trainer.gradient(params, round_, "self")
    before = minor_faults()
    passes = 5
    for round_ in range(3, 3 + passes):
        trainer.gradient(params, round_, "self")
    per_pass = (minor_faults() - before) / passes
    # each pass allocates ~100 MB (25,000 pages) of activations and gradients
    assert per_pass < 2000, f"{per_pass:.0f} page faults per pass: freed memory is not reused"

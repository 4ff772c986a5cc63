"""Memory layout of a run's gradient passes: contiguous (NCHW) or channels_last (NHWC).

A cross-gradient round is mostly forward and backward passes (one per neighbor and one of the
node's own), and on a CPU a convolution runs much faster when its weights and inputs are
channels_last (oneDNN's native layout) than in PyTorch's default contiguous layout. The two
layouts sum in different orders, so their gradients differ in the last bits (at most 1e-5
absolute on every model of the registry; tests/unit/test_gradient_paths.py). That makes the
layout a property of the RUN, never a per-process timing decision: `--memory-format` is a shared
run setting (RunSettings.memory_format), every node resolves it by the same fixed rule, and the
simulator and a networked run take the same path and agree bit for bit.

The rule of `auto` (docs/benchmarks.md, "Gradients", measured with bench/gradients.py):
channels_last on a CPU for every model with convolutions (cganet 0.57x, resnet20 0.80x, vgg11 and
cnn5 about 0.9x the time of a contiguous pass at batch 128, 2 threads); contiguous for the mlp
(no convolutions: nothing to gain) and on a GPU (not measured here; cuDNN's own choice is kept).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from crossgrad.config import MEMORY_FORMATS
from crossgrad.errors import UnknownNameError

LAYOUTS: dict[str, torch.memory_format] = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last,
}

# Models `auto` runs channels_last on the CPU: those with convolutions, all measured faster.
CHANNELS_LAST_ON_CPU = frozenset({"cganet", "cnn5", "resnet20", "vgg11"})


def resolve_memory_format(name: str, model: str, device: torch.device) -> torch.memory_format:
    """The layout of `--memory-format name` for `model` on `device`; `auto` by the rule above.

    Depends only on the run's settings and the device type, so every node of a run on the same
    kind of device takes the same path."""
    if name not in MEMORY_FORMATS:
        raise UnknownNameError("memory format", name, MEMORY_FORMATS)
    if name == "auto":
        fast = device.type == "cpu" and model in CHANNELS_LAST_ON_CPU
        return torch.channels_last if fast else torch.contiguous_format
    return LAYOUTS[name]


def to_layout(tensors: Sequence[torch.Tensor],
              layout: torch.memory_format) -> list[torch.Tensor]:
    """Every 4-D tensor (conv weights, image batches) in `layout`; others as they are.

    Values are unchanged: only the strides differ. A tensor already in the layout is returned
    as is (no copy)."""
    if layout == torch.contiguous_format:
        return list(tensors)
    return [t.contiguous(memory_format=layout) if t.dim() == 4 else t for t in tensors]

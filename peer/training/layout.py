"""Memory layout of a run's gradient passes: contiguous (NCHW) or channels_last (NHWC).

A cross-gradient round is mostly forward and backward passes (one per neighbor and one of the
node's own), and on a CPU a convolution runs much faster when its weights and inputs are
channels_last (oneDNN's native layout) than in PyTorch's default contiguous layout. The two
layouts sum in different orders, so their gradients differ in the last bits (within 1e-5 on
every model of the registry in tests/unit/test_gradient_paths.py; at full size at most 6e-7 on
the models `auto` switches, 2e-4 on vgg11, see docs/benchmarks.md). That makes the
layout a property of the RUN, never a per-process timing decision: `--memory-format` is a shared
run setting (RunSettings.memory_format), every node resolves it by the same fixed rule, and the
simulator and a networked run take the same path and agree bit for bit.

The rule of `auto` (docs/benchmarks.md, "Gradients", measured with bench/gradients.py on 2
threads): channels_last on a CPU for cganet, cnn5 and resnet20, the models it made faster at
batch 128 and 32 (0.68-0.70x, 0.78-0.79x and 0.84-0.89x the time of a contiguous pass on a quiet
machine; cnn5 gained only once 1-channel tensors got the layout's own strides, see to_layout);
contiguous for vgg11 (1.15-1.24x: slower), for the mlp (no convolutions) and on a GPU (not
measured here).
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

# Models `auto` runs channels_last on the CPU: those measured clearly faster (see above).
CHANNELS_LAST_ON_CPU = frozenset({"cganet", "cnn5", "resnet20"})


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
    as is (no copy).

    "In the layout" means the layout's own strides, not merely strides it accepts: a tensor
    with a dimension of size 1 (a 1-channel image batch, the first conv weight of an MNIST
    model, a 1x1 kernel) is contiguous in both layouts at once, so `Tensor.contiguous` leaves
    it in NCHW strides, and PyTorch then runs that convolution in NCHW and reorders its output
    for the next layer, forward and backward. With the layout's own strides the whole network
    runs NHWC: a cganet pass at batch 128 took 0.75x as long (docs/benchmarks.md, "Gradients").
    """
    if layout == torch.contiguous_format:
        return list(tensors)
    return [_strided(t, layout) if t.dim() == 4 else t for t in tensors]


def _strided(t: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    """`t` with exactly the strides an empty tensor of its shape has in `layout`."""
    _, c, h, w = t.shape  # (N, C, H, W)
    if layout == torch.channels_last and t.stride() == (h * w * c, 1, w * c, c):
        return t
    return torch.empty_like(t, memory_format=layout).copy_(t)

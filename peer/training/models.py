"""The models every node trains, by name: `mlp`, `cganet`, `cnn5`, `resnet20`, `vgg11`.

Cross-gradients g_il are computed at node l, on l's data, with node i's model (docs/algorithms.md,
"Notation"). A BatchNorm layer would then normalise with l's batch statistics and update running
buffers that belong to neither node, so no model here has BatchNorm or any buffer at all: the
convolutional models use GroupNorm, which normalises each sample on its own. There is no dropout
either, so a forward pass is a pure function of (parameters, inputs) and the simulator and a
networked run agree bit for bit.

Wire order. Every model registers its parameters in a fixed order in `__init__` (layers are built
in the order they run, in `nn.Sequential`s), so `named_parameters()` is the same on every node; that
order is the order tensors cross the wire and the order of the per-tensor operations in the
algorithms. `make_model` does not seed: the caller seeds torch (see `crossgrad.seeding`) right
before calling it, and the same seed then gives the same initial parameters.

Inputs are float32 (B, C, H, W); outputs are logits (B, num_classes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from crossgrad.errors import ConfigError, UnknownNameError

InputShape = tuple[int, int, int]  # (C, H, W)

# Groups per GroupNorm. Two groups per layer is what Hsieh et al. (ICML 2020, "The Non-IID Data
# Quagmire") used for ResNet-20 on non-IID CIFAR-10, and NGC's code defaults to groups=2; it
# divides every channel count used here (16 ... 512).
GN_GROUPS = 2


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with GN_GROUPS groups: per-sample statistics, no running buffers."""
    return nn.GroupNorm(GN_GROUPS, channels)


def _pooled(size: int) -> int:
    """Spatial size after MaxPool2d(2): floor division, as torch does."""
    return size // 2


class MLP(nn.Module):
    """flatten -> 128 -> ReLU -> 64 -> ReLU -> classes: the default for the 8x8 digits set."""

    def __init__(self, input_shape: InputShape, num_classes: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * h * w, 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, C, H, W) -> (B, num_classes)


class CGANet(nn.Module):
    """The CNN of the CGA reference code (`models.py`, class CNN), kept for fidelity.

    conv 32 - conv 32 - pool - conv 64 - pool - conv 64 - pool - linear. Like the reference it has
    NO activation functions, so it is a linear model up to the max-pools (piecewise linear overall);
    offer it to reproduce the paper's setup, not for accuracy. The reference's Dropout(0.25) after
    the first pool is left out (no dropout in crossgrad, see module docstring). The flatten size
    is computed from the input: 64*3*3 = 576 for 28x28 (the reference's MNIST value), 64*4*4 = 1024
    for 32x32 (its CIFAR value), 64 for 8x8.
    """

    def __init__(self, input_shape: InputShape, num_classes: int) -> None:
        super().__init__()
        c, h, w = input_shape
        if min(h, w) < 8:
            raise ConfigError(f"cganet needs H, W >= 8 (three 2x2 max-pools); got {h}x{w}")
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.MaxPool2d(2),
        )
        out_h, out_w = _pooled(_pooled(_pooled(h))), _pooled(_pooled(_pooled(w)))
        self.classifier = nn.Linear(64 * out_h * out_w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, 64, H/8, W/8)
        return self.classifier(x.flatten(1))  # (B, num_classes)


class CNN5(nn.Module):
    """NGC's 5-layer CNN: two conv layers and three linear layers, GroupNorm instead of BatchNorm.

    conv5x5(32) - GN - ReLU - pool - conv5x5(64) - GN - ReLU - pool - (more 2x2 max-pools, ceil
    mode, while the map is larger than 4x4) - linear 512 - 128 - classes. The extra pools cap the
    first linear layer at 64*4*4 = 1024 inputs, so 28x28 (7x7 -> 4x4) and 32x32 (8x8 -> 4x4) share
    one head and ~0.64M parameters instead of ~2M; 8x8 inputs reach 2x2 after the two pools. Max
    pools rather than an adaptive average pool, whose CUDA backward is not deterministic.
    """

    def __init__(self, input_shape: InputShape, num_classes: int) -> None:
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = []
        in_ch = c
        for out_ch in (32, 64):
            layers += [nn.Conv2d(in_ch, out_ch, 5, padding=2), _group_norm(out_ch), nn.ReLU()]
            if min(h, w) >= 2:  # pool only while the map is at least 2x2
                layers.append(nn.MaxPool2d(2))
                h, w = _pooled(h), _pooled(w)
            in_ch = out_ch
        while max(h, w) > 4:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            h, w = -(-h // 2), -(-w // 2)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(64 * h * w, 512),
            nn.ReLU(),
            nn.Linear(512, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, 64, h, w), h and w <= 4
        return self.classifier(x.flatten(1))  # (B, num_classes)


class BasicBlock(nn.Module):
    """Two 3x3 convs with GroupNorm; option-A shortcut (He et al. 2016, section 4.2).

    Option A (identity, subsampled by stride and zero-padded in channels) adds no parameters, so
    ResNet-20 keeps its 0.27M parameters and every parameter is a conv, GN or the head.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = _group_norm(out_ch)
        self.stride = stride
        self.pad = out_ch - in_ch

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]  # (B, C_in, ceil(H/s), ceil(W/s))
        if self.pad:
            x = nn.functional.pad(x, (0, 0, 0, 0, 0, self.pad))  # (B, C_out, H', W')
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))  # (B, C_out, H', W')
        out = self.norm2(self.conv2(out))  # (B, C_out, H', W')
        return torch.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """The CIFAR ResNet-20: conv16, 3 stages x 3 basic blocks (16/32/64), global avg pool, linear.

    GroupNorm with GN_GROUPS groups replaces BatchNorm; shortcuts are option A (see BasicBlock).
    Strides 1, 2, 2 take 32x32 to 8x8, 28x28 to 7x7 and 8x8 to 2x2 before the global pool.
    """

    def __init__(self, input_shape: InputShape, num_classes: int) -> None:
        super().__init__()
        c = input_shape[0]
        self.stem = nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1, bias=False), _group_norm(16), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        in_ch = 16
        for stage, out_ch in enumerate((16, 32, 64)):
            for b in range(3):
                stride = 2 if stage > 0 and b == 0 else 1
                blocks.append(BasicBlock(in_ch, out_ch, stride))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))  # (B, 64, H/4, W/4)
        return self.head(x.mean(dim=(2, 3)))  # (B, num_classes)


# Config "A" of Simonyan & Zisserman; "M" is a 2x2 max-pool.
VGG11_CONFIG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """VGG-11 for CIFAR (config A): 3x3 conv - GroupNorm - ReLU, max-pools, linear 512 -> classes.

    A pool is skipped once the map is 1 pixel on a side (28x28 reaches 1x1 after four pools, 8x8
    after three), and a global average at the end makes the head 512 wide for any input (a no-op
    on 32x32, 28x28 and 8x8, which all end at 1x1).
    """

    def __init__(self, input_shape: InputShape, num_classes: int) -> None:
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = []
        in_ch = c
        for v in VGG11_CONFIG:
            if v == "M":
                if min(h, w) >= 2:
                    layers.append(nn.MaxPool2d(2))
                    h, w = _pooled(h), _pooled(w)
                continue
            out_ch = int(v)
            layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), _group_norm(out_ch), nn.ReLU()]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, 512, h, w), 1x1 for inputs up to 32x32
        return self.classifier(x.mean(dim=(2, 3)))  # (B, num_classes)


ModelBuilder = Callable[[InputShape, int], nn.Module]

MODELS: dict[str, ModelBuilder] = {
    "mlp": MLP,
    "cganet": CGANet,
    "cnn5": CNN5,
    "resnet20": ResNet20,
    "vgg11": VGG11,
}


def make_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """A freshly initialised model by registry name, for inputs (B, *input_shape).

    Does not seed: seed torch right before calling it so every run starts from the same weights.
    """
    if name not in MODELS:
        raise UnknownNameError("model", name, MODELS)
    if len(input_shape) != 3 or any(int(s) < 1 for s in input_shape):
        raise ConfigError(f"input_shape must be (C, H, W) with positive sizes; got {input_shape!r}")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2; got {num_classes}")
    shape = (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))
    model = MODELS[name](shape, int(num_classes))
    assert_no_batchnorm(model)
    return model


def assert_no_batchnorm(model: nn.Module) -> None:
    """Raise ConfigError if the model has BatchNorm or any buffer.

    BatchNorm would normalise a cross-gradient with the neighbor's batch statistics, and any
    buffer (running means, counters) is state that changes in training but is never averaged.
    """
    bad = [
        name or type(model).__name__
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)  # also SyncBatchNorm, lazy ones
    ]
    if bad:
        raise ConfigError(
            f"BatchNorm is not allowed (cross-gradients are computed on another node's data, so "
            f"batch statistics would mix nodes): {', '.join(bad)}; use GroupNorm instead"
        )
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        raise ConfigError(f"models must not have buffers (they are never averaged); got {buffers}")


def param_count(model: nn.Module) -> int:
    """Number of scalar parameters: what one full model costs on the wire, in floats."""
    return sum(p.numel() for p in model.parameters())

"""The fast (channels_last) and the reference (contiguous) gradient paths, and --memory-format.

Every model of the registry gives the same gradients in both layouts within TOLERANCE (the figure
docs/benchmarks.md, "Gradients", states), each layout is deterministic on its own (what keeps
simulated and networked runs bit-identical: tests/system/test_equivalence.py runs one on the
fast path), and a bad setting is refused with the known names.
"""

from __future__ import annotations

import pytest
import torch

from bootstrap.convert import settings_from_proto, settings_to_proto
from crossgrad.config import RunConfig, load, validate
from crossgrad.errors import ConfigError, UnknownNameError
from peer.training.layout import LAYOUTS, resolve_memory_format, to_layout
from peer.training.models import MODELS, make_model
from peer.training.trainer import Params, Schedule, Trainer, seeded_model

# Largest |difference| of any gradient entry between the layouts (measured: below 1e-5 on every
# model at batch 128 on MNIST and CIFAR shapes; a few 1e-8 on these small inputs).
TOLERANCE = 1e-5
SHAPES = {"mlp": (1, 8, 8), "cganet": (1, 8, 8), "cnn5": (1, 8, 8), "resnet20": (3, 8, 8),
          "vgg11": (3, 8, 8)}
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gradients(model: str, layout: torch.memory_format, round_: int = 0) -> Params:
    shape = SHAPES[model]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, *shape, generator=gen)  # (6, C, H, W)
    y = torch.randint(0, 10, (6,), generator=gen)  # (6,)
    net = seeded_model(lambda: make_model(model, shape, 10), 7)
    trainer = Trainer(0, net, x, y, Schedule(batch_size=4), 7, CPU, layout)
    params = [p.detach() for p in net.parameters()]
    return trainer.gradient(params, round_, "self")[1]


def test_every_model_of_the_registry_is_covered() -> None:
    assert set(SHAPES) == set(MODELS)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_channels_last_gradients_match_contiguous_within_tolerance(model: str) -> None:
    reference = _gradients(model, torch.contiguous_format)
    fast = _gradients(model, torch.channels_last)
    assert [g.shape for g in fast] == [g.shape for g in reference]
    for k, (a, b) in enumerate(zip(reference, fast, strict=True)):
        assert b.is_contiguous(), f"gradient {k} must leave the trainer contiguous"
        assert torch.isfinite(b).all()
        diff = float((a - b).abs().max())
        assert diff <= TOLERANCE, f"{model} gradient {k}: |difference| {diff:.2e}"
    assert any(float(g.abs().max()) > 0 for g in fast)  # not a vacuous comparison


@pytest.mark.parametrize("model", ["cganet", "cnn5", "resnet20"])
def test_each_layout_is_deterministic(model: str) -> None:
    """Two passes over the same batch and model are bit-identical on the fast path too."""
    first, second = (_gradients(model, torch.channels_last, round_=1) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_auto_picks_channels_last_where_it_was_measured_faster_on_a_cpu_only() -> None:
    for model in ("cganet", "cnn5", "resnet20"):
        assert resolve_memory_format("auto", model, CPU) == torch.channels_last
    for model in ("mlp", "vgg11"):
        assert resolve_memory_format("auto", model, CPU) == torch.contiguous_format
    assert resolve_memory_format("auto", "cganet", torch.device("cuda")) == \
        torch.contiguous_format
    for name, layout in LAYOUTS.items():
        assert resolve_memory_format(name, "mlp", CPU) == layout


def test_to_layout_keeps_values_and_leaves_other_tensors_alone() -> None:
    w, b = torch.randn(8, 3, 3, 3), torch.randn(8)  # (out, in, kH, kW), (out,)
    w2, b2 = to_layout([w, b], torch.channels_last)
    assert w2.is_contiguous(memory_format=torch.channels_last) and torch.equal(w, w2)
    assert b2 is b
    assert to_layout([w], torch.contiguous_format)[0] is w


def test_to_layout_gives_the_layouts_own_strides_when_a_dimension_is_1() -> None:
    """A 1-channel batch and an MNIST model's first conv weight are "contiguous" in both
    layouts; Tensor.contiguous would leave their NCHW strides, and the first convolution would
    then run NCHW and reorder its output for the next layer (0.75x the pass time without)."""
    x, w = torch.randn(4, 1, 28, 28), torch.randn(32, 1, 3, 3)  # (B, 1, H, W), (out, 1, kH, kW)
    x2, w2 = to_layout([x, w], torch.channels_last)
    for before, after in ((x, x2), (w, w2)):
        nhwc = torch.empty_like(before, memory_format=torch.channels_last)
        assert after.stride() == nhwc.stride()
        assert torch.equal(before, after)
        assert to_layout([after], torch.channels_last)[0] is after  # no second copy
    out = torch.nn.functional.conv2d(x2, w2, padding=1)  # (4, 32, 28, 28)
    assert out.stride()[1] == 1, "the first convolution must run (and answer) NHWC"


def test_an_unknown_memory_format_is_refused_with_the_known_ones() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown memory format 'nhwc'.*channels_last"):
        validate(RunConfig(memory_format="nhwc"))
    with pytest.raises(UnknownNameError, match="did you mean 'channels_last'"):
        resolve_memory_format("channel_last", "cganet", CPU)
    with pytest.raises(ConfigError, match="CROSSGRAD_MEMORY_FORMAT = 'fast' is not a memory "
                                          "format; known formats: auto, contiguous"):
        load({}, environ={"CROSSGRAD_MEMORY_FORMAT": "fast"})


def test_the_setting_travels_in_the_run_settings() -> None:
    config = RunConfig(memory_format="channels_last")
    assert settings_from_proto(settings_to_proto(config)).memory_format == "channels_last"
    old = settings_to_proto(RunConfig())
    old.memory_format = ""  # what a bootstrap from before the setting sends
    assert settings_from_proto(old).memory_format == "auto"
    assert load({"memory_format": "contiguous"}).memory_format == "contiguous"

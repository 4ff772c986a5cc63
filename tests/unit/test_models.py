"""Every model on every input size: shapes, gradients, no BatchNorm, no buffers, seeded init."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from crossgrad.errors import ConfigError, UnknownNameError
from peer.training import models
from peer.training.models import MODELS, assert_no_batchnorm, make_model, param_count

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
NUM_CLASSES = 10


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _build(name: str, shape: tuple[int, int, int], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return make_model(name, shape, NUM_CLASSES)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_shape_and_finite_gradient(name: str, shape: tuple[int, int, int]) -> None:
    model = _build(name, shape)
    x = torch.randn(3, *shape)  # (B, C, H, W)
    logits = model(x)  # (B, num_classes)
    assert logits.shape == (3, NUM_CLASSES)
    assert logits.dtype == torch.float32
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_no_batchnorm_no_buffers_no_dropout(name: str, shape: tuple[int, int, int]) -> None:
    model = _build(name, shape)
    assert_no_batchnorm(model)
    assert list(model.buffers()) == []
    assert not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_train_and_eval_modes_agree(name: str) -> None:
    """No BatchNorm and no dropout: a forward pass depends only on parameters and inputs."""
    model = _build(name, (3, 32, 32))
    x = torch.randn(2, 3, 32, 32)  # (B, C, H, W)
    with torch.no_grad():
        train_out = model.train()(x)
        eval_out = model.eval()(x)
    assert torch.equal(train_out, eval_out)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_seed_same_init_in_the_same_order(name: str) -> None:
    a, b, c = (
        _build(name, (1, 28, 28), 7),
        _build(name, (1, 28, 28), 7),
        _build(name, (1, 28, 28), 8),
    )
    names_a = [n for n, _ in a.named_parameters()]
    assert names_a == [n for n, _ in b.named_parameters()]
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert any(
        not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True)
    )


def test_param_counts_are_pinned() -> None:
    """The counts fix the wire size of a model; a change here is a change to the protocol."""
    expected = {
        (1, 28, 28): {
            "mlp": 109_386, "cganet": 70_762, "cnn5": 644_042,
            "resnet20": 269_434, "vgg11": 9_229_962,
        },
        (3, 32, 32): {
            "mlp": 402_250, "cganet": 75_818, "cnn5": 645_642,
            "resnet20": 269_722, "vgg11": 9_231_114,
        },
    }  # fmt: skip
    for shape, counts in expected.items():
        for name, count in counts.items():
            assert param_count(make_model(name, shape, NUM_CLASSES)) == count, (name, shape)


def test_mlp_count_follows_its_formula() -> None:
    d = 1 * 8 * 8
    expected = (d * 128 + 128) + (128 * 64 + 64) + (64 * NUM_CLASSES + NUM_CLASSES)
    assert param_count(make_model("mlp", (1, 8, 8), NUM_CLASSES)) == expected


def test_cganet_flatten_sizes_match_the_reference() -> None:
    """The CGA code hard-codes 576 (MNIST) and 1024 (CIFAR) inputs to its linear layer."""
    for shape, fc_in in [((1, 28, 28), 576), ((3, 32, 32), 1024), ((1, 8, 8), 64)]:
        model = make_model("cganet", shape, NUM_CLASSES)
        assert isinstance(model, models.CGANet)
        assert model.classifier.in_features == fc_in


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        make_model("resnet18", (3, 32, 32), 10)
    assert "resnet18" in str(info.value)
    for name in MODELS:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("name", "shape", "classes", "match"),
    [
        ("mlp", (0, 8, 8), 10, "positive sizes"),
        ("mlp", (8, 8), 10, r"\(C, H, W\)"),
        ("mlp", (1, 8, 8), 1, "num_classes"),
        ("cganet", (1, 4, 4), 10, "H, W >= 8"),
    ],
)
def test_bad_arguments_say_what_was_expected(
    name: str, shape: tuple[int, ...], classes: int, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        make_model(name, shape, classes)  # type: ignore[arg-type]


def test_assert_no_batchnorm_rejects_batchnorm() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    with pytest.raises(ConfigError, match="GroupNorm"):
        assert_no_batchnorm(model)


def test_assert_no_batchnorm_rejects_buffers() -> None:
    model = nn.Linear(2, 2)
    model.register_buffer("steps", torch.zeros(()))
    with pytest.raises(ConfigError, match="buffers"):
        assert_no_batchnorm(model)


def test_models_module_imports_no_grpc() -> None:
    """The training core is pure torch: the contract layer stays in peer/wire."""
    tree = ast.parse(Path(models.__file__).read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(m.startswith(("grpc", "crossgrad.v1")) for m in imported), imported

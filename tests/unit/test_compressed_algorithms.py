"""compcga / compngc and compressed cross-gradients, through the simulator (docs/algorithms.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from crossgrad.config import RunConfig
from crossgrad.errors import ConfigError
from peer import simulate
from peer.builder import validate_config


def run(tmp_path: Path, name: str, **overrides: object) -> dict[int, list[torch.Tensor]]:
    base: dict[str, object] = dict(nodes=5, topology="ring", dataset="digits", partition="modulo",
                                   rounds=5, batch_size=16, eval_every=5, device="cpu", seed=3)
    base.update(overrides)
    config = validate_config(RunConfig(**base))  # type: ignore[arg-type]
    return simulate.run(config, tmp_path / name).models


def same(a: dict[int, list[torch.Tensor]], b: dict[int, list[torch.Tensor]]) -> bool:
    return all(torch.equal(x, y) for i in a for x, y in zip(a[i], b[i], strict=True))


@pytest.mark.parametrize(("compressed", "plain"), [("compcga", "cga"), ("compngc", "ngc")])
def test_the_none_compressor_gives_the_plain_algorithm_bit_for_bit(
        compressed: str, plain: str, tmp_path: Path) -> None:
    a = run(tmp_path, "a", algorithm=compressed, compressor="none")
    b = run(tmp_path, "b", algorithm=plain)
    assert same(a, b)


def test_compressed_cross_gradients_change_the_run_and_stay_finite(tmp_path: Path) -> None:
    plain = run(tmp_path, "plain", algorithm="cga")
    for spec in ("sign", "topk:0.05", "qsgd:4", "randk:0.1", "fp16"):
        models = run(tmp_path, spec.replace(":", "_"), algorithm="compcga", compressor=spec)
        assert not same(models, plain), spec
        assert all(bool(torch.isfinite(p).all()) for ps in models.values() for p in ps), spec


def test_compcga_defaults_to_the_scaled_sign() -> None:
    assert RunConfig(algorithm="compcga").compressor == "sign"
    assert RunConfig(algorithm="cga").compressor == "none"


@pytest.mark.parametrize(("field", "value", "message"), [
    ("compressor", "topk:0", "k"),
    ("compressor", "topk:1.5", "k"),
    ("compressor", "qsgd:0", "s"),
    ("compressor", "zip", "known compressors"),
    ("model_compressor", "sign", "consensus-step"),
])
def test_bad_compressor_settings_fail_at_start(field: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(RunConfig(**{field: value}))  # type: ignore[arg-type]


def test_qsgd_error_feedback_is_scaled_to_stay_contractive() -> None:
    """QSGD is unbiased, not contractive: error feedback sends C(e + x) / (1 + omega)."""
    from peer.compression import ErrorFeedback, make

    qsgd = make("qsgd:7")
    feedback = ErrorFeedback(qsgd)
    x = torch.randn(8192, generator=torch.Generator().manual_seed(0))
    for step in range(50):  # the residual stays bounded instead of growing without end
        feedback.compress(0, 0, x, seed=step)
    residual = feedback.residual(0, 0)
    assert residual is not None and bool(torch.isfinite(residual).all())
    omega = qsgd.omega(8192)  # type: ignore[attr-defined]
    assert float(residual.norm()) < 2 * (1 + omega) * float(x.norm())

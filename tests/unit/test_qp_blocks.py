"""The projection's float64 arithmetic a block at a time (peer/algorithms/qp.py, BLOCK).

A tensor of at most BLOCK elements must give the bits of the whole-tensor float64 formula
(docs/algorithms.md, "CGA's QP"); a larger one the same answer within round-off; and the
projection of a large tensor must not hold float64 copies of whole gradients.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from peer.algorithms import qp
from peer.algorithms.qp import QPOptions, project_many, solve_duals

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is no package of the wheel
from bench import projection


def whole_tensor(own: torch.Tensor, rows: list[torch.Tensor],
                 options: QPOptions) -> tuple[torch.Tensor, np.ndarray | None]:
    """The projection as one float64 product over whole tensors (the definition)."""
    g = own.reshape(-1).to(torch.float64)
    m = torch.stack([r.reshape(-1) for r in rows]).to(torch.float64)
    m = m[(m * m).sum(dim=1) > 0]
    if m.shape[0] == 0:
        return own.clone(), None
    gram, mg = (m @ m.T).numpy(), (m @ g).numpy()
    [v] = solve_duals([(gram, mg)], options)
    assert isinstance(v, np.ndarray)
    g_tilde = g + m.T @ torch.as_tensor(v, dtype=torch.float64)
    return g_tilde.reshape(own.shape).to(own.dtype), v


def conflicting(gen: torch.Generator, shape: tuple[int, ...], t: int,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A self-gradient and t rows, the first pulled against it so that the QP has work."""
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    rows = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(t)]
    rows[0] = -g + 0.3 * rows[0]
    return g.to(dtype), [r.to(dtype) for r in rows]


@pytest.mark.parametrize("shape", [(10,), (32, 1, 3, 3), (64, 32, 3, 3), (577, 129)])
@pytest.mark.parametrize("t", [1, 2, 4])
def test_one_block_gives_the_bits_of_the_whole_tensor_formula(shape: tuple[int, ...],
                                                              t: int) -> None:
    gen = torch.Generator().manual_seed(t * 1000 + len(shape))
    own, rows = conflicting(gen, shape, t)
    if len(shape) == 4:  # the layout a channels_last gradient pass hands over
        own = own.contiguous(memory_format=torch.channels_last)
        rows = [r.contiguous(memory_format=torch.channels_last) for r in rows]
    [result] = project_many([own], [rows], QPOptions(), {})
    expected, v = whole_tensor(own, rows, QPOptions())
    assert v is not None and result.v is not None
    np.testing.assert_array_equal(result.v, v)
    assert torch.equal(result.grad, expected)
    assert result.grad.dtype == own.dtype and result.grad.shape == own.shape


def test_zero_and_nan_rows_are_left_out_as_before() -> None:
    gen = torch.Generator().manual_seed(7)
    own, rows = conflicting(gen, (50,), 2)
    zero = torch.zeros(50)
    nan = rows[1].clone()
    nan[3] = float("nan")
    [result] = project_many([own], [[rows[0], zero, nan, rows[1]]], QPOptions(), {})
    expected, v = whole_tensor(own, [rows[0], zero, nan, rows[1]], QPOptions())
    assert result.v is not None and result.v.shape == (2,)
    np.testing.assert_array_equal(result.v, v)
    assert torch.equal(result.grad, expected)
    [alone] = project_many([own], [[zero, nan]], QPOptions(), {})
    assert alone.v is None and torch.equal(alone.grad, own)
    with pytest.raises(qp.SolverError, match="NaN or Inf"):
        project_many([own], [[torch.full((50,), float("inf"))]], QPOptions(), {})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_many_blocks_give_the_same_answer_within_round_off(
        monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(11)
    tensors = [conflicting(gen, shape, 3, dtype) for shape in [(1000,), (33, 7), (5,)]]
    own = [g for g, _ in tensors]
    rows = [r for _, r in tensors]
    rows[1][2] = torch.zeros_like(rows[1][2])
    expected = [whole_tensor(g, r, QPOptions()) for g, r in tensors]
    monkeypatch.setattr(qp, "BLOCK", 64)  # 16 blocks, 4 blocks and one
    results = project_many(own, rows, QPOptions(), {})
    for result, (grad, v) in zip(results, expected, strict=True):
        assert result.v is not None and v is not None
        np.testing.assert_allclose(result.v, v, rtol=1e-9, atol=0)
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(result.grad, grad, rtol=tol, atol=tol)


def test_a_large_tensor_is_projected_without_float64_copies_of_whole_gradients() -> None:
    d, t = 16 << 20, 2  # 64 MiB per float32 gradient; whole float64 copies would be 384 MiB
    blocked = projection.measure(d, t, qp.BLOCK)
    whole = projection.measure(d, t, projection.WHOLE)  # one block: the whole-tensor formula
    assert not blocked.fell_back and not whole.fell_back
    # The answer itself (64 MiB, float32) and (t + 1) float64 blocks of 8 MiB, with slack.
    assert blocked.peak_mib < 160, f"peak memory grew by {blocked.peak_mib:.0f} MiB"
    assert whole.peak_mib > 300, f"the whole-tensor formula grew only {whole.peak_mib:.0f} MiB"

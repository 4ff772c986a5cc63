"""The CGA projection (peer/algorithms/qp.py) on known solutions, KKT and failure paths."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from peer.algorithms.base import StepInputs
from peer.algorithms.cga import CGA, aggregate
from peer.algorithms.qp import MARGIN, QPOptions, project

F64 = torch.float64


def rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64)


def brute_force_cone_projection(z: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Projection of z onto {y : m y >= 0} by enumerating active sets (exact for small t)."""
    best, best_dist = None, np.inf
    t = m.shape[0]
    for size in range(t + 1):
        for active in itertools.combinations(range(t), size):
            a = m[list(active)]
            if size:
                lam = -np.linalg.lstsq(a @ a.T, a @ z, rcond=None)[0]
                if np.any(lam < -1e-10):
                    continue
                y = z + a.T @ lam
            else:
                y = z.copy()
            if np.all(m @ y >= -1e-9) and np.linalg.norm(y - z) < best_dist:
                best, best_dist = y, np.linalg.norm(y - z)
    assert best is not None
    return best


def test_one_neighbor_closed_form() -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        g, m = rand(gen, 30), rand(gen, 30)
        result = project(g, [m], QPOptions())
        v = max(MARGIN, -float(m @ g) / float(m @ m))
        assert result.v is not None
        assert result.v[0] == pytest.approx(v, rel=1e-9, abs=1e-12)
        torch.testing.assert_close(result.grad, g + v * m, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("t", [1, 2, 3, 5, 8, 16])
def test_kkt_and_feasibility_on_random_problems(t: int) -> None:
    gen = torch.Generator().manual_seed(t)
    for trial in range(20):
        d = 40 if trial % 2 else 7  # d < t makes the Gram matrix singular for t > 7
        g = rand(gen, d) * 10 ** float(torch.empty(1).uniform_(-2, 2, generator=gen))
        rows = [rand(gen, d) for _ in range(t)]
        result = project(g, rows, QPOptions())
        assert not result.fell_back and result.v is not None
        m = torch.stack(rows)
        slack = m @ result.grad  # (t,) = multipliers of v >= margin
        assert float(slack.min()) >= -1e-8, "primal feasibility <g~, pi_il g_il> >= 0"
        assert result.v.min() >= MARGIN - 1e-12, "dual feasibility v >= margin"
        # Complementary slackness, relative to the problem's scale ||z|| max_l ||row_l||.
        z = g + MARGIN * m.sum(dim=0)
        scale = float(z.norm() * m.norm(dim=1).max())
        comp = (torch.as_tensor(result.v) - MARGIN) * slack
        assert float(comp.abs().max()) <= 1e-7 * max(1.0, scale), "complementary slackness"


@pytest.mark.parametrize("t", [1, 2, 3, 4, 5])
def test_primal_projection_identity(t: int) -> None:
    """g~ = projection of g + margin sum rows onto {z : <z, row_l> >= 0} (ALGORITHMS.md, 3)."""
    gen = torch.Generator().manual_seed(100 + t)
    for _ in range(25):
        g = rand(gen, 12)
        rows = [rand(gen, 12) for _ in range(t)]
        result = project(g, rows, QPOptions())
        m = torch.stack(rows).numpy()
        expected = brute_force_cone_projection(g.numpy() + MARGIN * m.sum(axis=0), m)
        np.testing.assert_allclose(result.grad.numpy(), expected, rtol=1e-7, atol=1e-9)


def test_aligned_gradients_give_the_plain_weighted_aggregate() -> None:
    gen = torch.Generator().manual_seed(2)
    g = rand(gen, 20)
    rows = [0.5 * g, 2.0 * g + 0.01 * rand(gen, 20)]
    result = project(g, rows, QPOptions())
    assert result.v is not None
    np.testing.assert_allclose(result.v, [MARGIN, MARGIN], atol=1e-9)
    torch.testing.assert_close(result.grad, g + MARGIN * (rows[0] + rows[1]))


def test_collinear_conflicting_rows() -> None:
    gen = torch.Generator().manual_seed(3)
    m = rand(gen, 25)
    g = -3.0 * m + 0.1 * rand(gen, 25)
    rows = [m, 2.0 * m, -0.0 * m + 1e-3 * m]  # collinear: rank-one Gram matrix
    result = project(g, rows, QPOptions())
    assert not result.fell_back
    for r in rows:
        assert float(result.grad @ r) >= -1e-8


def test_zero_rows_are_dropped() -> None:
    gen = torch.Generator().manual_seed(4)
    g, m = rand(gen, 10), rand(gen, 10)
    alone = project(g, [torch.zeros(10, dtype=F64)], QPOptions())
    assert alone.v is None
    torch.testing.assert_close(alone.grad, g)
    with_zero = project(g, [m, torch.zeros(10, dtype=F64)], QPOptions())
    only = project(g, [m], QPOptions())
    assert with_zero.v is not None and with_zero.v.shape == (1,)
    torch.testing.assert_close(with_zero.grad, only.grad)


def test_conflicting_gradient_is_projected_not_reversed() -> None:
    m = torch.tensor([1.0, 0.0], dtype=F64)
    g = torch.tensor([-1.0, 1.0], dtype=F64)
    result = project(g, [m], QPOptions())
    # z = g + 0.5 m = (-0.5, 1) violates <z, m> >= 0; its projection is (0, 1).
    torch.testing.assert_close(result.grad, torch.tensor([0.0, 1.0], dtype=F64), atol=1e-10,
                               rtol=0)


def test_forced_solver_failure_takes_the_fallback_and_is_counted() -> None:
    gen = torch.Generator().manual_seed(5)
    g = rand(gen, 30)
    rows = [-g + 0.1 * rand(gen, 30), rand(gen, 30)]
    failing = QPOptions(maxiters=1)
    first = project(g, rows, failing)
    assert first.fell_back
    np.testing.assert_array_equal(first.v, [MARGIN, MARGIN])
    torch.testing.assert_close(first.grad, g + MARGIN * (rows[0] + rows[1]))
    previous = np.array([0.7, 0.9])
    second = project(g, rows, failing, previous_v=previous)
    assert second.fell_back
    np.testing.assert_array_equal(second.v, previous)
    wrong_length = project(g, rows, failing, previous_v=np.array([0.7]))
    np.testing.assert_array_equal(wrong_length.v, [MARGIN, MARGIN])

    algo = CGA(momentum=0.0, qp=failing)
    inputs = StepInputs(node=0, params=[torch.zeros(30, dtype=F64), torch.zeros(3, dtype=F64)],
                        neighbor_params={}, weights={0: 0.5, 1: 0.25, 2: 0.25},
                        self_grad=[g, rand(gen, 3)], lr=0.1,
                        received={1: [rows[0], rand(gen, 3)], 2: [rows[1], rand(gen, 3)]})
    out = aggregate(inputs, failing, {}, algo.stats)
    assert algo.stats["qp_fallbacks"] == 2 and algo.stats["qp_calls"] == 2
    assert all(bool(torch.isfinite(o).all()) for o in out)


def test_float32_tensors_keep_their_dtype_and_device() -> None:
    g = torch.randn(4, 5)
    rows = [torch.randn(4, 5), torch.randn(4, 5)]
    result = project(g, rows, QPOptions())
    assert result.grad.dtype == torch.float32 and result.grad.shape == (4, 5)

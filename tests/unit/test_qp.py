"""The CGA projection (peer/algorithms/qp.py) on known solutions, KKT and failure paths."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from crossgrad.errors import SolverError
from peer.algorithms.base import StepInputs
from peer.algorithms.cga import CGA, aggregate
from peer.algorithms.qp import MARGIN, QPOptions, project, solve_dual, solve_duals

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
    """g~ = projection of g + margin sum rows onto {z : <z, row_l> >= 0}.

    docs/algorithms.md, "cga", step 3."""
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
    # Stopping after one iteration without the polish is a deterministic non-optimal stop; with
    # the polish the same stop is rescued (test_early_stop_is_rescued_by_the_polish).
    failing = QPOptions(maxiters=1, polish=False)
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


# Problems on which cvxopt (default options) stops with status 'unknown' after 100 iterations,
# found by a search over 3,000-problem batches of random conflicting per-tensor problems (1-6
# neighbors, gradient scales 1e-6 to 1e3). Both are well conditioned (cond(M M^T) about 3e3 and
# 8e2), so the exact v is unique and float64 pins it down; cvxopt's own last iterate is far
# from it (v_1 = 6.14 against 3.22 in the first), so the polish is what makes them usable.
UNKNOWN_STATUS_CASES = {
    "t3_scale1e2": (
        [[-17.940871578030663, -85.81474902685098, 17.71119979481748, -9.92578319525151,
          19.110274669467046],
         [4.635648343475371, -173.4354486894428, -2.796859858691416, -1.471448765914166,
          55.8041563472548],
         [-3.145025050350159, -1350.5432620004194, 186.9384532635965, -95.694139648503,
          587.38895453688]],
        [94.87682718746515, 1265.747937004757, -345.5919896781253, 52.45337778031147,
         -581.2469799287054],
    ),
    "t5_scale1e-4": (
        [[-6.676352436329391e-05, -9.164342602011194e-07, 7.908272368972539e-05,
          3.583147448115052e-05, 5.44087772547139e-05],
         [5.082775445030155e-05, 2.9637131032174075e-05, 2.480272168152611e-05,
          2.0852172555594818e-06, 1.5129270630091554e-05],
         [0.00012216907725340557, 2.3876888095573264e-05, 4.291527157741453e-05,
          2.51334515729252e-05, -0.00011910017680583166],
         [-1.3852428679894114e-06, -0.00021807830032520592, -0.000104868890887276,
          9.188429298433395e-05, -1.4981494368639947e-05],
         [-3.4858547184565772e-06, 2.029190795205339e-05, -1.205654877286959e-05,
          -8.225255720856603e-06, -2.208212687830711e-06]],
        [5.602684127377703e-06, -3.348812062185477e-05, 1.76070382376622e-05,
         1.4655361505327439e-05, -1.1633165030962422e-07],
    ),
}


def brute_force_dual(gram: np.ndarray, mg: np.ndarray, margin: float) -> np.ndarray:
    """min 1/2 v'Gv + q'v s.t. v >= margin for nonsingular G, by trying every active set.

    Exactly one active set gives a point that is primal and dual feasible (strict convexity);
    tolerances are relative to the size of the terms in G v + q.
    """
    t = mg.shape[0]
    found = []
    for active in itertools.product([True, False], repeat=t):
        a = np.array(active)
        v = np.full(t, margin)
        if (~a).any():
            v[~a] = np.linalg.solve(gram[np.ix_(~a, ~a)], -(mg[~a] + gram[np.ix_(~a, a)] @ v[a]))
        size = np.abs(gram).max() * np.abs(v).sum() + np.abs(mg).max()
        if np.all(v >= margin) and np.all(gram[a] @ v + mg[a] >= -1e-12 * size):
            found.append(v)
    assert len(found) == 1, f"expected one KKT point, found {len(found)}"
    return found[0]


def assert_kkt(m: np.ndarray, g: np.ndarray, v: np.ndarray, margin: float, tol: float) -> None:
    """KKT of the dual in primal terms: g~ = g + M'v, multipliers <g~, M_l>, each relative to
    the size of the terms that cancel in it, ||M_l|| (||g|| + sum_k v_k ||M_k||)."""
    norms = np.linalg.norm(m, axis=1)  # (t,)
    multipliers = m @ (g + m.T @ v)  # (t,)
    size = norms * (np.linalg.norm(g) + v @ norms)  # (t,)
    assert np.all(v >= margin), "dual feasibility v >= margin"
    assert np.all(multipliers >= -tol * size), "primal feasibility <g~, M_l> >= 0"
    free = v > margin * (1 + tol)
    assert np.all(np.abs(multipliers[free]) <= tol * size[free]), "complementary slackness"


@pytest.mark.parametrize("name", sorted(UNKNOWN_STATUS_CASES))
def test_unknown_status_is_polished_to_the_exact_answer(name: str) -> None:
    m, g = (np.array(x) for x in UNKNOWN_STATUS_CASES[name])
    gram, mg = m @ m.T, m @ g
    # Without the polish a non-optimal stop is a failure, as every one was before the rescue:
    # this is the fallback the case used to take.
    with pytest.raises(SolverError, match="status 'unknown' after 100 iterations"):
        solve_dual(gram, mg, QPOptions(polish=False))
    v = solve_dual(gram, mg, QPOptions())
    assert_kkt(m, g, v, MARGIN, tol=1e-12)
    np.testing.assert_allclose(v, brute_force_dual(gram, mg, MARGIN), rtol=1e-10, atol=0)
    result = project(torch.as_tensor(g), [torch.as_tensor(r) for r in m], QPOptions())
    assert not result.fell_back
    expected = brute_force_cone_projection(g + MARGIN * m.sum(axis=0), m)
    scale = float(np.linalg.norm(g + MARGIN * m.sum(axis=0)))
    np.testing.assert_allclose(result.grad.numpy(), expected, rtol=0, atol=1e-10 * scale)


def test_joint_solve_polishes_each_block_on_its_own() -> None:
    """Both unknown-status cases and an easy one in one cvxopt call: each block comes out as
    its own solve does, none falls back."""
    gen = torch.Generator().manual_seed(6)
    g = rand(gen, 8)
    easy = torch.stack([-g + 0.1 * rand(gen, 8), rand(gen, 8)]).numpy()
    cases = [(np.array(mm), np.array(gg)) for mm, gg in UNKNOWN_STATUS_CASES.values()]
    cases.append((easy, g.numpy()))
    problems = [(mm @ mm.T, mm @ gg) for mm, gg in cases]
    joint = solve_duals(problems, QPOptions())
    for (gram, mg), v in zip(problems, joint, strict=True):
        assert isinstance(v, np.ndarray)
        np.testing.assert_allclose(v, solve_dual(gram, mg, QPOptions()), rtol=1e-9, atol=0)


def test_early_stop_is_rescued_by_the_polish() -> None:
    """maxiters=1 stops cvxopt with status 'unknown' deterministically; the polish still finds
    the exact answer, the one the full solve gives."""
    gen = torch.Generator().manual_seed(5)
    g = rand(gen, 30)
    m = torch.stack([-g + 0.1 * rand(gen, 30), rand(gen, 30)]).numpy()
    gram, mg = m @ m.T, m @ g.numpy()
    with pytest.raises(SolverError, match="status 'unknown' after 1 iterations"):
        solve_dual(gram, mg, QPOptions(maxiters=1, polish=False))
    v = solve_dual(gram, mg, QPOptions(maxiters=1))
    np.testing.assert_allclose(v, solve_dual(gram, mg, QPOptions()), rtol=1e-12, atol=0)
    np.testing.assert_allclose(v, brute_force_dual(gram, mg, MARGIN), rtol=1e-10, atol=0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_problems_still_raise(bad: float) -> None:
    m, g = (np.array(x) for x in UNKNOWN_STATUS_CASES["t3_scale1e2"])
    gram, mg = m @ m.T, m @ g
    broken = mg.copy()
    broken[1] = bad
    with pytest.raises(SolverError, match="NaN or Inf"):
        solve_dual(gram, broken, QPOptions())
    broken_gram = gram.copy()
    broken_gram[0, 2] = broken_gram[2, 0] = bad
    with pytest.raises(SolverError):
        solve_dual(broken_gram, mg, QPOptions())
    with pytest.raises(SolverError, match="non-positive"):
        solve_dual(np.zeros((2, 2)), np.zeros(2), QPOptions())


@st.composite
def conflicting_problems(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, float]:
    """Unit-scale (rows, self-gradient), rows pulled slightly against g so that most conflict
    with the aggregate, and a scale 1e-6..1e3.

    Entries are multiples of 1/64, so exact collinearity, zero rows and d < t (singular
    Gram matrices) all come up.
    """
    t = draw(st.integers(1, 5))
    d = draw(st.integers(1, 6))
    entry = st.integers(-64, 64).map(lambda k: k / 64)
    g = np.array(draw(st.lists(entry, min_size=d, max_size=d)))
    rows = []
    for _ in range(t):
        noise = np.array(draw(st.lists(entry, min_size=d, max_size=d)))
        rows.append(-draw(st.integers(0, 4)) / 8 * g + noise)
    scale = 10.0 ** draw(st.integers(-6, 3))
    return np.stack(rows), g, scale


# Degenerate problems hypothesis found (g = 0, zero rows): cvxopt's answers there are exact to
# ~1e-9 absolute, so the checks below allow 1e-8 (they allowed 1e-9 until these turned up).
DEGENERATE = [np.array([[0, 0, 0], [0, 0, 0], [0, 0, 0.65625], [0, 0.015625, 0],
                        [0, -0.09375, -0.015625]]),
              np.array([[0, 0, 0], [0, 0, 0], [0, 0, 0.625], [0, 0.015625, 0],
                        [0, -0.046875, -0.015625]])]


@settings(max_examples=150, deadline=None)
@given(problem=conflicting_problems(), maxiters=st.sampled_from([1, 3, 100]))
@example(problem=(DEGENERATE[0], np.zeros(3), 1.0), maxiters=100)
@example(problem=(DEGENERATE[1], np.zeros(3), 1.0), maxiters=100)
def test_whenever_solve_dual_returns_it_is_the_exact_projection(
        problem: tuple[np.ndarray, np.ndarray, float], maxiters: int) -> None:
    """Property: any v solve_dual returns (optimal or rescued from an early stop) satisfies
    KKT and gives the exact projection g~ (unique even where v is not: singular M M^T)."""
    m, g, scale = problem
    try:
        v = solve_dual(scale * m @ (scale * m).T, scale * m @ (scale * g),
                       QPOptions(maxiters=maxiters))
    except SolverError:
        return  # a counted fallback; the property is about what it returns
    assert_kkt(scale * m, scale * g, v, MARGIN, tol=1e-8)
    # The projection is positively homogeneous and the cone ignores row scale: compare at unit
    # scale, where the enumeration's absolute tolerances hold.
    z = g + MARGIN * m.sum(axis=0)
    expected = brute_force_cone_projection(z, m)
    np.testing.assert_allclose((g + m.T @ v), expected, rtol=0,
                               atol=1e-8 * max(1.0, float(np.linalg.norm(z))))

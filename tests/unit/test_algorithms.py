"""Algorithms against their reference equations (docs/algorithms.md), with stated tolerances."""

from __future__ import annotations

import pytest
import torch

from crossgrad.errors import UnknownNameError
from peer import algorithms
from peer.algorithms.base import Hyperparameters, StepInputs
from peer.algorithms.cga import CGA, DivergedError
from peer.algorithms.ngc import NGC

# float32 sums taken in a different order than the reference: a few ulps of O(1) values.
ATOL = 1e-6


def params(gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)]


def test_registry_lists_known_names() -> None:
    assert {"dpsgd", "cga", "ngc"} <= set(algorithms.ALGORITHMS)
    known = "known algorithms: cga, compcga, compngc, dpsgd, ngc"
    with pytest.raises(UnknownNameError, match=known):
        algorithms.make("sgd")


def test_dpsgd_on_the_full_graph_averages_then_steps() -> None:
    """Uniform weights on the full graph: x_i' = mean_l x_l - lr (g_i + mu m_i), every node."""
    gen = torch.Generator().manual_seed(0)
    n, lr, mu = 4, 0.05, 0.9
    models = [params(gen) for _ in range(n)]
    algos = [algorithms.make("dpsgd", Hyperparameters(momentum=mu)) for _ in range(n)]
    ref_m = [[torch.zeros_like(p) for p in models[0]] for _ in range(n)]
    for _ in range(3):  # several rounds so momentum matters
        grads = [params(gen) for _ in range(n)]
        weights = {l: 1.0 / n for l in range(n)}
        new = []
        for i in range(n):
            others = {l: models[l] for l in range(n) if l != i}
            new.append(algos[i].step(StepInputs(node=i, params=models[i], neighbor_params=others,
                                                weights=weights, self_grad=grads[i], lr=lr)))
        for i in range(n):
            for k in range(len(models[0])):
                ref_m[i][k] = mu * ref_m[i][k] + grads[i][k]
                avg = torch.stack([models[l][k] for l in range(n)]).mean(dim=0)
                expected = avg - lr * (grads[i][k] + mu * ref_m[i][k])
                torch.testing.assert_close(new[i][k], expected, atol=ATOL, rtol=0)
        models = new


def test_cga_without_neighbors_is_local_sgd_with_nesterov_momentum() -> None:
    """No neighbors: pi_ii = 1, g~ = g_ii, and the update is torch.optim.SGD(nesterov=True)."""
    gen = torch.Generator().manual_seed(1)
    x = params(gen)
    ref = [p.clone().requires_grad_(True) for p in x]
    opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, nesterov=True)
    algo = algorithms.make("cga", Hyperparameters(momentum=0.9))
    for _ in range(5):
        g = params(gen)
        x = algo.step(StepInputs(node=0, params=x, neighbor_params={}, weights={0: 1.0},
                                 self_grad=g, lr=0.1))
        for r, gr in zip(ref, g, strict=True):
            r.grad = gr.clone()
        opt.step()
        for a, b in zip(x, ref, strict=True):
            torch.testing.assert_close(a, b.detach(), atol=ATOL, rtol=0)
    assert algo.stats.get("qp_calls", 0) == 0


def test_cga_step_uses_the_projected_gradient() -> None:
    """One neighbor, conflicting gradient: the step direction satisfies <g~, pi g_ij> >= 0."""
    gen = torch.Generator().manual_seed(2)
    x, y = params(gen), params(gen)
    g_self = params(gen)
    g_cross = [-2.0 * g for g in g_self]  # the neighbor's data pulls the other way
    algo = CGA(momentum=0.0)
    weights = {0: 0.5, 1: 0.5}
    new = algo.step(StepInputs(node=0, params=x, neighbor_params={1: y}, weights=weights,
                               self_grad=g_self, lr=1.0, received={1: g_cross}))
    for k in range(len(x)):
        mixed = 0.5 * x[k] + 0.5 * y[k]
        direction = mixed - new[k]  # lr = 1, mu = 0: the direction is g~
        assert float((direction * g_cross[k]).sum()) >= -1e-5
    assert algo.stats["qp_calls"] == 2 and algo.stats.get("qp_fallbacks", 0) == 0


def test_cga_refuses_to_step_on_a_diverged_gradient() -> None:
    gen = torch.Generator().manual_seed(3)
    x = params(gen)
    bad = params(gen)
    bad[0][0, 0] = float("nan")
    with pytest.raises(DivergedError, match="lower --lr"):
        CGA().step(StepInputs(node=0, params=x, neighbor_params={}, weights={0: 1.0},
                              self_grad=bad, lr=0.1))


def test_ngc_follows_its_equations() -> None:
    gen = torch.Generator().manual_seed(4)
    x, y, z = params(gen), params(gen), params(gen)
    g, r1, r2, h1, h2 = (params(gen) for _ in range(5))
    w = {0: 0.4, 1: 0.3, 2: 0.3}
    gamma, alpha, lr, mu = 0.1, 0.25, 0.05, 0.9
    algo = NGC(momentum=mu, gamma=gamma, alpha=alpha)
    assert algo.uses_received and algo.uses_local
    new = algo.step(StepInputs(node=0, params=x, neighbor_params={1: y, 2: z}, weights=w,
                               self_grad=g, lr=lr, received={1: r1, 2: r2}, local={1: h1, 2: h2}))
    for k in range(len(x)):
        half = x[k] + gamma * (0.4 * x[k] + 0.3 * y[k] + 0.3 * z[k] - x[k])
        dv = 0.4 * g[k] + 0.3 * r1[k] + 0.3 * r2[k]
        mv = 0.4 * g[k] + 0.3 * h1[k] + 0.3 * h2[k]
        gt = alpha * dv + (1 - alpha) * mv
        expected = half - lr * (gt + mu * gt)  # first round: m = g~
        torch.testing.assert_close(new[k], expected, atol=ATOL, rtol=0)


def test_ngc_flags_follow_alpha() -> None:
    assert not NGC(alpha=0.0).uses_received and NGC(alpha=0.0).uses_local
    assert NGC(alpha=1.0).uses_received and not NGC(alpha=1.0).uses_local
    with pytest.raises(Exception, match="gamma"):
        NGC(gamma=0.0)

"""Neighborhood Gradient Clustering (Aketi, Kodge, Roy; arXiv 2209.14390).

docs/algorithms.md, "ngc". Gossip first, then gradients:

    x_i^{t+1/2} = x_i^t + gamma (sum_l pi_il x_l^t - x_i^t)
    g_ii = grad F_i(x_i^{t+1/2}; B_i)
    h_il = grad F_i(x_l^t; B_i)      model-variant: computed locally, also what i serves to l
    r_il = grad F_l(x_i^t; B_l)      data-variant: received from l
    DV = pi_ii g_ii + sum_l pi_il r_il;   MV = pi_ii g_ii + sum_l pi_il h_il
    g~ = alpha DV + (1 - alpha) MV
    m_i <- mu m_i + g~;   x_i^{t+1} = x_i^{t+1/2} - lr (g~ + mu m_i)

The paper's code weighs every term 1/(deg+1); we use the mixing weights pi_il, which are equal
on regular graphs. alpha = 0 needs no second communication round (uses_received is False) and
alpha = 1 needs no model-variant term (uses_local is False).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from crossgrad.errors import ConfigError
from peer.algorithms.base import (
    Algorithm,
    Hyperparameters,
    Params,
    StepInputs,
    mix,
    nesterov,
    register,
)


def weighted_sum(node: int, self_grad: Params, others: Mapping[int, Params],
                 weights: Mapping[int, float]) -> Params:
    """pi_ii g_ii + sum_l pi_il others[l], per tensor; a missing l contributes nothing."""
    out: Params = []
    for k, own in enumerate(self_grad):
        acc = own * weights[node]
        for l in sorted(others):
            acc = acc + others[l][k] * weights[l]
        out.append(acc)
    return out


@register
class NGC(Algorithm):
    name = "ngc"
    gossips_first = True

    def __init__(self, momentum: float = 0.9, gamma: float = 0.1, alpha: float = 1.0) -> None:
        super().__init__(momentum)
        if not 0.0 < gamma <= 1.0:
            raise ConfigError(f"ngc needs 0 < gamma <= 1 (the consensus step size); got {gamma}")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"ngc needs 0 <= alpha <= 1 (data-variant weight); got {alpha}")
        self.gamma = float(gamma)
        self.alpha = float(alpha)
        self.uses_received = self.alpha > 0.0
        self.uses_local = self.alpha < 1.0

    @classmethod
    def from_hyperparameters(cls, hp: Hyperparameters) -> NGC:
        return cls(momentum=hp.momentum, gamma=hp.gamma, alpha=hp.alpha)

    def self_grad_point(self, node: int, params: Params, neighbor_params: Mapping[int, Params],
                        weights: Mapping[int, float],
                        own_replica: Params | None = None) -> Params:
        if own_replica is not None:  # replicas: x_i + gamma sum_l pi_il (x^_l - x^_i)
            out: Params = []
            for k, (x, own) in enumerate(zip(params, own_replica, strict=True)):
                acc = torch.zeros_like(x)
                for l in sorted(neighbor_params):
                    acc = acc + weights[l] * (neighbor_params[l][k] - own)
                out.append(x + self.gamma * acc)
            return out
        mixed = mix(node, params, neighbor_params, weights)
        return [x + self.gamma * (m - x) for x, m in zip(params, mixed, strict=True)]

    def step(self, inputs: StepInputs) -> Params:
        half = self.self_grad_point(inputs.node, inputs.params, inputs.neighbor_params,
                                    inputs.weights, inputs.own_replica)
        if self.alpha == 1.0:
            combined = weighted_sum(inputs.node, inputs.self_grad, inputs.received, inputs.weights)
        elif self.alpha == 0.0:
            combined = weighted_sum(inputs.node, inputs.self_grad, inputs.local, inputs.weights)
        else:
            dv = weighted_sum(inputs.node, inputs.self_grad, inputs.received, inputs.weights)
            mv = weighted_sum(inputs.node, inputs.self_grad, inputs.local, inputs.weights)
            a = self.alpha
            combined = [a * d + (1.0 - a) * m for d, m in zip(dv, mv, strict=True)]
        direction = nesterov(self.momentum_buffers(inputs.params), combined, self.mu)
        return [x - inputs.lr * d for x, d in zip(half, direction, strict=True)]

"""Cross-Gradient Aggregation (Esfandiari, Tan, Jiang, Balu, Herron, Hegde, Sarkar; ICML 2021).

docs/algorithms.md, "cga". Per round and per parameter tensor k:

    g   = pi_ii g_ii[k]                      (the node's own gradient, weighted)
    M   = [pi_il g_il[k] for l in N(i)]      (cross-gradients received from the neighbors)
    g~  = project(g, M)                      (the dual QP with margin 0.5: peer/algorithms/qp.py)
    m_i <- mu m_i + g~;   x_i <- sum_l pi_il x_l - lr (g~ + mu m_i)

Differences from the reference code, on purpose: gradients are taken in train mode with a seeded
RNG (the reference switches to eval mode after round one); the Gram matrix stays on the model's
device; the QP is scaled and polished (qp.py). A failed QP falls back as docs/algorithms.md
("cga", step 4) says and is counted in `stats["qp_fallbacks"]`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from crossgrad.errors import CrossgradError
from peer.algorithms.base import (
    Algorithm,
    Hyperparameters,
    Params,
    StepInputs,
    combine,
    nesterov,
    register,
)
from peer.algorithms.qp import QPOptions, project_many
from peer.training.checkpoint import CheckpointError


class DivergedError(CrossgradError):
    """The node's own gradient is NaN or Inf: training has diverged (lower the learning rate)."""


def finite(tensors: Params) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def aggregate(inputs: StepInputs, qp: QPOptions, previous_v: dict[int, np.ndarray],
              stats: dict[str, float]) -> Params:
    """The per-tensor projected gradients g~ (steps 1-4), updating previous_v and stats."""
    if not finite(inputs.self_grad):
        raise DivergedError(f"node {inputs.node}: its own gradient holds NaN or Inf; training "
                            "diverged: lower --lr")
    senders = sorted(inputs.received)
    started = time.perf_counter()
    own = [g * inputs.weights[inputs.node] for g in inputs.self_grad]
    rows = [[inputs.received[l][k] * inputs.weights[l] for l in senders]
            for k in range(len(own))]
    out: Params = []
    for k, result in enumerate(project_many(own, rows, qp, previous_v)):
        if result.v is not None:
            previous_v[k] = result.v
            stats["qp_calls"] = stats.get("qp_calls", 0) + 1
        if result.fell_back:
            stats["qp_fallbacks"] = stats.get("qp_fallbacks", 0) + 1
        out.append(result.grad)
    stats["qp_seconds"] = stats.get("qp_seconds", 0.0) + time.perf_counter() - started
    return out


@register
class CGA(Algorithm):
    name = "cga"
    uses_received = True

    def __init__(self, momentum: float = 0.9, qp: QPOptions | None = None) -> None:
        super().__init__(momentum)
        self.qp = qp or QPOptions()
        self._previous_v: dict[int, np.ndarray] = {}

    @classmethod
    def from_hyperparameters(cls, hp: Hyperparameters) -> CGA:
        return cls(momentum=hp.momentum, qp=QPOptions(margin=hp.margin, eps=hp.qp_eps))

    def step(self, inputs: StepInputs) -> Params:
        projected = aggregate(inputs, self.qp, self._previous_v, self.stats)
        direction = nesterov(self.momentum_buffers(inputs.params), projected, self.mu)
        mixed = combine(inputs)
        return [x - inputs.lr * d for x, d in zip(mixed, direction, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        """Momentum and the last QP duals per tensor (the fallback when a QP fails), the
        duals as float64 tensors: a checkpoint holds tensors, not numpy arrays."""
        previous = {k: torch.from_numpy(v.copy()) for k, v in self._previous_v.items()}
        return {**super().state_dict(), "previous_v": previous}

    def check_state(self, state: Mapping[str, Any], like: Sequence[torch.Tensor]) -> None:
        super().check_state(state, like)
        previous = state.get("previous_v", {})
        if not isinstance(previous, dict):
            raise CheckpointError(f"cga previous_v: expected a table of duals, found "
                                  f"{type(previous).__name__}")
        for k, v in previous.items():
            if not (isinstance(k, int) and 0 <= k < len(like)):
                raise CheckpointError(f"cga previous_v: key {k!r}, expected a tensor index "
                                      f"below {len(like)}")
            if not (isinstance(v, torch.Tensor) and v.dim() == 1 and v.is_floating_point()):
                raise CheckpointError(f"cga previous_v[{k}]: expected a vector of duals")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._previous_v = {int(k): v.detach().cpu().numpy().copy()
                            for k, v in state.get("previous_v", {}).items()}

    def reset_memory(self) -> None:
        super().reset_memory()
        self._previous_v = {}

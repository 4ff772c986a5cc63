"""D-PSGD with Nesterov momentum: the baseline ("CDMSGD"/"DPMSGD" in the papers).

docs/algorithms.md, "dpsgd" (Lian et al., NeurIPS 2017, with momentum as in the CGA code):

    m_i <- mu m_i + g_ii
    x_i <- sum_{l in N(i) u {i}} pi_il x_l  -  lr (g_ii + mu m_i)

Neighbors' parameters are their round-t values. mu = 0 gives CDSGD.
"""

from __future__ import annotations

from peer.algorithms.base import Algorithm, Params, StepInputs, combine, nesterov, register


@register
class DPSGD(Algorithm):
    name = "dpsgd"

    def step(self, inputs: StepInputs) -> Params:
        momentum = self.momentum_buffers(inputs.params)
        direction = nesterov(momentum, inputs.self_grad, self.mu)
        mixed = combine(inputs)
        return [x - inputs.lr * d for x, d in zip(mixed, direction, strict=True)]

"""CompCGA and CompNGC: CGA and NGC on compressed gradients with error feedback.

docs/algorithms.md, "compcga and compngc" (the NGC repository's CompCGA, and (Aketi et al.):

    sender l, for neighbor i and tensor p:  c = C(e_li[p] + g_il[p]);  e_li[p] += g_il[p] - c
    receiver i, its own gradient:           s = C(e_i[p] + g_ii[p]);   e_i[p]  += g_ii[p] - s

The sender side lives in the node (peer/node.py compresses every cross-gradient it serves, per
link, and the same compressed tensor is what NGC's model-variant term uses locally); this module
adds the receiver's own compression of its self-gradient, then runs the plain CGA or NGC step on
[s, received c's]. Default C: the scaled sign; any registered compressor may be chosen. With
the `none` compressor both reduce to CGA and NGC bit for bit (a test).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from crossgrad.seeding import derive_seed
from peer.algorithms.base import Hyperparameters, Params, StepInputs, register
from peer.algorithms.cga import CGA
from peer.algorithms.ngc import NGC
from peer.algorithms.qp import QPOptions
from peer.compression import ErrorFeedback
from peer.compression import make as make_compressor
from peer.training.checkpoint import check_residuals


def compress_self(memory: ErrorFeedback, inputs: StepInputs) -> Params:
    """s = C(e_i + g_ii) per tensor, with the node's own error-feedback memory (link = itself)."""
    out: Params = []
    for k, g in enumerate(inputs.self_grad):
        seed = derive_seed(inputs.seed, inputs.node, inputs.round, "compress-self", k)
        record = memory.compress(inputs.node, k, g, seed=seed)
        out.append(memory.compressor.decompress(record).to(g.dtype))
    return out


class SelfCompression:
    """The receiver's half of compcga / compngc: its own gradient through the compressor."""

    memory: ErrorFeedback
    # ef21 / clag:Z (peer/compression/threepoint.py): the self-gradient never crosses a link
    # and is used exact (docs/algorithms.md, "Three-point compressors for cross-gradients").
    exact_self: bool = False

    def step(self, inputs: StepInputs) -> Params:
        if not self.exact_self:
            inputs.self_grad = compress_self(self.memory, inputs)
        return super().step(inputs)  # type: ignore[misc]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "self_memory": self.memory.state_dict()}  # type: ignore[misc]

    def reset_memory(self) -> None:
        super().reset_memory()  # type: ignore[misc]
        self.memory.reset()  # the residual of a trajectory the node left

    def check_state(self, state: Mapping[str, Any], like: Sequence[torch.Tensor]) -> None:
        super().check_state(state, like)  # type: ignore[misc]
        check_residuals("self-gradient error-feedback memory", state.get("self_memory", {}),
                        like)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)  # type: ignore[misc]
        self.memory.load_state_dict(state.get("self_memory", {}))


@register
class CompCGA(SelfCompression, CGA):
    name = "compcga"

    def __init__(self, momentum: float = 0.9, qp: QPOptions | None = None,
                 compressor: str = "sign") -> None:
        super().__init__(momentum, qp)
        self.memory = ErrorFeedback(make_compressor(compressor))

    @classmethod
    def from_hyperparameters(cls, hp: Hyperparameters) -> CompCGA:
        algo = cls(momentum=hp.momentum, qp=QPOptions(margin=hp.margin, eps=hp.qp_eps),
                   compressor=hp.compressor)
        algo.exact_self = hp.feedback != "ef"
        return algo


@register
class CompNGC(SelfCompression, NGC):
    name = "compngc"

    def __init__(self, momentum: float = 0.9, gamma: float = 0.1, alpha: float = 1.0,
                 compressor: str = "sign") -> None:
        super().__init__(momentum, gamma, alpha)
        self.memory = ErrorFeedback(make_compressor(compressor))

    @classmethod
    def from_hyperparameters(cls, hp: Hyperparameters) -> CompNGC:
        algo = cls(momentum=hp.momentum, gamma=hp.gamma, alpha=hp.alpha,
                   compressor=hp.compressor)
        algo.exact_self = hp.feedback != "ef"
        return algo

"""What every algorithm is: a state object with a pure step over tensors, in a registry by name.

An algorithm never sees a network object. The round driver (peer/node.py) gathers, for node i at
round t, the tensors docs/algorithms.md names and hands them over in a StepInputs:

    params            x_i^t, one tensor per model parameter in named_parameters order
    neighbor_params   {l: x_l^t} for the neighbors that answered this round
    weights           {l: pi_il} over those neighbors and i itself, summing to 1 (a neighbor that
                      missed its deadline has its weight moved to i by the driver)
    self_grad         g_ii, taken at the point self_grad_point() returned
    received          {l: g_il = grad F_l(x_i^t; B_l)}: i's model on l's data, computed at l
    local             {l: h_il = grad F_i(x_l^t; B_i)}: l's model on i's data (NGC's model-variant)
    lr                the round's learning rate

Two flags tell the driver what to gather: `uses_received` (ask the neighbors for cross-gradients:
a second communication round) and `uses_local` (compute the neighbors' models' gradients on the
local batch for its own use; they are also what the node serves to those neighbors).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from crossgrad.errors import UnknownNameError
from peer.training.checkpoint import check_tensors

Params = list[torch.Tensor]


@dataclass
class StepInputs:
    """The tensors of one round for one node (see module docstring)."""

    node: int
    params: Params
    neighbor_params: Mapping[int, Params]
    weights: Mapping[int, float]
    self_grad: Params
    lr: float
    received: Mapping[int, Params] = field(default_factory=dict)
    local: Mapping[int, Params] = field(default_factory=dict)
    round: int = 0  # seeds the stochastic compressors of compcga / compngc
    seed: int = 0  # the run seed
    # Under model replicas (docs/algorithms.md, "Compressed models: replicas"): x^_i^t, and
    # neighbor_params hold the replicas x^_l^t. The step then leaves mixing to the replicas'
    # gossip (combine) and NGC gossips on the replicas (NGC.self_grad_point).
    own_replica: Params | None = None


def mix(node: int, params: Params, neighbor_params: Mapping[int, Params],
        weights: Mapping[int, float]) -> Params:
    """sum_{l in N(i) u {i}} pi_il x_l, per tensor, in a fixed order (self first, then by id)."""
    order = [node, *sorted(neighbor_params)]
    out: Params = []
    for k, own in enumerate(params):
        acc = own * weights[node]
        for l in order[1:]:
            acc = acc + neighbor_params[l][k] * weights[l]
        out.append(acc)
    return out


def combine(inputs: StepInputs) -> Params:
    """The point the gradient step starts from: the mixed model, or x_i^t itself under replicas
    (the step is then local, and the replicas' gossip follows it: peer/replicas.py)."""
    if inputs.own_replica is not None:
        return inputs.params
    return mix(inputs.node, inputs.params, inputs.neighbor_params, inputs.weights)


def nesterov(momentum: Params, grads: Params, mu: float) -> Params:
    """m <- mu m + g (in place); returns the step direction g + mu m (Nesterov form)."""
    out: Params = []
    for m, g in zip(momentum, grads, strict=True):
        m.mul_(mu).add_(g)
        out.append(g + mu * m)
    return out


class Algorithm:
    """Base class: hyperparameters and memory of one node; `step` returns x_i^{t+1}."""

    name: ClassVar[str]
    uses_received: bool = False
    uses_local: bool = False
    gossips_first: ClassVar[bool] = False  # NGC: under replicas, no gossip after the step

    def __init__(self, momentum: float = 0.9) -> None:
        self.mu = float(momentum)
        self._momentum: Params | None = None
        self.stats: dict[str, float] = {}

    @classmethod
    def from_hyperparameters(cls, hp: Hyperparameters) -> Algorithm:
        return cls(momentum=hp.momentum)

    def momentum_buffers(self, like: Sequence[torch.Tensor]) -> Params:
        if self._momentum is None:
            self._momentum = [torch.zeros_like(p) for p in like]
        return self._momentum

    def self_grad_point(self, node: int, params: Params, neighbor_params: Mapping[int, Params],
                        weights: Mapping[int, float],
                        own_replica: Params | None = None) -> Params:
        """Where the self-gradient is taken: x_i^t for all but NGC (own_replica: StepInputs)."""
        return params

    def step(self, inputs: StepInputs) -> Params:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Memory to checkpoint (momentum buffers and algorithm-specific state), as copies:
        the step updates the momentum in place. Only tensors, dicts, lists, numbers and None
        (peer/training/checkpoint.py stores it without pickling objects)."""
        momentum = None if self._momentum is None else [m.clone() for m in self._momentum]
        return {"momentum": momentum}

    def check_state(self, state: Mapping[str, Any], like: Sequence[torch.Tensor]) -> None:
        """CheckpointError naming the tensor unless `state` fits a model shaped as `like`."""
        if state.get("momentum") is not None:
            check_tensors("algorithm momentum", state["momentum"], like)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state_dict() (checked by check_state first when it comes from a file)."""
        momentum = state.get("momentum")
        self._momentum = None if momentum is None else [m.clone() for m in momentum]

    def reset_memory(self) -> None:
        """Forget the trajectory (momentum and what subclasses keep of past rounds), as at
        round 0: a node that jumps to its neighbors' round does not continue its own path."""
        self._momentum = None


@dataclass(frozen=True)
class Hyperparameters:
    """Every algorithm's knobs in one place; each algorithm reads the ones it has.

    momentum: mu in the Nesterov update (0.9 in both papers; 0 gives plain SGD steps).
    margin: CGA's lower bound on the QP's dual variables (0.5 in the CGA code).
    qp_eps: ridge on the scaled Gram matrix (see peer/algorithms/qp.py).
    gamma: NGC's consensus step size (0.1 in the NGC code; 1 mixes fully).
    alpha: NGC's weight on the data-variant (received) term; 0 skips the cross-gradient RPCs.
    compressor: compcga / compngc pass the self-gradient through this compressor with its own
        error-feedback memory, as the senders do with the cross-gradients.
    """

    momentum: float = 0.9
    margin: float = 0.5
    qp_eps: float = 1e-12
    gamma: float = 0.1
    alpha: float = 1.0
    # compcga / compngc: the self-gradient's compressor (docs/algorithms.md)
    compressor: str = "none"
    # compcga / compngc: ef compresses the self-gradient too; ef21 / clag:Z use it exact
    feedback: str = "ef"


ALGORITHMS: dict[str, Callable[[Hyperparameters], Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    ALGORITHMS[cls.name] = cls.from_hyperparameters
    return cls


def make(name: str, hp: Hyperparameters | None = None) -> Algorithm:
    """algorithms.make("cga", Hyperparameters(...)); an unknown name lists the known ones."""
    if name not in ALGORITHMS:
        raise UnknownNameError("algorithm", name, ALGORITHMS)
    return ALGORITHMS[name](hp or Hyperparameters())

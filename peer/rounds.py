"""What a round is made of, apart from the node that runs it (peer/node.py): how a node reaches
its neighbors (Neighborhood, EstimateSource), what the bootstrap assigns it (Assignment), what a
round records (RoundRecord) and where its time went (RoundPhases), the weights of the neighbors
that answered, and the plausibility checks of what they sent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import google_crc32c
import torch

from crossgrad.errors import InvalidMessage
from peer.algorithms.base import Params
from peer.compression import Compressed
from peer.compression.base import check_finite
from peer.replicas import Replica, Update


class Neighborhood(Protocol):
    """How a node reaches its neighbors. Missing neighbors are simply absent from the result."""

    def models(self, round_: int, neighbors: Sequence[int]) -> dict[int, Params]:
        """x_j^round for each neighbor j that answered."""
        ...

    def cross_gradients(self, round_: int, neighbors: Sequence[int]) -> dict[int, Params]:
        """grad F_j(x_me^round; B_j^round), computed at j, for each neighbor j that answered."""
        ...

    def wait_seconds(self) -> float | None:
        """Of the last models() or cross_gradients() call, the seconds spent before the last
        neighbor began to answer (the rest moved and decoded bytes); None when the neighbors
        live in this process and the call's time was their computing (the simulator)."""
        ...


class EstimateSource(Protocol):
    """Under EF21 / CLAG, where the messages of the neighbors' cross-gradients come from."""

    def estimate_updates(self, round_: int, neighbors: Sequence[int]) -> dict[int, Update]:
        """Each neighbor's cross-gradient message of round_ for this node, decoded."""
        ...

    def estimates(self, round_: int, neighbors: Sequence[int]) -> dict[int, Replica]:
        """Each neighbor's dense estimates of the cross-gradients it sends this node, after
        round_'s message (a resync), with their digest."""
        ...


@dataclass(frozen=True)
class ThreePointMessage:
    """What a sender under EF21 / CLAG sent a requester for a round: the records (None for a
    skipped tensor), their decoded deltas, the digest of the estimates they build on (base)
    and of those after them (digest)."""

    records: list[Compressed | None]
    deltas: Params
    base: int
    digest: int

    @property
    def crcs(self) -> tuple[int, ...]:
        return tuple(0 if r is None else google_crc32c.value(r.payload) for r in self.records)

    @property
    def skipped(self) -> tuple[bool, ...]:
        return tuple(r is None for r in self.records)


@dataclass(frozen=True)
class Assignment:
    """What the bootstrap tells a node: its neighbors and mixing weights (self included)."""

    neighbors: tuple[int, ...]
    weights: Mapping[int, float]
    epoch: int = 0


@dataclass
class RoundRecord:
    """What one round did, for metrics and the progress display."""

    node: int
    round: int
    loss: float
    lr: float
    answered: list[int]
    missing: list[int]
    seconds: float
    stats: dict[str, float] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)  # RoundPhases.as_dict()
    # Seconds this node spent computing cross-gradients for its neighbors during the round,
    # off the round driver (server threads, the precompute worker): it overlaps the phases.
    served_seconds: float = 0.0


# The parts of a round's time, in the order a round runs them (RoundPhases).
PHASES = ("compute", "wait", "transfer", "qp", "mix", "checkpoint")


@dataclass
class RoundPhases:
    """Where one round's time went, in seconds; the parts add up to RoundRecord.seconds but
    for the bookkeeping between them (microseconds).

    compute    gradients on this node (its own, NGC's model-variant ones) and the checks of
               the fetched models; in the simulator also the neighbors' answers, computed here
    wait       from asking the neighbors until the last of them began to answer: their own
               computing and their lateness; and the round driver's wait while this node
               computed its neighbors' cross-gradients first (served_seconds)
    transfer   the rest of the calls: bytes on the wire, decoding and validating them
    qp         CGA's quadratic programs (the algorithm's stats["qp_seconds"])
    mix        the rest of the algorithm's step: mixing, momentum, self-gradient compression
    checkpoint writing the node's checkpoint after the round (a deployed peer, every K rounds)
    """

    compute: float = 0.0
    wait: float = 0.0
    transfer: float = 0.0
    qp: float = 0.0
    mix: float = 0.0
    checkpoint: float = 0.0

    def called(self, neighborhood: Neighborhood, seconds: float) -> None:
        """Book `seconds` spent in one call of `neighborhood` (see wait_seconds)."""
        waited = neighborhood.wait_seconds()
        if waited is None:
            self.compute += seconds
            return
        waited = min(max(waited, 0.0), seconds)
        self.wait += waited
        self.transfer += seconds - waited

    def stepped(self, seconds: float, qp_seconds: float) -> None:
        """Book the algorithm's step: `qp_seconds` of it solving QPs, the rest mixing."""
        qp = min(max(qp_seconds, 0.0), seconds)
        self.qp += qp
        self.mix += seconds - qp

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in PHASES}


def effective_weights(node: int, assignment: Assignment,
                      answered: Sequence[int]) -> dict[int, float]:
    """Weights over the answering neighbors and the node; absentees' weight goes to the node."""
    weights = {l: float(assignment.weights[l]) for l in answered}
    weights[node] = 1.0 - sum(weights.values())
    return weights


# A neighbor's model whose values are this many times larger than the node's own is left out
# of the round (Node._drop_implausible).
PLAUSIBLE_RATIO = 1e3


def max_abs(t: torch.Tensor) -> float:
    """max |t| (0 for an empty tensor), NaN-propagating; two reductions, no temporary."""
    if t.numel() == 0:
        return 0.0
    t = t.detach()
    if t.device.type == "cpu" and t.dtype in (torch.float16, torch.float32, torch.float64):
        a = t.numpy()  # numpy's reductions: single-threaded, no wait on torch's thread pool
        lo, hi = float(a.min()), float(a.max())
    else:
        lo_t, hi_t = torch.aminmax(t)
        lo, hi = float(lo_t), float(hi_t)
    return math.nan if math.isnan(lo) or math.isnan(hi) else max(hi, -lo)


def check_finite_tensor(t: torch.Tensor, what: str) -> None:
    """InvalidMessage when t holds NaN or Inf (numpy's exponent-bit scan on the CPU)."""
    if t.device.type == "cpu":
        check_finite(t.detach().reshape(-1), what)
    elif not bool(torch.isfinite(t).all()):
        raise InvalidMessage(f"{what}: NaN or Inf among the values")

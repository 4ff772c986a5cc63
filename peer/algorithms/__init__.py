"""Pure algorithms over tensors, in a registry by name (never imports grpc or crossgrad.v1)."""

from peer.algorithms import cga, compressed, dpsgd, ngc  # noqa: F401  (register them)
from peer.algorithms.base import ALGORITHMS, Algorithm, Hyperparameters, StepInputs, make

__all__ = ["ALGORITHMS", "Algorithm", "Hyperparameters", "StepInputs", "make"]

"""Helpers shared by the unit tests that build whole runs in this process (test_simulate,
test_checkpoint): a validated RunConfig from a test's defaults, and every node of it."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from crossgrad.config import RunConfig
from peer.builder import assignments, load_run_data, make_node, validate_config
from peer.node import Node


def run_config(defaults: Mapping[str, object], **overrides: object) -> RunConfig:
    """RunConfig(**defaults, **overrides), validated as the CLI validates it."""
    return validate_config(RunConfig(**{**defaults, **overrides}))  # type: ignore[arg-type]


def build(cfg: RunConfig) -> list[Node]:
    """Every node of the run, on the CPU, exactly as the simulator builds them."""
    data = load_run_data(cfg)
    _, assigned = assignments(cfg)
    return [make_node(cfg, data, i, assigned[i], torch.device("cpu")) for i in range(cfg.nodes)]

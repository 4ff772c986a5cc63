"""Helpers shared by the Peer service tests: real PeerRuntimes on 127.0.0.1:0, and exact
comparisons of parameter lists (what "the node's state is unchanged" means in these tests)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from peer.node import Params
from peer.service import PeerOptions, PeerRuntime


def start_runtime(node_id: int, timeout: float = 5.0) -> PeerRuntime:
    """A serving PeerRuntime with no bootstrap: the test attaches a node itself."""
    runtime = PeerRuntime(PeerOptions(node_id=node_id, bootstrap="unused:1",
                                      bind="127.0.0.1:0", timeout=timeout))
    runtime.serve()
    return runtime


def clone(params: Sequence[torch.Tensor]) -> Params:
    return [p.detach().clone() for p in params]


def assert_same(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)

"""Helpers shared by the tensor-stream tests (test_wire, test_wire_fuzz): a tensor's bytes as the
wire carries them, and the bit-exact comparison every round trip ends with."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def raw_bytes(t: torch.Tensor) -> bytes:
    """The tensor's bytes as the wire carries them: little-endian, row-major."""
    if t.numel() == 0:  # (an empty tensor may have stride 0, which view(torch.uint8) refuses)
        return b""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_exact(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        assert tuple(g.shape) == tuple(w.shape)
        assert raw_bytes(g) == raw_bytes(w)  # bit-exact: -0.0, subnormals, NaN payloads alike

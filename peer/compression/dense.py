"""Dense codecs: `none` (the raw elements) and the casts `fp16` and `bf16`.

`none` is the identity: the payload is the tensor's own little-endian bytes, and decoding gives the
same bits back (compcga with `none` equals cga bit for bit).

`fp16` and `bf16` send each element cast to 16 bits (2x fewer bytes than float32) and decode by
casting back to the original dtype. Values already representable in the target type round-trip
exactly; others are rounded to nearest even. Deliberate choice: the sender clamps to the target's
finite range first (+-65504 for fp16, +-3.39e38 for bf16) instead of letting a large value become
Inf, which every receiver would (rightly) reject; the clamped excess is a compression error like
any other and error feedback carries it. fp16 flushes magnitudes below 6e-8 to zero. A NaN stays
NaN, and the receiver rejects the record.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from peer.compression.base import (
    Compressed,
    Compressor,
    check_finite,
    copy_into,
    register,
    tensor_bytes,
    tensor_view,
)


@register
class NoCompression(Compressor):
    """`none`: the raw elements of the original dtype; decoding is bit-exact."""

    name = "none"
    form = "none"

    def _compress(self, flat: torch.Tensor, seed: int) -> tuple[dict[str, float], bytes]:
        return {}, tensor_bytes(flat)

    @classmethod
    def _decode(cls, c: Compressed, out: torch.Tensor | None) -> torch.Tensor:
        view = tensor_view(c.payload, c.dtype, c.numel, "none payload")
        check_finite(view, "none payload")
        return copy_into(out, view)  # one copy, straight into `out` when given


class _Cast(Compressor):
    """A cast to a 16-bit float type, clamped to its finite range (see module docstring)."""

    target: ClassVar[torch.dtype]

    def _compress(self, flat: torch.Tensor, seed: int) -> tuple[dict[str, float], bytes]:
        top = torch.finfo(self.target).max
        if torch.finfo(flat.dtype).max > top:  # a float16 source never needs it for bf16
            # Clamp in a type that holds `top` exactly (bfloat16 would round 65504 up to 65536).
            wide = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
            flat = wide.clamp(-top, top)
        return {}, tensor_bytes(flat.to(self.target))

    @classmethod
    def _decode(cls, c: Compressed, out: torch.Tensor | None) -> torch.Tensor:
        what = f"{cls.name} payload"
        cast = tensor_view(c.payload, cls.target, c.numel, what)
        check_finite(cast, what)
        if c.dtype == cls.target:
            return copy_into(out, cast)
        return cast.to(c.dtype) if out is None else out.copy_(cast)


@register
class Fp16(_Cast):
    """`fp16`: IEEE half precision, 2 bytes per element."""

    name = "fp16"
    form = "fp16"
    target = torch.float16


@register
class Bf16(_Cast):
    """`bf16`: bfloat16 (float32's range, 8 bits of mantissa), 2 bytes per element."""

    name = "bf16"
    form = "bf16"
    target = torch.bfloat16

"""Sparsifiers: `topk:K` (largest magnitudes, values + packed indices) and `randk:K` (seeded).

Both keep k of the d elements and zero the rest, so both are contractive with delta = k/d
(Stich, Cordonnier and Jaggi, "Sparsified SGD with Memory", NeurIPS 2018, definition 2.1):
    ||x - C(x)||^2 <= (1 - k/d) ||x||^2
always for top-k, in expectation for random-k; error feedback (feedback.py) makes up the rest.

topk payload: the k kept values in the original dtype, in increasing index order, then the indices
in one of two codings, whichever is smaller for this density (params["index_coding"]):
    BITMAP (0)   d bits, bit i set when i is kept (bits.pack_bitmap): ceil(d/8) bytes;
    VARINT (1)   the k gaps idx_0, idx_1 - idx_0, ... as LEB128 varints (bits.pack_varints).
Varints rather than fixed-width gaps (both measured on 1% of 10M uniform positions: 128.0 KB vs
137.5 KB for 11-bit fields): a varint costs 1 byte for a gap below 128 and 2 below 16384, and
one long gap (indices clustered in a few rows, as real gradients are) does not widen every field.
The bitmap wins above a density of about 1/8 (once most gaps fit in one varint byte). Selection
is exact (select.py).

randk: k coordinates drawn without replacement from the seed (numpy PCG64, Generator.choice),
sorted; only the values and the seed travel, and the receiver draws the same coordinates from
params["seed"]. The seed on the wire is the low 53 bits of the one compress() got, since codec
parameters are doubles. Deliberate choice: values are NOT scaled by d/k. docs/algorithms.md sends
the values as they are, which keeps random-k contractive (scaled, it is unbiased but has variance
(d/k - 1) ||x||^2, which error feedback does not tolerate well). Both peers must run the same numpy
(Generator streams are stable within a version).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from crossgrad.errors import ConfigError, InvalidMessage
from peer.compression.base import (
    Compressed,
    Compressor,
    check_finite,
    gather_bytes,
    int_param,
    parse_number,
    register,
    scatter,
    tensor_bytes,
    tensor_from_bytes,
)
from peer.compression.bits import (
    pack_bitmap,
    pack_varints,
    packed_nbytes,
    unpack_bitmap,
    unpack_varints,
    varint_lengths,
)
from peer.compression.select import top_k

BITMAP, VARINT = 0, 1
WIRE_SEED_MASK = (1 << 53) - 1  # a double holds integers up to 2**53 exactly


class _KeepK(Compressor):
    """Shared by topk and randk: the K of the spec, and the count it means for d elements."""

    def __init__(self, k: float) -> None:
        if isinstance(k, bool) or not math.isfinite(k) or k <= 0 or (k > 1 and k != int(k)):
            raise ConfigError(f"{self.name}: k={k!r} must be a fraction in (0, 1) of the "
                              f"elements or an integer count >= 1 (e.g. {self.name}:0.01 or "
                              f"{self.name}:100)")
        self.fraction = float(k) if k < 1 else None
        self.count_k = int(k) if k >= 1 else None

    @classmethod
    def parse(cls, arg: str | None) -> Compressor:
        if not arg:
            raise ConfigError(f"compressor {cls.name!r} needs k: write {cls.form} "
                              f"(e.g. {cls.name}:0.01 or {cls.name}:100)")
        return cls(parse_number(cls.name, arg, "k"))

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.fraction!r}" if self.fraction is not None \
            else f"{self.name}:{self.count_k}"

    def count(self, d: int) -> int:
        """Elements kept of d: round(k d) within [1, d] for a fraction, min(k, d) for a count."""
        if d == 0:
            return 0
        if self.fraction is not None:
            return min(d, max(1, round(self.fraction * d)))
        assert self.count_k is not None
        return min(d, self.count_k)

    def _check_config(self, c: Compressed) -> None:
        expected = self.count(c.numel)
        if c.params["k"] != expected:
            raise InvalidMessage(f"{c.codec} record: k={c.params['k']!r}, expected {expected} "
                                 f"({self.spec} of {c.numel} elements)")

    @staticmethod
    def _record_k(c: Compressed) -> int:
        d = c.numel
        return int_param(c, "k", 1 if d else 0, d)


@register
class TopK(_KeepK):
    """`topk:K`: the k largest |x_i| (exactly k; ties to the lower index) and their indices."""

    name = "topk"
    form = "topk:K"
    param_names = frozenset({"k", "index_coding"})

    def _compress(self, flat: torch.Tensor, seed: int) -> tuple[dict[str, float], bytes]:
        d = flat.numel()
        k = self.count(d)
        source = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
        idx, kept = top_k(source.numpy(), k, seed)  # (k,) increasing indices, their values
        # A float16/bfloat16 value went up to float32 and comes back down exactly.
        values = tensor_bytes(torch.from_numpy(kept).to(flat.dtype))
        gaps = np.diff(idx, prepend=0)
        if int(varint_lengths(gaps).sum()) < packed_nbytes(d, 1):
            coding, index_bytes = VARINT, pack_varints(gaps)
        else:
            coding, index_bytes = BITMAP, pack_bitmap(idx, d)
        return {"k": float(k), "index_coding": float(coding)}, values + index_bytes

    @classmethod
    def _decode(cls, c: Compressed, out: torch.Tensor | None) -> torch.Tensor:
        d = c.numel
        k = cls._record_k(c)
        coding = int_param(c, "index_coding", BITMAP, VARINT)
        value_bytes = k * torch.empty((), dtype=c.dtype).element_size()
        payload = memoryview(c.payload).cast("B")
        if len(payload) < value_bytes:
            raise InvalidMessage(f"topk payload: {len(payload)} bytes, shorter than its k={k} "
                                 f"values of {c.dtype} ({value_bytes} bytes)")
        index_bytes = payload[value_bytes:]
        if coding == BITMAP:
            idx = unpack_bitmap(index_bytes, d, "topk indices")
            if idx.size != k:
                raise InvalidMessage(f"topk indices: the bitmap marks {idx.size} elements, "
                                     f"expected k={k}")
        else:
            idx = _indices_from_gaps(unpack_varints(index_bytes, k, "topk indices"), d)
        values = tensor_from_bytes(payload[:value_bytes], c.dtype, k, "topk values")
        check_finite(values, "topk values")
        return scatter(out, d, idx, values)


def _indices_from_gaps(gaps: np.ndarray, d: int) -> np.ndarray:
    """Indices from their gaps (first from 0), checking they are unique and in range [0, d)."""
    if gaps.size == 0:
        return np.zeros(0, np.int64)
    repeated = np.flatnonzero(gaps[1:] == 0)
    if repeated.size:
        j = int(repeated[0]) + 1
        raise InvalidMessage(f"topk indices: index {j} repeats index {j - 1} (a zero gap); "
                             "indices must be unique and increasing")
    if int(gaps.max()) >= d:
        raise InvalidMessage(f"topk indices: a gap of {int(gaps.max())} reaches beyond the "
                             f"{d} elements")
    idx = np.cumsum(gaps, dtype=np.uint64)  # gaps < d <= 2**32, k <= d: no overflow
    if int(idx[-1]) >= d:
        raise InvalidMessage(f"topk indices: index {int(idx[-1])} out of range for {d} elements")
    return idx.astype(np.int64)


@register
class RandK(_KeepK):
    """`randk:K`: k coordinates drawn from the seed; only their values (unscaled) travel."""

    name = "randk"
    form = "randk:K"
    param_names = frozenset({"k", "seed"})

    def _compress(self, flat: torch.Tensor, seed: int) -> tuple[dict[str, float], bytes]:
        d = flat.numel()
        k = self.count(d)
        wire_seed = seed & WIRE_SEED_MASK
        values = gather_bytes(flat, random_indices(d, k, wire_seed))
        return {"k": float(k), "seed": float(wire_seed)}, values

    @classmethod
    def _decode(cls, c: Compressed, out: torch.Tensor | None) -> torch.Tensor:
        d = c.numel
        k = cls._record_k(c)
        seed = int_param(c, "seed", 0, WIRE_SEED_MASK)
        values = tensor_from_bytes(c.payload, c.dtype, k, "randk values")
        check_finite(values, "randk values")
        return scatter(out, d, random_indices(d, k, seed), values)


def random_indices(d: int, k: int, seed: int) -> np.ndarray:
    """k distinct indices of [0, d), increasing, drawn from the seed (O(k) for small k/d)."""
    idx = np.random.default_rng(seed).choice(d, size=k, replace=False, shuffle=False)
    idx.sort()
    return idx.astype(np.int64, copy=False)

"""Quantizers: `qsgd:S` (stochastic, norm-scaled levels) and `sign` (scaled 1-bit sign).

qsgd (Alistarh, Grubic, Li, Tomioka and Vojnovic, "QSGD", NeurIPS 2017, eq. (1) and lemma 3.1):
    Q(x)_i = ||x||_2 sign(x_i) xi_i / s,    xi_i = l_i + Bernoulli(s|x_i|/||x||_2 - l_i)
with l_i = floor(s|x_i|/||x||_2), so E[Q(x)] = x and
    E||Q(x) - x||^2 <= min(d/s^2, sqrt(d)/s) ||x||^2.
Differences from the paper: the levels are not Elias-coded; each element is packed in
b + 1 bits (b = ceil(log2(s + 1)) bits of level, then the sign bit: bits.pack_uint), the fewest
for a fixed width, and ||x||_2 travels as params["norm"]. The sign bit is set only for nonzero
levels. The uniform draws come from numpy's PCG64 seeded by the caller, not a torch.Generator:
half the time of torch.rand here (40 vs 84 ms for 10M), and just as deterministic. The norm is
accumulated in float32 (BLAS dot; float64 when x is); a level that rounding pushes above s is
clamped to s, a bias of order 1e-7 relative on one element at most. Both directions run in
chunks of bits.CHUNK elements through small reused buffers (no d-sized temporaries), and levels
of up to 8 bits decode through a table of the 2^(b+1) possible values.

sign (the scaled sign of Karimireddy, Rebjock, Stich and Jaggi, "Error Feedback Fixes SignSGD",
ICML 2019, algorithm 2 with C(x) = ||x||_1/d sign(x)): one bit per element (1 = negative,
np.packbits little-endian) and the scale ||x||_1/d as params["scale"], so a tensor of d elements
costs ceil(d/8) + 8 bytes. Decision: a zero element is sent as +scale (sign(0) = +1), so
||C(x)||_1 = d * scale = ||x||_1 holds exactly, up to rounding the scale to the tensor's dtype.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from crossgrad.errors import ConfigError, InvalidMessage
from peer.compression.base import (
    Compressed,
    Compressor,
    int_param,
    parse_number,
    register,
    scale_param,
)
from peer.compression.bits import CHUNK, pack_uint, packed_nbytes, unpack_uint

MAX_LEVELS = (1 << 24) - 1  # levels stay exact in float32


def _as_numpy(flat: torch.Tensor) -> np.ndarray:
    """float32 (float64 for float64 tensors) numpy view or copy of a flat CPU tensor."""
    return (flat if flat.dtype in (torch.float32, torch.float64) else flat.float()).numpy()


def _work_dtype(dtype: torch.dtype) -> type[np.floating]:
    """The numpy type decoded values are computed in before the cast to `dtype`."""
    return np.float64 if dtype == torch.float64 else np.float32


def _chunks(d: int, width: int) -> list[tuple[int, int, int, int]]:
    """(start, n, first byte, end byte) of each chunk of a stream of d fields of `width` bits;
    every chunk but the last holds a multiple of 8 fields, so each starts on a byte."""
    return [(start, min(CHUNK, d - start), start * width // 8,
             packed_nbytes(min(start + CHUNK, d), width)) for start in range(0, d, CHUNK)]


@register
class QSGD(Compressor):
    """`qsgd:S`: s levels per sign, stochastic rounding, b + 1 bits per element plus the norm."""

    name = "qsgd"
    form = "qsgd:S"
    param_names = frozenset({"s", "norm"})

    def __init__(self, s: float) -> None:
        if isinstance(s, bool) or not math.isfinite(s) or s != int(s) or not 1 <= s <= MAX_LEVELS:
            raise ConfigError(f"qsgd: s={s!r} must be an integer number of levels in "
                              f"[1, {MAX_LEVELS}] (e.g. qsgd:4 or qsgd:127)")
        self.s = int(s)

    @classmethod
    def parse(cls, arg: str | None) -> Compressor:
        if not arg:
            raise ConfigError("compressor 'qsgd' needs s: write qsgd:S (e.g. qsgd:4)")
        return cls(parse_number("qsgd", arg, "s"))

    @property
    def spec(self) -> str:
        return f"qsgd:{self.s}"

    def omega(self, d: int) -> float:
        """The variance bound: E||Q(x) - x||^2 <= omega ||x||^2 with omega = min(d/s^2,
        sqrt(d)/s) (Alistarh et al. 2017, lemma 3.1); error feedback scales by 1/(1+omega)."""
        return min(d / self.s**2, d**0.5 / self.s)

    @property
    def bits_per_element(self) -> int:
        return self.s.bit_length() + 1  # ceil(log2(s + 1)) level bits + 1 sign bit

    def _compress(self, flat: torch.Tensor, seed: int) -> tuple[dict[str, float], bytes]:
        x = _as_numpy(flat)
        d, s, b = x.size, self.s, self.s.bit_length()
        with np.errstate(over="ignore", invalid="ignore"):  # handled just below
            norm = math.sqrt(float(np.dot(x, x)))
        if not math.isfinite(norm):  # float32 accumulation overflowed (or x holds NaN/Inf)
            norm = float(np.linalg.norm(x.astype(np.float64)))
        live = norm > 0.0 and math.isfinite(norm)  # else every level is 0 (NaN: refused anyway)
        ratio = x.dtype.type(s / norm) if live else x.dtype.type(0.0)
        rng = np.random.default_rng(seed)
        code_type = np.uint8 if b < 8 else np.uint32
        size = min(CHUNK, d)
        y, level, u = (np.empty(size, x.dtype) for _ in range(3))
        parts: list[bytes] = []
        for start, n, _, _ in _chunks(d, b + 1):
            xc = x[start:start + n]
            if not live:
                parts.append(pack_uint(np.zeros(n, code_type), b + 1))
                continue
            np.multiply(np.abs(xc, out=y[:n]), ratio, out=y[:n])  # s|x_i|/||x|| in [0, s]
            np.floor(y[:n], out=level[:n])
            np.subtract(y[:n], level[:n], out=y[:n])  # the fractional part
            rng.random(n, dtype=x.dtype, out=u[:n])
            level[:n] += u[:n] < y[:n]  # round up with probability = the fraction: unbiased
            np.minimum(level[:n], s, out=level[:n])
            codes = level[:n].astype(code_type)
            codes |= ((xc < 0) & (codes > 0)).astype(code_type) << code_type(b)  # sign bit
            parts.append(pack_uint(codes, b + 1))
        return {"s": float(s), "norm": norm}, b"".join(parts)

    def _check_config(self, c: Compressed) -> None:
        if c.params["s"] != self.s:
            raise InvalidMessage(f"qsgd record: s={c.params['s']!r}, expected {self.s} "
                                 f"(this run compresses with {self.spec})")

    @classmethod
    def _decode(cls, c: Compressed, out: torch.Tensor | None) -> torch.Tensor:
        s = int_param(c, "s", 1, MAX_LEVELS)
        norm = scale_param(c, "norm")
        d, b = c.numel, s.bit_length()
        width, mask = b + 1, (1 << b) - 1
        if len(c.payload) != packed_nbytes(d, width):
            raise InvalidMessage(f"qsgd levels: {len(c.payload)} bytes, expected "
                                 f"{packed_nbytes(d, width)} ({d} fields of {width} bits)")
        work = _work_dtype(c.dtype)
        step = work(norm / s)
        table = None
        if width <= 8:  # value of every possible code: level * step, negated by the sign bit
            codes = np.arange(1 << width)
            table = ((codes & mask) * step * np.where(codes >> b, -1, 1)).astype(work)
        values = np.empty(d, work)  # ignores `out`: a bad level may come in the last chunk
        payload = memoryview(c.payload).cast("B")
        for start, n, lo, hi in _chunks(d, width):
            fields = unpack_uint(payload[lo:hi], n, width, "qsgd levels")
            if s < mask and int((fields & mask).max()) > s:
                raise InvalidMessage(f"qsgd levels: a level of {int((fields & mask).max())}, "
                                     f"above s={s}")
            if table is not None:
                np.take(table, fields, out=values[start:start + n])
            else:
                chunk = values[start:start + n]
                np.multiply((fields & np.uint64(mask)).astype(work), step, out=chunk)
                np.negative(chunk, out=chunk, where=(fields >> np.uint64(b)).astype(np.bool_))
        return torch.from_numpy(values).to(c.dtype)


@register
class Sign(Compressor):
    """`sign`: ||x||_1/d times the sign of each element; 1 bit per element + the scale."""

    name = "sign"
    form = "sign"
    param_names = frozenset({"scale"})

    def _compress(self, flat: torch.Tensor, seed: int) -> tuple[dict[str, float], bytes]:
        x = _as_numpy(flat)
        d = x.size
        l1 = 0.0
        mags = np.empty(min(CHUNK, d), x.dtype)  # chunked: no d-sized temporary
        parts: list[bytes] = []
        for start, n, _, _ in _chunks(d, 1):
            xc = x[start:start + n]
            l1 += float(np.abs(xc, out=mags[:n]).sum(dtype=np.float64))
            parts.append(np.packbits(xc < 0, bitorder="little").tobytes())
        scale = l1 / d if d else 0.0  # Inf or NaN when x holds them: the receiver refuses it
        return {"scale": scale}, b"".join(parts)

    @classmethod
    def _decode(cls, c: Compressed, out: torch.Tensor | None) -> torch.Tensor:
        scale = scale_param(c, "scale")
        d = c.numel
        if len(c.payload) != packed_nbytes(d, 1):
            raise InvalidMessage(f"sign bits: {len(c.payload)} bytes, expected "
                                 f"{packed_nbytes(d, 1)} ({d} fields of 1 bits)")
        work = _work_dtype(c.dtype)
        table = np.array([scale, -scale], work)  # bit 0: +scale, bit 1: -scale
        values = np.empty(d, work)  # ignores `out`: bad padding shows only in the last chunk
        payload = memoryview(c.payload).cast("B")
        for start, n, lo, hi in _chunks(d, 1):
            bits = unpack_uint(payload[lo:hi], n, 1, "sign bits")
            np.take(table, bits, out=values[start:start + n])
        return torch.from_numpy(values).to(c.dtype)

"""What every compressor is: a tensor -> Compressed record -> tensor pair, in a registry by name.

A `Compressed` record IS the wire form of a compressed tensor: a codec name, the original shape and
dtype, a few scalar parameters (k, s, norm, scale, seed: the transport carries them as the
header's `codec_params`, a map of doubles) and the payload bytes. Nothing else travels, so
`nbytes` counts exactly what the codec puts on the wire: the payload plus 8 bytes per parameter
(the transport adds its own header bytes and counts them itself).

Codecs and compressors are in bijection: each registered compressor class owns one codec, named
after it (`none`, `fp16`, `bf16`, `topk`, `randk`, `qsgd`, `sign`), and the module-level `decode`
turns any record back into a tensor from the record alone. A receiver that knows which compressor
its run uses calls `decompress` on its own instance instead, which also checks that the record
matches that configuration (the same codec, the same k for this shape, the same s).

Decoding trusts nothing: every parameter, length, index, bit and scale is checked and anything
inconsistent raises InvalidMessage saying what was expected and what came, before any state is
touched (decoding is pure). Bad specs raise ConfigError or UnknownNameError when the run starts.

Hyperparameters, in a spec string `name[:arg]`:
    topk:K, randk:K   K a fraction in (0, 1) of the tensor's elements (rounded to the nearest
                      count, at least 1) or an integer count >= 1 (capped at the tensor's size).
                      Smaller K: fewer bytes, more error left to error feedback.
    qsgd:S            S >= 1 quantization levels per sign; ceil(log2(S + 1)) + 1 bits per element.
                      QSGD's variance bound min(d/S^2, sqrt(d)/S) ||x||^2 falls as S grows.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from crossgrad.errors import ConfigError, InvalidMessage, UnknownNameError
from peer.compression.bits import CHUNK

PARAM_BYTES = 8  # one double per codec parameter on the wire
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
MAX_NUMEL = 1 << 32  # a decoded tensor never exceeds this (the receiver checks shapes first)
SEED_MASK = (1 << 63) - 1


@dataclass(frozen=True)
class Compressed:
    """One compressed tensor, exactly as it crosses the wire.

    codec    the compressor's name, mapped to a proto enum by the transport
    shape    the original tensor's shape
    dtype    the original tensor's dtype (the decoded tensor has it again)
    params   small scalars the decoder needs (k, s, norm, scale, seed, index_coding)
    payload  the packed bytes (values, indices, bits), little-endian
    """

    codec: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    params: dict[str, float]
    payload: bytes

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes on the wire for this tensor: payload + one double per parameter."""
        return len(self.payload) + PARAM_BYTES * len(self.params)


class Compressor(ABC):
    """Base class: a configured compressor (a spec such as "topk:0.01") and its codec.

    Subclasses set `name` (also the codec name), `form` (how a spec looks, for messages),
    `param_names` (the exact keys of a record's params) and implement `_compress` on a flat,
    contiguous CPU tensor and the classmethod `_decode`, which validates a record and returns the
    flat CPU tensor of dtype `c.dtype`.
    """

    name: ClassVar[str]
    form: ClassVar[str]
    param_names: ClassVar[frozenset[str]] = frozenset()

    @property
    def spec(self) -> str:
        """The canonical spec string: make(c.spec) configures an equal compressor."""
        return self.name

    @classmethod
    def parse(cls, arg: str | None) -> Compressor:
        """Build from the part of a spec after the colon (None when there is none)."""
        if arg is not None:
            raise ConfigError(f"compressor {cls.name!r} takes no parameter, got "
                              f"{cls.name}:{arg}; write {cls.form}")
        return cls()

    def compress(self, x: torch.Tensor, *, seed: int) -> Compressed:
        """Compress a floating tensor. Deterministic: the same (x, seed) gives the same record.

        `seed` feeds the compressor's randomness (randk's coordinates, qsgd's rounding, topk's
        threshold sample); derive it per (node, round, link, tensor) with crossgrad.seeding.
        """
        if x.dtype not in FLOAT_DTYPES:
            raise ConfigError(f"compressor {self.spec} handles float16, bfloat16, float32 and "
                              f"float64 tensors, got {x.dtype}")
        flat = x.detach().reshape(-1).contiguous().cpu()
        params, payload = self._compress(flat, int(seed) & SEED_MASK)
        return Compressed(self.name, tuple(int(n) for n in x.shape), x.dtype, params, payload)

    def decompress(self, c: Compressed, device: torch.device | str | None = None, *,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """Decode a record this compressor produced (or a peer configured alike) into a tensor.

        Raises InvalidMessage when the record does not come from this configuration or is
        malformed in any way (see `decode`, also for `out`).
        """
        if c.codec != self.name:
            raise InvalidMessage(f"codec {c.codec!r}, expected {self.name!r} "
                                 f"(this run compresses with {self.spec})")
        check_record(c, type(self).param_names)
        self._check_config(c)
        return type(self).decode(c, device, out=out)

    @classmethod
    def decode(cls, c: Compressed, device: torch.device | str | None = None, *,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Decode a record of this codec from the record alone, validating everything.

        With `out` (the receiver's preallocated tensor: c's shape and dtype, contiguous) the
        result is written there and `out` is returned; it is written only once the whole record
        has been validated, so a rejected record leaves it untouched. Decoding into a reused
        tensor also skips the page faults of fresh memory (about 20 ms per 40 MB here).
        """
        check_record(c, cls.param_names)
        if out is None:
            flat = cls._decode(c, None)
            return flat.reshape(c.shape) if device is None else flat.reshape(c.shape).to(device)
        if tuple(out.shape) != c.shape or out.dtype != c.dtype:
            raise InvalidMessage(f"{c.codec} record: shape {c.shape} {c.dtype}, expected "
                                 f"{tuple(out.shape)} {out.dtype} (the receiver's tensor)")
        if not out.is_contiguous():
            raise ValueError("decode(out=...) needs a contiguous tensor")
        target = out.view(-1) if out.device.type == "cpu" else None
        flat = cls._decode(c, target)
        if target is None:  # a tensor on another device
            out.view(-1).copy_(flat)
        elif flat is not target:  # a codec that decoded into its own tensor
            copy_into(target, flat)
        return out

    def _check_config(self, c: Compressed) -> None:  # noqa: B027  (an optional hook)
        """Hook: reject a well-formed record whose parameters differ from this configuration."""

    @abstractmethod
    def _compress(self, flat: torch.Tensor, seed: int) -> tuple[dict[str, float], bytes]:
        """(params, payload) of a flat, contiguous CPU tensor."""

    @classmethod
    @abstractmethod
    def _decode(cls, c: Compressed, out: torch.Tensor | None) -> torch.Tensor:
        """The flat CPU tensor of dtype c.dtype (c's shape, dtype and param keys are checked).

        `out`, when given, is a flat CPU tensor of c's numel and dtype that the codec may fill
        and return (after validating everything); a codec may also ignore it.
        """

    def __repr__(self) -> str:
        return f"make({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Compressor) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)


COMPRESSORS: dict[str, type[Compressor]] = {}
CODECS: dict[str, type[Compressor]] = {}  # codec name -> the one compressor that owns it


def register(cls: type[Compressor]) -> type[Compressor]:
    """Class decorator: add a compressor, and its codec, to the registries."""
    if cls.name in COMPRESSORS or cls.name in CODECS:
        raise RuntimeError(f"compressor or codec {cls.name!r} registered twice")
    COMPRESSORS[cls.name] = cls
    CODECS[cls.name] = cls
    return cls


def forms() -> list[str]:
    """How each compressor is written in a spec ("topk:K", "sign", ...), sorted."""
    return sorted(cls.form for cls in COMPRESSORS.values())


def make(spec: str, **params: float) -> Compressor:
    """A compressor from a spec: make("topk:0.01"), make("qsgd:4"), make("sign").

    Keyword form: make("topk", k=0.01), make("qsgd", s=4). Unknown names raise UnknownNameError
    (listing the known forms); invalid parameters raise ConfigError.
    """
    name, colon, arg = spec.strip().partition(":")
    cls = COMPRESSORS.get(name)
    if cls is None:
        raise UnknownNameError("compressor", spec, forms())
    if params:
        if colon or len(params) != 1:
            raise ConfigError(f"compressor {spec!r}: give its parameter once, as {cls.form} or "
                              f"as a keyword, got {spec!r} with {sorted(params)}")
        [(key, value)] = params.items()
        expected = cls.form.partition(":")[2].lower()
        if key != expected:
            raise ConfigError(f"compressor {name!r} takes {expected or 'no parameter'}, "
                              f"got {key}={value!r}")
        text = str(value) if isinstance(value, int) else repr(float(value))  # numpy scalars too
        return cls.parse(text)
    return cls.parse(arg if colon else None)


def decode(c: Compressed, device: torch.device | str | None = None, *,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode any record by its codec (InvalidMessage for an unknown codec or a bad record)."""
    cls = CODECS.get(c.codec)
    if cls is None:
        known = ", ".join(sorted(CODECS))
        raise InvalidMessage(f"unknown codec {c.codec!r}; known codecs: {known}")
    return cls.decode(c, device, out=out)


# ---- shared parsing and validation -------------------------------------------------------------


def parse_number(name: str, text: str, what: str) -> float:
    """A finite number from spec text (ConfigError naming the spec otherwise)."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name}: {what} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name}: {what} must be finite, got {text!r}")
    return value


def check_record(c: Compressed, param_names: frozenset[str]) -> None:
    """Shape, dtype, parameter keys and values, payload type: what every decoder needs first."""
    where = f"{c.codec} record"
    if not isinstance(c.shape, tuple) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in c.shape):
        raise InvalidMessage(f"{where}: shape {c.shape!r} must be a tuple of integers >= 0")
    if c.numel > MAX_NUMEL:
        raise InvalidMessage(f"{where}: shape {c.shape} has {c.numel} elements, "
                             f"at most {MAX_NUMEL} allowed")
    if c.dtype not in FLOAT_DTYPES:
        raise InvalidMessage(f"{where}: dtype {c.dtype}, expected one of "
                             "float16, bfloat16, float32, float64")
    if not isinstance(c.params, Mapping) or set(c.params) != param_names:
        got = sorted(c.params) if isinstance(c.params, Mapping) else c.params
        raise InvalidMessage(f"{where}: parameters {got}, expected {sorted(param_names)}")
    for key, value in c.params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise InvalidMessage(f"{where}: parameter {key}={value!r} must be a finite number")
    if not isinstance(c.payload, (bytes, bytearray, memoryview)):
        raise InvalidMessage(f"{where}: payload of type {type(c.payload).__name__}, "
                             "expected bytes")


def int_param(c: Compressed, key: str, lo: int, hi: int) -> int:
    """params[key] as an integer in [lo, hi] (InvalidMessage otherwise)."""
    value = c.params[key]
    if not float(value).is_integer() or not lo <= value <= hi:
        raise InvalidMessage(f"{c.codec} record: {key}={value!r}, expected an integer in "
                             f"[{lo}, {hi}] for shape {c.shape}")
    return int(value)


def scale_param(c: Compressed, key: str) -> float:
    """params[key] as a scale: finite, >= 0, and representable in the record's dtype."""
    value = float(c.params[key])
    top = float(torch.finfo(c.dtype).max)
    if not 0.0 <= value <= top:
        raise InvalidMessage(f"{c.codec} record: {key}={value!r}, expected a finite scale in "
                             f"[0, {top:.6g}] ({c.dtype})")
    return value


# ---- bytes <-> tensors -------------------------------------------------------------------------


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a 1-D contiguous CPU tensor (any dtype, bfloat16 too)."""
    if t.numel() == 0:
        return b""
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def tensor_view(buf: bytes | memoryview, dtype: torch.dtype, n: int,
                what: str) -> torch.Tensor:
    """n elements of dtype over exactly n * itemsize bytes, without a copy.

    The tensor shares the (immutable) payload: callers only read it, then copy what they keep.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(buf) != n * itemsize:
        raise InvalidMessage(f"{what}: {len(buf)} bytes, expected {n * itemsize} "
                             f"({n} elements of {dtype})")
    if n == 0:
        return torch.zeros(0, dtype=dtype)  # (a 0-byte array cannot be viewed as another dtype)
    with warnings.catch_warnings():  # "The given NumPy array is not writable": it is only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.frombuffer(buf, np.uint8)).view(dtype)


def tensor_from_bytes(buf: bytes | memoryview, dtype: torch.dtype, n: int,
                      what: str) -> torch.Tensor:
    """n elements of dtype from exactly n * itemsize bytes (a copy: the tensor is writable)."""
    view = tensor_view(buf, dtype, n, what)
    return copy_into(None, view)


def copy_into(out: torch.Tensor | None, src: torch.Tensor) -> torch.Tensor:
    """src's elements copied into `out` (same dtype and numel), or into a new tensor."""
    if src.numel() == 0:
        return src.clone() if out is None else out
    data = _bits(src)
    if out is None:
        return torch.from_numpy(data.copy()).view(src.dtype)
    np.copyto(_bits(out), data)
    return out


def scatter(out: torch.Tensor | None, n: int, indices: np.ndarray,
            values: torch.Tensor) -> torch.Tensor:
    """A flat tensor of n zeros with values at indices, written into `out` when given.

    Plain numpy on same-sized integer views (bfloat16 has no numpy type): single-threaded, so it
    does not wait on torch's OpenMP workers, which a busy 2-core machine deschedules.
    """
    if out is None:
        out = zeros(n, values.dtype)
    elif n:
        _bits(out).fill(0)
    if indices.size:
        _bits(out)[indices] = _bits(values)
    return out


def gather_bytes(flat: torch.Tensor, indices: np.ndarray) -> bytes:
    """The bytes of flat[indices] (a numpy gather on an integer view: see scatter())."""
    return _bits(flat)[indices].tobytes() if indices.size else b""


def _bits(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a flat CPU tensor's elements as unsigned integers of the same size."""
    return t.view(_UNSIGNED[t.element_size()]).numpy()


_UNSIGNED = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def zeros(n: int, dtype: torch.dtype) -> torch.Tensor:
    """n zeros of dtype, from calloc'ed memory: pages are zeroed by the kernel when first
    touched, about 3x faster here than torch.zeros for a sparse scatter into 10M elements."""
    if n == 0:
        return torch.zeros(0, dtype=dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(n * itemsize, np.uint8)).view(dtype)


# Exponent bits of each float type: all set means Inf or NaN.
_EXPONENT = {torch.float32: (np.uint32, 0x7F800000), torch.float64: (np.uint64, 0x7FF << 52),
             torch.float16: (np.uint16, 0x7C00), torch.bfloat16: (np.uint16, 0x7F80)}


def check_finite(t: torch.Tensor, what: str) -> None:
    """InvalidMessage when a flat CPU tensor holds NaN or Inf.

    Looks at the exponent bits, chunk by chunk in numpy (single-threaded: torch.aminmax took
    5 ms for 100k floats on a busy machine, waiting on its OpenMP workers).
    """
    n = t.numel()
    if n == 0:
        return
    unsigned, mask = _EXPONENT[t.dtype]
    bits = _bits(t).view(unsigned)
    exponents = np.empty(min(CHUNK, n), unsigned)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        np.bitwise_and(bits[start:start + m], unsigned(mask), out=exponents[:m])
        if exponents[:m].max() == mask:
            raise InvalidMessage(f"{what}: NaN or Inf among the values; a peer must send "
                                 "finite tensors")

"""Bit-level packing shared by the codecs: fixed-width fields, LEB128 varints, bitmaps.

The layout is part of the wire contract. A packed bit stream is little-endian at both levels: bit
i of the stream is bit (i % 8) of byte i // 8 (np.packbits(..., bitorder="little")), and field j of
a w-bit stream occupies stream bits j*w .. j*w + w - 1, least significant bit first. The unused
high bits of the last byte are zero; decoders reject a stream whose padding is not (a truncated or
shifted bit array shows up there or in the length). Varints are unsigned LEB128 (7 bits per byte,
low group first, high bit set on every byte but the last), canonical: no trailing zero groups.

Everything is vectorised numpy (np.packbits, shifts, cumsum, reduceat): no Python loop ever runs
over elements, only over the <= 9 bytes of a varint or the 8 fields of a packed group. Decoders
raise InvalidMessage naming `what` (e.g. "topk indices") so that the message says where it broke.
"""

from __future__ import annotations

import sys

import numpy as np

from crossgrad.errors import InvalidMessage

if sys.byteorder != "little":  # payloads are raw little-endian elements, copied without swapping
    raise ImportError("peer.compression assumes a little-endian host (x86-64, arm64)")

MAX_VARINT_BYTES = 9  # 63 bits: gaps between indices of a tensor never need more
CHUNK = 1 << 18  # elements per step of the chunked loops: in cache, few Python iterations
_U64 = np.uint64


def packed_nbytes(n: int, width: int) -> int:
    """Bytes of n fields of `width` bits, padded to a whole byte."""
    return (n * width + 7) // 8


def _check_padding(raw: np.ndarray, nbits: int, what: str) -> None:
    """The bits after the first `nbits` of the stream (the last byte's high bits) must be zero."""
    used = nbits % 8
    if used and raw.size and int(raw[-1]) >> used:
        raise InvalidMessage(f"{what}: nonzero padding bits after the last of {nbits} bits "
                             "(a truncated or misaligned bit array)")


def pack_uint(values: np.ndarray, width: int) -> bytes:
    """n unsigned integers, each below 2**width (1 <= width <= 64), in `width` bits each."""
    if not 1 <= width <= 64:
        raise ValueError(f"field width must be in 1..64 bits, got {width}")
    n = int(values.size)
    if width == 1:
        return np.packbits(values.astype(np.bool_), bitorder="little").tobytes()
    if width == 8:
        return values.astype(np.uint8).tobytes()
    if width in (2, 4):  # whole fields per byte: byte arithmetic, no 64-bit words
        per = 8 // width
        padded = np.zeros(-(-n // per) * per, np.uint8)
        padded[:n] = values
        rows = padded.reshape(-1, per)  # (bytes, fields per byte)
        packed = rows[:, 0].copy()
        for j in range(1, per):
            packed |= rows[:, j] << np.uint8(j * width)
        return packed.tobytes()
    if width < 8:
        # Eight fields fill exactly `width` bytes: build one uint64 word per group of eight.
        groups = -(-n // 8)
        flat = np.zeros(groups * 8, np.uint8)
        flat[:n] = values
        v8 = flat.reshape(groups, 8)
        word = np.zeros(groups, _U64)
        for j in range(8):
            word |= v8[:, j].astype(_U64) << _U64(j * width)
        raw = word.astype("<u8", copy=False).view(np.uint8).reshape(groups, 8)[:, :width]
        return raw.tobytes()[: packed_nbytes(n, width)]
    v = values.astype(_U64, copy=False)
    bits = np.empty((n, width), np.uint8)  # bit j of field i
    for j in range(width):
        bits[:, j] = (v >> _U64(j)) & _U64(1)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def unpack_uint(buf: bytes | memoryview, n: int, width: int, what: str) -> np.ndarray:
    """Inverse of pack_uint: n fields (uint8 up to 8 bits wide, else uint64); checks the byte
    length and the padding bits."""
    expected = packed_nbytes(n, width)
    if len(buf) != expected:
        raise InvalidMessage(f"{what}: {len(buf)} bytes, expected {expected} "
                             f"({n} fields of {width} bits)")
    raw = np.frombuffer(buf, np.uint8)
    _check_padding(raw, n * width, what)
    if width == 1:
        return np.unpackbits(raw, count=n, bitorder="little")
    if width == 8:
        return raw.copy()
    if width in (2, 4):
        per = 8 // width
        fields = np.empty((raw.size, per), np.uint8)
        for j in range(per):
            fields[:, j] = (raw >> np.uint8(j * width)) & np.uint8((1 << width) - 1)
        return fields.reshape(-1)[:n]
    if width < 8:
        groups = -(-n // 8)
        words = np.zeros((groups, 8), np.uint8)  # group g's `width` bytes, zero-extended
        whole = raw.size // width
        words[:whole, :width] = raw[: whole * width].reshape(whole, width)
        if whole < groups:
            words[whole, : raw.size - whole * width] = raw[whole * width:]
        word = words.view("<u8").reshape(groups)
        fields = np.empty((groups, 8), np.uint8)
        for j in range(8):
            fields[:, j] = (word >> _U64(j * width)) & _U64((1 << width) - 1)
        return fields.reshape(-1)[:n]
    bits = np.unpackbits(raw, count=n * width, bitorder="little").reshape(n, width)
    out = np.zeros(n, _U64)
    for j in range(width):
        out |= bits[:, j].astype(_U64) << _U64(j)
    return out


def pack_bitmap(indices: np.ndarray, d: int) -> bytes:
    """d bits, bit i set when i is in `indices`."""
    marks = np.zeros(d, np.bool_)
    marks[indices] = True
    return np.packbits(marks, bitorder="little").tobytes()


def unpack_bitmap(buf: bytes | memoryview, d: int, what: str) -> np.ndarray:
    """Inverse of pack_bitmap: the set positions, increasing (int64); checks length and padding."""
    expected = packed_nbytes(d, 1)
    if len(buf) != expected:
        raise InvalidMessage(f"{what}: bitmap of {len(buf)} bytes, expected {expected} "
                             f"for {d} elements")
    raw = np.frombuffer(buf, np.uint8)
    _check_padding(raw, d, what)
    return np.flatnonzero(np.unpackbits(raw, count=d, bitorder="little"))


def varint_lengths(values: np.ndarray) -> np.ndarray:
    """Bytes of each value as an LEB128 varint (1 for 0..127, 2 up to 2**14 - 1, ...)."""
    v = values.astype(_U64, copy=False)
    lengths = np.ones(v.size, np.int64)
    top = int(v.max()) if v.size else 0
    j = 1
    while j < 10 and top >> (7 * j):  # only the byte counts that occur
        lengths += v >= _U64(1 << (7 * j))
        j += 1
    return lengths


def pack_varints(values: np.ndarray) -> bytes:
    """Unsigned LEB128 varints of `values`, concatenated."""
    v = values.astype(_U64, copy=False)
    if v.size == 0:
        return b""
    lengths = varint_lengths(v)
    longest = int(lengths.max())
    groups = np.empty((v.size, longest), np.uint8)  # (n, L): byte j of number i
    present = np.empty((v.size, longest), np.bool_)
    for j in range(longest):  # column by column: numpy is slow on tiny inner dimensions
        groups[:, j] = (v >> _U64(7 * j)) & _U64(0x7F)
        groups[:, j] |= (lengths > j + 1).astype(np.uint8) << 7  # continuation bit
        present[:, j] = lengths > j
    return groups[present].tobytes()  # row-major: each number's bytes in order


def unpack_varints(buf: bytes | memoryview, n: int, what: str) -> np.ndarray:
    """Inverse of pack_varints: exactly n values (uint64), each at most MAX_VARINT_BYTES long."""
    raw = np.frombuffer(buf, np.uint8)
    if raw.size == 0:
        if n:
            raise InvalidMessage(f"{what}: no varint bytes, expected {n} numbers")
        return np.zeros(0, _U64)
    last = raw < 0x80  # the final byte of each number has its high bit clear
    if not last[-1]:
        raise InvalidMessage(f"{what}: the varint bytes end inside a number (truncated)")
    ends = np.flatnonzero(last)
    if ends.size != n:
        raise InvalidMessage(f"{what}: {ends.size} varints, expected {n}")
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    longest = int(lengths.max())
    if longest > MAX_VARINT_BYTES:
        raise InvalidMessage(f"{what}: a varint of {longest} bytes, at most "
                             f"{MAX_VARINT_BYTES} allowed (63 bits)")
    if longest > 1 and np.any((lengths > 1) & (raw[ends] == 0)):
        raise InvalidMessage(f"{what}: an overlong varint (a trailing zero byte); "
                             "the encoding must be canonical")
    values = (raw[starts] & 0x7F).astype(_U64)
    for j in range(1, longest):  # add byte j of every number that has one
        group = raw[np.minimum(starts + j, ends)] & 0x7F
        group *= lengths > j  # numbers shorter than j + 1 bytes add nothing
        values |= group.astype(_U64) << _U64(7 * j)
    return values

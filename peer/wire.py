"""The one translator between tensors and crossgrad.v1 messages.

docs/conventions.md, "One translator".

A tensor stream is one TensorChunk with a StreamHeader (every tensor's name, shape, dtype,
codec, byte length and CRC-32C, the total size, the sender and the round), then TensorChunks of
raw bytes: the tensors' little-endian bytes concatenated in header order, cut in pieces of at
most `chunk_bytes` (tensor.proto). Sending copies each piece once (protobuf `bytes` needs
`bytes`) and nothing else: a stream holds one piece of host memory at a time, never a copy of
the whole model, however many neighbors fetch the same published snapshot at once (a tensor on
a GPU is copied to the host one piece at a time). Receiving copies each piece once, straight
into tensors preallocated from the header.

Everything received is checked against what the receiver expects (its own model's parameter
names, shapes and dtypes), before and after the bytes arrive: a peer's message can be refused,
never crash the node or touch its model. Errors are crossgrad.errors ProtocolError classes,
whose gRPC status codes crossgrad/rpc.py maps in one table.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import google_crc32c
import numpy as np
import torch
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from crossgrad.errors import InvalidMessage, TooLarge, TruncatedStream
from crossgrad.rpc import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MODEL_BYTES
from crossgrad.v1 import tensor_pb2 as pb
from peer.compression import Compressed, Compressor

DTYPES: dict[torch.dtype, int] = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float64: pb.DTYPE_FLOAT64,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.uint8: pb.DTYPE_UINT8,
    torch.int32: pb.DTYPE_INT32,
    torch.int64: pb.DTYPE_INT64,
}
TORCH_DTYPES = {code: dtype for dtype, code in DTYPES.items()}
# Compressor name (peer/compression) <-> wire codec; a test keeps it in bijection with the
# compressor registry.
CODECS: dict[str, int] = {
    "none": pb.CODEC_NONE, "fp16": pb.CODEC_FP16, "bf16": pb.CODEC_BF16, "topk": pb.CODEC_TOPK,
    "randk": pb.CODEC_RANDK, "qsgd": pb.CODEC_QSGD, "sign": pb.CODEC_SIGN,
}
CODEC_NAMES = {code: name for name, code in CODECS.items()}

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("crossgrad's wire format is little-endian; this machine is big-endian")


@dataclass(frozen=True)
class TensorSpec:
    """What the receiver expects of one tensor: its own parameter's name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = int(np.prod(self.shape, dtype=np.int64))
        return numel * torch.empty((), dtype=self.dtype).element_size()


def specs_of(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in zip(names, tensors, strict=True)]


def _byte_view(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 array sharing its memory (CPU, contiguous)."""
    if t.numel() == 0:  # any strides, even 0 (numpy-backed, e.g. a decoded empty qsgd tensor),
        return np.empty(0, np.uint8)  # which view(torch.uint8) refuses: no bytes to share
    return t.reshape(-1).view(torch.uint8).numpy()  # (nbytes,)


# A tensor's bytes, flat uint8, as a stream reads them: a numpy view of a CPU tensor's memory,
# or a uint8 view of a tensor on another device (a GPU), read one piece at a time (_host_piece).
Flat: TypeAlias = np.ndarray | torch.Tensor


def _flat_bytes(t: torch.Tensor) -> Flat:
    """The bytes of `t` without copying them to the host (contiguous tensors: no copy at all)."""
    t = t.detach().contiguous()
    return _byte_view(t) if t.device.type == "cpu" else t.reshape(-1).view(torch.uint8)


def _host_piece(flat: Flat, start: int, stop: int) -> np.ndarray:
    """Bytes [start, stop) of `flat` in host memory: a view for a CPU tensor, a copy of that
    piece alone for a device tensor (the whole tensor copied to the host per request would be
    one model per concurrent stream)."""
    if isinstance(flat, np.ndarray):
        return flat[start:stop]
    return flat[start:stop].cpu().numpy()


def _readonly(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False  # google_crc32c takes read-only buffers only
    return view


# How decode checks finiteness of each float dtype's bytes: numpy's float dtypes, and for
# bfloat16 (no numpy dtype) its bits as uint16 (NaN or Inf: all 8 exponent bits set).
_NUMPY_FLOATS: dict[torch.dtype, np.dtype] = {
    torch.float16: np.dtype(np.float16), torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64), torch.bfloat16: np.dtype(np.uint16),
}


def _finite_bytes(raw: np.ndarray, np_dtype: np.dtype) -> bool:
    """Whether the whole elements in `raw` (uint8) are all finite (see _NUMPY_FLOATS)."""
    values = raw.view(np_dtype)
    if np_dtype == np.uint16:  # bfloat16
        return not bool(np.any((values & 0x7F80) == 0x7F80))
    return bool(np.isfinite(values).all())


def _all_finite(t: torch.Tensor) -> bool:
    """bool(torch.isfinite(t).all()) for a floating-point CPU tensor, at memory speed.

    torch's CPU isfinite runs at ~0.3 GB/s (temporaries per element); numpy's at ~10 GB/s, which
    made it most of decode's time (bench/transfer.py).
    """
    np_dtype = _NUMPY_FLOATS.get(t.dtype)
    if np_dtype is None:
        return bool(torch.isfinite(t).all())
    return _finite_bytes(_byte_view(t.contiguous()), np_dtype)


def _data_message_bytes(chunk: pb.TensorChunk, data: bytes) -> int:
    """chunk.ByteSize() of a data chunk without serializing it (upb's ByteSize serializes the
    whole message): the tag byte of field 2, the varint length, the bytes; a chunk carrying
    unknown fields takes the exact way."""
    if len(UnknownFieldSet(chunk)):
        return chunk.ByteSize()
    n = len(data)
    return 2 + n + (n.bit_length() - 1) // 7 if n else 2


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_DATA_TAG = b"\x12"  # TensorChunk field 2 (data), wire type 2 (length-delimited)


def checksums(tensors: Sequence[torch.Tensor], piece_bytes: int = DEFAULT_CHUNK_BYTES
              ) -> list[int]:
    """The CRC-32C of each tensor's bytes, as its header carries it (encode_raw's `crcs`),
    read `piece_bytes` at a time (a device tensor is never copied to the host whole)."""
    crcs = []
    for t in tensors:
        flat, crc = _flat_bytes(t), 0
        for start in range(0, flat.nbytes, piece_bytes):
            crc = google_crc32c.extend(
                crc, _readonly(_host_piece(flat, start, start + piece_bytes)))
        crcs.append(crc)
    return crcs


def encode_raw(names: Sequence[str], tensors: Sequence[torch.Tensor], *, sender_id: int,
               round_: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
               crcs: Sequence[int] | None = None, base_digest: int = 0) -> Iterator[bytes]:
    """The stream as serialized TensorChunk messages: the header, then data pieces of at most
    chunk_bytes (pieces span tensor boundaries).

    A data message is written by hand (tag, varint length, bytes): one copy from the tensors'
    memory into the message, instead of tobytes + protobuf's copy + its serialization. The
    bytes are exactly what TensorChunk(data=...).SerializeToString() gives (a test says so),
    so any gRPC client (grpcurl included) reads them as TensorChunk messages.

    `crcs`: checksums(tensors), when the caller keeps them (a published model is sent to every
    neighbor: its CRCs are computed once, not once per transfer before the first byte goes out).
    `base_digest`: the digest of a dense resync's state (a replica, an estimate); 0 otherwise.
    """
    flats = [_flat_bytes(t) for t in tensors]
    if crcs is None:
        crcs = checksums(tensors)
    elif len(crcs) != len(flats):
        raise ValueError(f"{len(crcs)} checksums for {len(flats)} tensors")
    headers = [pb.TensorHeader(name=n, shape=list(t.shape), dtype=DTYPES[t.dtype],  # type: ignore[arg-type]
                               codec=pb.CODEC_NONE, byte_length=f.nbytes, crc32c=crc)
               for n, t, f, crc in zip(names, tensors, flats, crcs, strict=True)]
    yield from _stream_raw(headers, flats, sender_id, round_, chunk_bytes, base_digest)


def skip_record(codec: str, like: torch.Tensor) -> Compressed:
    """The record of a tensor skipped under --feedback clag:Z: no payload (the header says
    `skipped`; the receiver's estimate stays)."""
    return Compressed(codec=codec, shape=tuple(like.shape), dtype=like.dtype, params={},
                      payload=b"")


def encode_compressed_raw(names: Sequence[str], records: Sequence[Compressed], *, sender_id: int,
                          round_: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                          base_digest: int = 0,
                          skipped: Sequence[bool] | None = None) -> Iterator[bytes]:
    """encode_raw for compressed tensors: each header names the codec and carries its scalars
    (codec_params); the payload is the compressor's packed bytes. `base_digest`: the digest of
    the state the update applies to (a replica, an estimate); `skipped`: per tensor, whether it
    is a skip (skip_record) under clag."""
    flags = list(skipped) if skipped is not None else [False] * len(records)
    views = [np.frombuffer(r.payload, dtype=np.uint8) for r in records]
    headers = [pb.TensorHeader(name=n, shape=list(r.shape), dtype=DTYPES[r.dtype],  # type: ignore[arg-type]
                               codec=CODECS[r.codec], codec_params=r.params,  # type: ignore[arg-type]
                               byte_length=len(r.payload), crc32c=google_crc32c.value(r.payload),
                               skipped=skip)
               for n, r, skip in zip(names, records, flags, strict=True)]
    yield from _stream_raw(headers, views, sender_id, round_, chunk_bytes, base_digest)


def _stream_raw(headers: list[pb.TensorHeader], flats: Sequence[Flat], sender_id: int,
                round_: int, chunk_bytes: int, base_digest: int = 0) -> Iterator[bytes]:
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    total = sum(f.nbytes for f in flats)
    yield pb.TensorChunk(header=pb.StreamHeader(tensors=headers, total_bytes=total,
                                                sender_id=sender_id, round=round_,
                                                base_digest=base_digest)
                         ).SerializeToString()
    # The pieces of one message (views of the tensors' memory, or pieces copied from a
    # device), joined once into the message: the only copy of the model's bytes made here.
    pending: list[memoryview] = []
    pending_bytes = 0
    for flat in flats:
        offset = 0
        while offset < flat.nbytes:
            take = min(chunk_bytes - pending_bytes, flat.nbytes - offset)
            pending.append(_host_piece(flat, offset, offset + take).data)
            pending_bytes += take
            offset += take
            if pending_bytes == chunk_bytes:
                yield b"".join([_DATA_TAG, _varint(pending_bytes), *pending])
                pending, pending_bytes = [], 0
    if pending:
        yield b"".join([_DATA_TAG, _varint(pending_bytes), *pending])


def encode(names: Sequence[str], tensors: Sequence[torch.Tensor], *, sender_id: int, round_: int,
           chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[pb.TensorChunk]:
    """encode_raw as TensorChunk objects (for servers built on the generated stubs, and tests)."""
    for raw in encode_raw(names, tensors, sender_id=sender_id, round_=round_,
                          chunk_bytes=chunk_bytes):
        yield pb.TensorChunk.FromString(raw)


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it) of the varint at raw[pos]; (-1, pos) if malformed."""
    value, shift = 0, 0
    while pos < len(raw) and shift < 64:
        byte = raw[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
    return -1, pos


Message: TypeAlias = pb.TensorChunk | bytes  # a parsed message, or its serialized bytes


def _parse(message: Message) -> tuple[pb.TensorChunk | None, memoryview | bytes | None, int]:
    """(chunk, data, serialized size) of one stream message; chunk is None for a plain data
    message read without protobuf (no copy), data is None for anything else."""
    if isinstance(message, bytes):
        if message[:1] == _DATA_TAG:
            n, pos = _read_varint(message, 1)
            if n >= 0 and pos + n == len(message):  # exactly one field: the data
                return None, memoryview(message)[pos:], len(message)
        try:
            chunk = pb.TensorChunk.FromString(message)
        except DecodeError as exc:
            raise InvalidMessage(f"a stream message is not a valid TensorChunk ({exc})") from None
        data = chunk.data if chunk.WhichOneof("part") == "data" else None
        return chunk, data, len(message)
    if message.WhichOneof("part") == "data":
        data = message.data
        return message, data, _data_message_bytes(message, data)
    return message, None, message.ByteSize()


@dataclass(frozen=True)
class Decoded:
    """A validated stream: the tensors (receiver's order), who sent them, for which round."""

    tensors: list[torch.Tensor]
    sender_id: int
    round: int
    wire_bytes: int  # every message received, framed as on the wire (frame_bytes)
    base_digest: int = 0  # StreamHeader.base_digest
    crcs: tuple[int, ...] = ()  # each tensor's CRC-32C, as the header declared and checked
    skipped: tuple[bool, ...] = ()  # each tensor's TensorHeader.skipped (clag; zeros decoded)


def human_bytes(n: int) -> str:
    """A byte count in binary units for messages: 512 B, 1.5 KiB, 8.0 GiB."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}"


def check_header(header: pb.StreamHeader, expected: Sequence[TensorSpec], *, sender_id: int,
                 round_: int, max_total_bytes: int, codec: str = "none",
                 allow_skips: bool = False) -> None:
    """Every header field against the receiver's own model; raise the precise error.

    The declared size goes first: a stream above the receiver's limit is refused whatever else
    its header says, before anything is allocated for it.
    """
    if header.total_bytes > max_total_bytes:
        raise TooLarge(f"the stream declares {human_bytes(header.total_bytes)} "
                       f"({header.total_bytes} bytes), above this node's limit of "
                       f"{human_bytes(max_total_bytes)} ({max_total_bytes} bytes) for one model "
                       "or cross-gradient; if models that large are expected, raise "
                       "--max-model-bytes on this node")
    if header.sender_id != sender_id:
        raise InvalidMessage(f"stream says it comes from node {header.sender_id}; "
                             f"node {sender_id} was asked")
    if header.round != round_:
        raise InvalidMessage(f"stream is for round {header.round}; round {round_} was asked")
    if len(header.tensors) != len(expected):
        raise InvalidMessage(f"stream holds {len(header.tensors)} tensors; the model has "
                             f"{len(expected)} ({', '.join(s.name for s in expected[:4])}, ...)")
    total = 0
    for i, (h, spec) in enumerate(zip(header.tensors, expected, strict=True)):
        where = f"tensor {i} ({spec.name!r})"
        if h.name != spec.name:
            raise InvalidMessage(f"{where}: unknown tensor name {h.name!r}; expected {spec.name!r}")
        if tuple(h.shape) != spec.shape:
            raise InvalidMessage(f"{where}: shape {tuple(h.shape)}, expected {spec.shape}")
        if h.dtype not in TORCH_DTYPES or TORCH_DTYPES[h.dtype] != spec.dtype:
            got = pb.DType.Name(h.dtype) if h.dtype in pb.DType.values() else str(h.dtype)
            raise InvalidMessage(f"{where}: dtype {got}, expected "
                                 f"{pb.DType.Name(DTYPES[spec.dtype])}")
        if h.skipped and not allow_skips:
            raise InvalidMessage(f"{where}: marked skipped, which only --feedback clag:Z "
                                 "cross-gradient updates may be")
        if h.skipped and (h.byte_length or h.codec_params):
            raise InvalidMessage(f"{where}: a skipped tensor carries {h.byte_length} bytes and "
                                 f"{len(h.codec_params)} codec parameters, expected none")
        if h.codec != CODECS[codec]:
            got = pb.Codec.Name(h.codec) if h.codec in pb.Codec.values() else str(h.codec)
            raise InvalidMessage(f"{where}: codec {got} is not accepted here; expected "
                                 f"{pb.Codec.Name(CODECS[codec])} (the run's compressor)")
        if codec == "none" and h.byte_length != spec.nbytes:
            raise InvalidMessage(f"{where}: byte_length {h.byte_length}, expected {spec.nbytes} "
                                 f"for shape {spec.shape} of {spec.dtype}")
        if codec != "none" and not h.skipped and h.byte_length > 2 * spec.nbytes + 1024:
            raise InvalidMessage(f"{where}: byte_length {h.byte_length} is more than any "
                                 f"{codec} encoding of shape {spec.shape} of {spec.dtype} takes")
        total += h.byte_length
    if header.total_bytes != total:
        raise InvalidMessage(f"total_bytes {header.total_bytes} is not the sum of the tensors' "
                             f"byte lengths ({total})")


def decode(chunks: Iterable[Message], expected: Sequence[TensorSpec], *, sender_id: int,
           round_: int, max_total_bytes: int = DEFAULT_MAX_MODEL_BYTES,
           max_chunk_bytes: int = 8 * DEFAULT_CHUNK_BYTES,
           compressor: Compressor | None = None, allow_skips: bool = False) -> Decoded:
    """Reassemble and validate a stream into freshly allocated tensors.

    InvalidMessage: a bad header, data before the header, a second header, extra bytes, a
    checksum mismatch, NaN or Inf. TruncatedStream: fewer bytes than declared. TooLarge: a
    stream or a piece above the limits.
    """
    iterator = iter(chunks)
    message = next(iterator, None)
    if message is None:
        raise TruncatedStream("the stream ended before its header")
    first, _, size = _parse(message)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidMessage("the stream's first message must be its header")
    wire_bytes = frame_bytes(size)
    codec = "none" if compressor is None else compressor.name
    check_header(first.header, expected, sender_id=sender_id, round_=round_,
                 max_total_bytes=max_total_bytes, codec=codec, allow_skips=allow_skips)
    if compressor is None:
        tensors = [torch.empty(s.shape, dtype=s.dtype) for s in expected]
        views = [_byte_view(t) for t in tensors]
    else:  # the packed payloads first; decompressed (and validated) once complete
        views = [np.empty(h.byte_length, dtype=np.uint8) for h in first.header.tensors]
    crcs = [0] * len(views)  # CRC-32C of each tensor's bytes so far (0: of no bytes)
    # Dense floats are checked finite piece by piece, right after each copy (the bytes are in
    # cache: a pass over every tensor at the end read them from memory again); `checked` is
    # the bytes of each tensor checked so far, whole elements only.
    floats = ([_NUMPY_FLOATS.get(t.dtype) if t.is_floating_point() else None for t in tensors]
              if compressor is None else [None] * len(views))
    checked = [0] * len(views)
    total = int(first.header.total_bytes)
    k, offset, received = 0, 0, 0  # current tensor, offset in it, bytes so far
    for message in iterator:
        chunk, data, size = _parse(message)
        if data is None:
            part = chunk.WhichOneof("part") if chunk is not None else None
            raise InvalidMessage("a second header arrived in the middle of the stream"
                                 if part == "header" else
                                 "a stream message after the header carries no data")
        wire_bytes += frame_bytes(size)
        if len(data) > max_chunk_bytes:
            raise TooLarge(f"a piece of {len(data)} bytes is above the limit of "
                           f"{max_chunk_bytes} bytes")
        if received + len(data) > total:
            raise InvalidMessage(f"the stream carries more than the {total} bytes its header "
                                 "declares")
        src = np.frombuffer(data, dtype=np.uint8)
        src.flags.writeable = False  # google_crc32c takes read-only buffers only
        pos = 0
        while pos < len(src):
            while views[k].nbytes == offset:  # skip finished (or empty) tensors
                k, offset = k + 1, 0
            take = min(len(src) - pos, views[k].nbytes - offset)
            piece = src[pos:pos + take]
            views[k][offset:offset + take] = piece
            crcs[k] = google_crc32c.extend(crcs[k], piece)  # while the piece is in cache
            pos, offset = pos + take, offset + take
            np_dtype = floats[k]
            if np_dtype is not None:
                end = offset - offset % np_dtype.itemsize
                if end > checked[k]:
                    if not _finite_bytes(views[k][checked[k]:end], np_dtype):
                        raise InvalidMessage(f"tensor {first.header.tensors[k].name!r} holds "
                                             "NaN or Inf")
                    checked[k] = end
        received += len(data)
    if received < total:
        raise TruncatedStream(f"the stream ended after {received} of {total} bytes")
    for h, crc in zip(first.header.tensors, crcs, strict=True):
        if crc != h.crc32c:
            raise InvalidMessage(f"tensor {h.name!r}: CRC-32C mismatch (corrupted in transit)")
    if compressor is not None:
        tensors = []
        for h, spec, v in zip(first.header.tensors, expected, views, strict=True):
            if h.skipped:  # clag: the estimate stays, a zero delta
                tensors.append(torch.zeros(spec.shape, dtype=spec.dtype))
                continue
            record = Compressed(codec=codec, shape=spec.shape, dtype=spec.dtype,
                                params=dict(h.codec_params), payload=v.tobytes())
            try:
                tensors.append(compressor.decompress(record))
            except InvalidMessage as exc:
                raise InvalidMessage(f"tensor {h.name!r}: {exc}") from None
        for h, t in zip(first.header.tensors, tensors, strict=True):
            if t.is_floating_point() and not _all_finite(t):
                raise InvalidMessage(f"tensor {h.name!r} holds NaN or Inf")
    return Decoded(tensors=tensors, sender_id=sender_id, round=round_, wire_bytes=wire_bytes,
                   base_digest=int(first.header.base_digest),
                   crcs=tuple(int(h.crc32c) for h in first.header.tensors),
                   skipped=tuple(bool(h.skipped) for h in first.header.tensors))


def frame_bytes(message_bytes: int) -> int:
    """Bytes a message of this serialized size takes on an HTTP/2 gRPC stream: 5-byte gRPC
    prefix + 9-byte DATA frame header per 16 KiB frame (default max frame size)."""
    frames = max(1, -(-(message_bytes + 5) // 16384))
    return message_bytes + 5 + 9 * frames

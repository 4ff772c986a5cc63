"""peer/wire.py, the one translator between tensors and crossgrad.v1 tensor streams (no sockets).

This file is the behavioural spec of the wire format (tensor.proto): a header, then the tensors'
little-endian bytes concatenated in header order, cut into pieces of exactly `chunk_bytes` (the
last one shorter) that span tensor boundaries; decoding is bit-exact, and every way a stream can
be wrong is refused with its own ProtocolError class (INVALID_ARGUMENT, DATA_LOSS or
RESOURCE_EXHAUSTED once through crossgrad.rpc.STATUS) and a message that names the tensor and
what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import google_crc32c
import grpc
import pytest
import torch

from crossgrad import rpc
from crossgrad.errors import InvalidMessage, ProtocolError, TooLarge, TruncatedStream
from crossgrad.rpc import DEFAULT_CHUNK_BYTES
from crossgrad.v1 import tensor_pb2 as pb
from peer.compression import make
from peer.wire import (
    DTYPES,
    Decoded,
    TensorSpec,
    checksums,
    decode,
    encode,
    encode_compressed_raw,
    encode_raw,
    frame_bytes,
    specs_of,
)

from streams import assert_bit_exact, raw_bytes

Chunks = list[pb.TensorChunk]
SENDER, ROUND = 3, 17


def roundtrip(names: Sequence[str], tensors: Sequence[torch.Tensor], chunk_bytes: int,
              **decode_kwargs: int) -> tuple[Chunks, Decoded]:
    chunks = list(encode(names, tensors, sender_id=SENDER, round_=ROUND, chunk_bytes=chunk_bytes))
    decoded = decode(iter(chunks), specs_of(names, tensors), sender_id=SENDER, round_=ROUND,
                     **decode_kwargs)
    return chunks, decoded


def generated(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- round trips ------------------------------------------------------------------------------


def special_floats(dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    values = [0.0, -0.0, 1.0, -1.0, info.max, -info.max, info.tiny, info.eps, info.tiny / 4]
    return torch.tensor(values, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1 << 20])
def test_float_tensors_round_trip_bit_exact(dtype: torch.dtype, chunk_bytes: int) -> None:
    g = generated(1)
    tensors = [torch.randn(3, 5, generator=g).to(dtype), special_floats(dtype),
               torch.randn(7, generator=g).to(dtype), torch.randn((), generator=g).to(dtype)]
    names = ["layers.0.weight", "specials", "layers.0.bias", "scale"]
    _, decoded = roundtrip(names, tensors, chunk_bytes)
    assert_bit_exact(decoded.tensors, tensors)
    assert decoded.sender_id == SENDER
    assert decoded.round == ROUND


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_tensors_round_trip_bit_exact(dtype: torch.dtype) -> None:
    info = torch.iinfo(dtype)
    extremes = torch.tensor([info.min, info.max, 0, 1], dtype=dtype)
    counts = torch.randint(int(info.min), int(info.max), (4, 3), generator=generated(2),
                           dtype=dtype)
    _, decoded = roundtrip(["extremes", "counts"], [extremes, counts], chunk_bytes=5)
    assert_bit_exact(decoded.tensors, [extremes, counts])


def test_mixed_dtypes_in_one_stream_round_trip() -> None:
    g = generated(3)
    tensors = [torch.randn(4, 4, generator=g, dtype=torch.float64),
               torch.randn(5, generator=g).half(),
               torch.arange(6, dtype=torch.int64).reshape(2, 3),
               torch.randn(3, generator=g).bfloat16(),
               torch.randn(1, 1, 3, generator=g)]
    names = [f"t{i}" for i in range(len(tensors))]
    for chunk_bytes in (1, 3, 10, 11, 1000):
        _, decoded = roundtrip(names, tensors, chunk_bytes)
        assert_bit_exact(decoded.tensors, tensors)


def test_empty_tensors_round_trip_anywhere_in_the_stream() -> None:
    tensors = [torch.empty(0), torch.randn(3, generator=generated(4)), torch.empty(2, 0),
               torch.empty(0, 4, dtype=torch.float64), torch.arange(2, dtype=torch.int64),
               torch.empty(0, dtype=torch.float16)]
    names = [f"t{i}" for i in range(len(tensors))]
    for chunk_bytes in (1, 4, 5, 1 << 20):
        chunks, decoded = roundtrip(names, tensors, chunk_bytes)
        assert_bit_exact(decoded.tensors, tensors)
        header = chunks[0].header
        assert [h.byte_length for h in header.tensors] == [0, 12, 0, 0, 16, 0]
        assert header.total_bytes == 28


def test_a_stream_of_only_empty_tensors_is_a_header_alone() -> None:
    tensors = [torch.empty(0), torch.empty(3, 0, dtype=torch.float64)]
    chunks, decoded = roundtrip(["a", "b"], tensors, chunk_bytes=8)
    assert len(chunks) == 1
    assert chunks[0].WhichOneof("part") == "header"
    assert chunks[0].header.total_bytes == 0
    assert_bit_exact(decoded.tensors, tensors)


@pytest.mark.parametrize("spec", ["none", "fp16", "bf16", "topk:0.5", "randk:0.5", "qsgd:4",
                                  "sign"])
def test_compressed_empty_tensors_round_trip(spec: str) -> None:
    """Regression (found by test_wire_fuzz): qsgd and sign decode an empty tensor with stride 0,
    which decode's finiteness check viewed as bytes and failed with a RuntimeError; such a
    tensor sent on again (dense) failed in encode the same way."""
    compressor = make(spec)
    tensors = [torch.empty(0), torch.randn(3, generator=generated(22)), torch.empty(2, 0)]
    names = ["empty", "x", "empty2d"]
    records = [compressor.compress(t, seed=0) for t in tensors]
    chunks = list(encode_compressed_raw(names, records, sender_id=SENDER, round_=ROUND,
                                        chunk_bytes=5))
    decoded = decode(chunks, specs_of(names, tensors), sender_id=SENDER, round_=ROUND,
                     compressor=compressor)
    assert_bit_exact(decoded.tensors, [compressor.decompress(r) for r in records])
    _, again = roundtrip(names, decoded.tensors, chunk_bytes=5)
    assert_bit_exact(again.tensors, decoded.tensors)


def test_non_contiguous_and_grad_tensors_are_sent_as_their_row_major_values() -> None:
    base = torch.randn(4, 6, generator=generated(5))
    transposed = base.t()  # (6, 4), not contiguous
    strided = base[:, ::2]  # (4, 3), not contiguous
    leaf = torch.randn(5, generator=generated(6), requires_grad=True)
    tensors = [transposed, strided, leaf]
    _, decoded = roundtrip(["t", "s", "leaf"], tensors, chunk_bytes=10)
    assert_bit_exact(decoded.tensors, [t.detach().contiguous() for t in tensors])
    assert all(not t.requires_grad for t in decoded.tensors)


@pytest.mark.parametrize("chunk_bytes", [1, 3, 8, 12, 13, 40, 47, 48, 49, 1000, 1 << 20])
def test_pieces_are_full_chunks_that_span_tensor_boundaries(chunk_bytes: int) -> None:
    """Sizes 12, 20 and 16 bytes: chunk sizes below, at and above a tensor's, and above all."""
    g = generated(7)
    tensors = [torch.randn(3, generator=g), torch.randn(5, generator=g),
               torch.randn(2, generator=g, dtype=torch.float64)]
    chunks = list(encode(["a", "b", "c"], tensors, sender_id=SENDER, round_=ROUND,
                         chunk_bytes=chunk_bytes))
    assert chunks[0].WhichOneof("part") == "header"
    data = [c.data for c in chunks[1:]]
    assert all(c.WhichOneof("part") == "data" for c in chunks[1:])
    payload = b"".join(raw_bytes(t) for t in tensors)
    assert b"".join(data) == payload  # concatenated in header order
    assert all(0 < len(d) <= chunk_bytes for d in data)
    assert all(len(d) == chunk_bytes for d in data[:-1])  # only the last piece is short
    assert len(data) == math.ceil(len(payload) / chunk_bytes)


def test_pieces_never_exceed_chunk_bytes_for_a_large_model() -> None:
    g = generated(8)
    tensors = [torch.randn(700, 500, generator=g), torch.randn(500, generator=g),
               torch.randn(10, 700, generator=g)]
    names = ["w1", "b1", "w2"]
    chunk = 1 << 20
    chunks, decoded = roundtrip(names, tensors, chunk)
    assert all(len(c.data) <= chunk for c in chunks[1:])
    assert all(len(c.data) == chunk for c in chunks[1:-1])
    assert_bit_exact(decoded.tensors, tensors)


def test_header_describes_every_tensor() -> None:
    g = generated(9)
    tensors = [torch.randn(2, 3, generator=g), torch.randn(4, generator=g).half(),
               torch.arange(3, dtype=torch.int64), torch.randn(2, generator=g).bfloat16()]
    names = ["w", "h", "i", "b"]
    header = next(iter(encode(names, tensors, sender_id=5, round_=2**40, chunk_bytes=16))).header
    assert header.sender_id == 5
    assert header.round == 2**40
    assert header.total_bytes == sum(t.numel() * t.element_size() for t in tensors)
    assert [h.name for h in header.tensors] == names
    for h, t in zip(header.tensors, tensors, strict=True):
        assert tuple(h.shape) == tuple(t.shape)
        assert h.dtype == DTYPES[t.dtype]
        assert h.codec == pb.CODEC_NONE
        assert dict(h.codec_params) == {}
        assert h.byte_length == t.numel() * t.element_size()
        assert h.crc32c == google_crc32c.value(raw_bytes(t))


def test_decoded_tensors_are_fresh_memory() -> None:
    sent = [torch.zeros(4)]
    chunks = list(encode(["x"], sent, sender_id=SENDER, round_=ROUND))
    decoded = decode(chunks, specs_of(["x"], sent), sender_id=SENDER, round_=ROUND)
    decoded.tensors[0].add_(1.0)
    assert torch.equal(sent[0], torch.zeros(4))
    again = decode(chunks, specs_of(["x"], sent), sender_id=SENDER, round_=ROUND)
    assert torch.equal(again.tensors[0], torch.zeros(4))


def test_decode_reads_a_one_pass_iterator() -> None:
    tensors = [torch.randn(10, generator=generated(10))]

    def once() -> Iterator[pb.TensorChunk]:
        yield from encode(["x"], tensors, sender_id=SENDER, round_=ROUND, chunk_bytes=6)

    decoded = decode(once(), specs_of(["x"], tensors), sender_id=SENDER, round_=ROUND)
    assert_bit_exact(decoded.tensors, tensors)


def test_an_empty_data_piece_is_harmless() -> None:
    tensors = [torch.randn(4, generator=generated(11))]
    chunks = list(encode(["x"], tensors, sender_id=SENDER, round_=ROUND, chunk_bytes=8))
    chunks.insert(1, pb.TensorChunk(data=b""))
    chunks.append(pb.TensorChunk(data=b""))
    decoded = decode(chunks, specs_of(["x"], tensors), sender_id=SENDER, round_=ROUND)
    assert_bit_exact(decoded.tensors, tensors)


# ---- frame accounting -------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_bytes", [1, 127, 128, 129, 16379, 16384, 16385, (1 << 21) - 1,
                                         1 << 21])
def test_wire_bytes_frames_every_message_as_serialized(chunk_bytes: int) -> None:
    """Sizes around the varint length boundaries (128, 16384, 2**21) and the 16 KiB frame."""
    tensors = [torch.randn(3 * chunk_bytes // 8 + 5, generator=generated(14), dtype=torch.float64)]
    chunks = list(encode(["x"], tensors, sender_id=SENDER, round_=ROUND, chunk_bytes=chunk_bytes))
    chunks.insert(1, pb.TensorChunk(data=b""))  # an empty piece is a message too
    decoded = decode(chunks, specs_of(["x"], tensors), sender_id=SENDER, round_=ROUND,
                     max_chunk_bytes=1 << 22)
    assert decoded.wire_bytes == sum(frame_bytes(c.ByteSize()) for c in chunks)


def test_wire_bytes_counts_unknown_fields_too() -> None:
    """A newer sender may add fields (tensor.proto: within v1 only add fields)."""
    tensors = [torch.randn(10, generator=generated(15))]
    chunks = list(encode(["x"], tensors, sender_id=SENDER, round_=ROUND, chunk_bytes=16))
    extra = b"\x78\x01" + b"\x82\x01\x03abc"  # field 15 = 1, field 16 = b"abc"
    chunks = [pb.TensorChunk.FromString(c.SerializeToString() + extra) for c in chunks]
    decoded = decode(chunks, specs_of(["x"], tensors), sender_id=SENDER, round_=ROUND)
    assert_bit_exact(decoded.tensors, tensors)
    assert decoded.wire_bytes == sum(frame_bytes(c.ByteSize()) for c in chunks)
    assert decoded.wire_bytes == sum(frame_bytes(len(c.SerializeToString())) for c in chunks)


@pytest.mark.parametrize("size", [0, 1, 100, 16378, 16379, 16380, 16384, 1 << 20, 5 << 20])
def test_frame_bytes_counts_at_least_the_grpc_prefix(size: int) -> None:
    assert frame_bytes(size) >= size + 5
    assert frame_bytes(size + 1) >= frame_bytes(size) + 1


def test_wire_overhead_of_one_mib_chunks_is_below_two_percent() -> None:
    tensors = [torch.randn(1 << 20, generator=generated(12)),
               torch.randn(1000, generator=generated(13))]
    names = ["big", "small"]
    chunks, decoded = roundtrip(names, tensors, chunk_bytes=1 << 20)
    for c in chunks:
        assert frame_bytes(c.ByteSize()) >= c.ByteSize() + 5
    payload = sum(t.numel() * t.element_size() for t in tensors)
    wire = sum(frame_bytes(c.ByteSize()) for c in chunks)
    assert decoded.wire_bytes == wire  # every message received, framed as on the wire
    assert wire > payload
    assert wire / payload <= 1.02
    full = pb.TensorChunk(data=bytes(1 << 20))
    assert frame_bytes(full.ByteSize()) / (1 << 20) <= 1.02


# ---- decode errors ----------------------------------------------------------------------------

NAMES = ["layers.0.weight", "layers.0.bias", "steps"]


def good_tensors() -> list[torch.Tensor]:
    g = generated(20)
    return [torch.randn(3, 5, generator=g), torch.randn(5, generator=g),
            torch.arange(4, dtype=torch.int64)]


EXPECTED: list[TensorSpec] = specs_of(NAMES, good_tensors())


def good_stream(tensors: Sequence[torch.Tensor] | None = None, chunk_bytes: int = 16) -> Chunks:
    return list(encode(NAMES, tensors if tensors is not None else good_tensors(),
                       sender_id=SENDER, round_=ROUND, chunk_bytes=chunk_bytes))


def with_header(edit: Callable[[pb.StreamHeader], None]) -> Chunks:
    chunks = good_stream()
    edit(chunks[0].header)
    return chunks


def set_field(index: int, **fields: object) -> Callable[[pb.StreamHeader], None]:
    def edit(header: pb.StreamHeader) -> None:
        for key, value in fields.items():
            if key == "shape":
                del header.tensors[index].shape[:]
                header.tensors[index].shape.extend(value)
            else:
                setattr(header.tensors[index], key, value)
    return edit


def longer_bias(header: pb.StreamHeader) -> None:
    header.tensors[1].byte_length += 4
    header.total_bytes += 4


def bump_total(header: pb.StreamHeader) -> None:
    header.total_bytes += 1


def drop_last_tensor(header: pb.StreamHeader) -> None:
    del header.tensors[-1]


def with_value(index: int, value: float) -> Chunks:
    tensors = good_tensors()
    tensors[index].view(-1)[2] = value
    return good_stream(tensors)


def flip_payload_byte(offset: int) -> Chunks:
    chunks = good_stream(chunk_bytes=1 << 20)  # one data piece
    data = bytearray(chunks[1].data)
    data[offset] ^= 0x01
    chunks[1] = pb.TensorChunk(data=bytes(data))
    return chunks


def truncated() -> Chunks:
    chunks = good_stream()
    last = chunks[-1].data
    return [*chunks[:-1], pb.TensorChunk(data=last[:-3])]


def missing_last_piece() -> Chunks:
    return good_stream()[:-1]


def header_alone() -> Chunks:
    return good_stream()[:1]


def extra_bytes() -> Chunks:
    return [*good_stream(), pb.TensorChunk(data=b"\x00")]


def extra_bytes_in_last_piece() -> Chunks:
    chunks = good_stream()
    return [*chunks[:-1], pb.TensorChunk(data=chunks[-1].data + b"\x00\x01")]


def huge_piece() -> Chunks:
    return [good_stream()[0], pb.TensorChunk(data=bytes(8 * DEFAULT_CHUNK_BYTES + 1))]


def data_before_header() -> Chunks:
    chunks = good_stream()
    return [chunks[1], chunks[0], *chunks[2:]]


def second_header() -> Chunks:
    chunks = good_stream()
    return [chunks[0], chunks[1], chunks[0], *chunks[2:]]


def empty_message_mid_stream() -> Chunks:
    chunks = good_stream()
    return [chunks[0], chunks[1], pb.TensorChunk(), *chunks[2:]]


def stream_from(sender: int = SENDER, round_: int = ROUND) -> Chunks:
    return list(encode(NAMES, good_tensors(), sender_id=sender, round_=round_, chunk_bytes=16))


TOTAL = sum(s.nbytes for s in EXPECTED)  # 60 + 20 + 32 = 112

# id -> (stream, decode kwargs, error class, fragments the message must contain)
ERROR_CASES: dict[str, tuple[Callable[[], Chunks], dict[str, int], type[ProtocolError],
                             list[str]]] = {
    "wrong shape": (lambda: with_header(set_field(0, shape=[5, 3])), {}, InvalidMessage,
                    ["'layers.0.weight'", "(5, 3)", "(3, 5)"]),
    "wrong rank": (lambda: with_header(set_field(0, shape=[15])), {}, InvalidMessage,
                   ["'layers.0.weight'", "(15,)", "(3, 5)"]),
    "wrong dtype": (lambda: with_header(set_field(1, dtype=pb.DTYPE_FLOAT64)), {},
                    InvalidMessage, ["'layers.0.bias'", "DTYPE_FLOAT64", "DTYPE_FLOAT32"]),
    "unknown dtype enum": (lambda: with_header(set_field(2, dtype=99)), {}, InvalidMessage,
                           ["'steps'", "99", "DTYPE_INT64"]),
    "unspecified dtype": (lambda: with_header(set_field(0, dtype=pb.DTYPE_UNSPECIFIED)), {},
                          InvalidMessage, ["'layers.0.weight'", "DTYPE_FLOAT32"]),
    "unknown codec enum": (lambda: with_header(set_field(1, codec=77)), {}, InvalidMessage,
                           ["'layers.0.bias'", "77", "CODEC_NONE"]),
    "unspecified codec": (lambda: with_header(set_field(0, codec=pb.CODEC_UNSPECIFIED)), {},
                          InvalidMessage, ["'layers.0.weight'", "CODEC_NONE"]),
    "wrong byte_length": (lambda: with_header(longer_bias), {}, InvalidMessage,
                          ["'layers.0.bias'", "24", "20"]),
    "wrong total_bytes": (lambda: with_header(bump_total), {}, InvalidMessage,
                          ["total_bytes", str(TOTAL + 1), str(TOTAL)]),
    "unknown tensor name": (lambda: with_header(set_field(1, name="evil.bias")), {},
                            InvalidMessage, ["'evil.bias'", "'layers.0.bias'"]),
    "wrong tensor count": (lambda: with_header(drop_last_tensor), {}, InvalidMessage,
                           ["2 tensors", "3"]),
    "NaN": (lambda: with_value(0, math.nan), {}, InvalidMessage, ["'layers.0.weight'", "NaN"]),
    "+Inf": (lambda: with_value(1, math.inf), {}, InvalidMessage, ["'layers.0.bias'", "Inf"]),
    "-Inf": (lambda: with_value(0, -math.inf), {}, InvalidMessage, ["'layers.0.weight'", "Inf"]),
    "checksum mismatch": (lambda: flip_payload_byte(60 + 7), {}, InvalidMessage,
                          ["'layers.0.bias'", "CRC-32C"]),
    "checksum mismatch, first byte": (lambda: flip_payload_byte(0), {}, InvalidMessage,
                                      ["'layers.0.weight'", "CRC-32C"]),
    "checksum mismatch, int tensor": (lambda: flip_payload_byte(TOTAL - 1), {}, InvalidMessage,
                                      ["'steps'", "CRC-32C"]),
    "truncated": (truncated, {}, TruncatedStream, [str(TOTAL - 3), str(TOTAL)]),
    "missing last piece": (missing_last_piece, {}, TruncatedStream, [str(TOTAL)]),
    "header alone": (header_alone, {}, TruncatedStream, ["after 0 ", str(TOTAL)]),
    "extra bytes": (extra_bytes, {}, InvalidMessage, ["more than", str(TOTAL)]),
    "extra bytes in the last piece": (extra_bytes_in_last_piece, {}, InvalidMessage,
                                      ["more than", str(TOTAL)]),
    "data before header": (data_before_header, {}, InvalidMessage, ["header"]),
    "second header": (second_header, {}, InvalidMessage, ["second header"]),
    "message with no part mid-stream": (empty_message_mid_stream, {}, InvalidMessage, []),
    "empty stream": (lambda: [], {}, TruncatedStream, ["header"]),
    "oversized piece": (good_stream, {"max_chunk_bytes": 15}, TooLarge, ["16", "15"]),
    "piece above the default limit": (huge_piece, {}, TooLarge,
                                      [str(8 * DEFAULT_CHUNK_BYTES + 1),
                                       str(8 * DEFAULT_CHUNK_BYTES)]),
    "total above max_total_bytes": (good_stream, {"max_total_bytes": TOTAL - 1}, TooLarge,
                                    [str(TOTAL), str(TOTAL - 1)]),
    "wrong sender_id": (lambda: stream_from(sender=SENDER + 1), {}, InvalidMessage,
                        [f"node {SENDER + 1}", f"node {SENDER}"]),
    "wrong round": (lambda: stream_from(round_=ROUND - 1), {}, InvalidMessage,
                    [f"round {ROUND - 1}", f"round {ROUND}"]),
    "next round": (lambda: stream_from(round_=ROUND + 1), {}, InvalidMessage,
                   [f"round {ROUND + 1}", f"round {ROUND}"]),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_stream_is_refused_with_its_class_and_a_precise_message(case: str) -> None:
    make, kwargs, cls, fragments = ERROR_CASES[case]
    with pytest.raises(ProtocolError) as info:
        decode(iter(make()), EXPECTED, sender_id=SENDER, round_=ROUND, **kwargs)
    assert type(info.value) is cls, f"{case}: {type(info.value).__name__}: {info.value}"
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{case}: {fragment!r} not in {message!r}"


def test_error_classes_map_to_the_documented_status_codes() -> None:
    """tensor.proto: INVALID_ARGUMENT malformed, DATA_LOSS truncated, RESOURCE_EXHAUSTED size."""
    assert rpc.STATUS[InvalidMessage] == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc.STATUS[TruncatedStream] == grpc.StatusCode.DATA_LOSS
    assert rpc.STATUS[TooLarge] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_limits_are_inclusive() -> None:
    """A piece of exactly max_chunk_bytes and a stream of exactly max_total_bytes are fine."""
    decoded = decode(good_stream(chunk_bytes=16), EXPECTED, sender_id=SENDER, round_=ROUND,
                     max_chunk_bytes=16, max_total_bytes=TOTAL)
    assert_bit_exact(decoded.tensors, good_tensors())


def test_header_errors_are_raised_before_any_data_is_read() -> None:
    """A bad header is refused at once: decode does not drain (or wait for) the rest."""
    pulled: list[int] = []

    def stream() -> Iterator[pb.TensorChunk]:
        for i, chunk in enumerate(with_header(set_field(0, shape=[5, 3]))):
            pulled.append(i)
            yield chunk

    with pytest.raises(InvalidMessage):
        decode(stream(), EXPECTED, sender_id=SENDER, round_=ROUND)
    assert pulled == [0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [math.nan, -math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [0, 37, 99])
@pytest.mark.parametrize("chunk_bytes", [64, 3, 7])  # pieces that split elements, too
def test_nan_and_inf_are_refused_in_every_float_dtype(dtype: torch.dtype, bad: float,
                                                      where: int, chunk_bytes: int) -> None:
    finite = torch.randn(100, generator=generated(16)).to(dtype)
    poisoned = finite.clone()
    poisoned[where] = bad
    names = ["ok", "h"]
    chunks = list(encode(names, [finite, poisoned], sender_id=SENDER, round_=ROUND,
                         chunk_bytes=chunk_bytes))
    with pytest.raises(InvalidMessage, match=r"'h'.*NaN or Inf"):
        decode(chunks, specs_of(names, [finite, poisoned]), sender_id=SENDER, round_=ROUND)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_extreme_finite_values_are_accepted(dtype: torch.dtype) -> None:
    info = torch.finfo(dtype)
    extremes = torch.tensor([info.max, -info.max, info.tiny, -info.tiny], dtype=dtype)
    subnormal = (extremes[2:] / 4).to(dtype)  # (2,), below the smallest normal
    tensors = [extremes, subnormal, torch.tensor([-0.0], dtype=dtype)]
    _, decoded = roundtrip(["e", "s", "z"], tensors, chunk_bytes=3)
    assert_bit_exact(decoded.tensors, tensors)


def test_integer_tensors_are_not_checked_for_finiteness() -> None:
    tensors = [torch.tensor([torch.iinfo(torch.int64).max, -1], dtype=torch.int64)]
    _, decoded = roundtrip(["i"], tensors, chunk_bytes=3)
    assert_bit_exact(decoded.tensors, tensors)


def test_encode_raw_with_kept_checksums_sends_the_same_bytes() -> None:
    tensors = [torch.randn(5, 3, generator=generated(21)), torch.randn(4).to(torch.bfloat16),
               torch.zeros(0)]
    names = ["w", "b", "empty"]
    plain = list(encode_raw(names, tensors, sender_id=SENDER, round_=ROUND, chunk_bytes=7))
    kept = list(encode_raw(names, tensors, sender_id=SENDER, round_=ROUND, chunk_bytes=7,
                           crcs=checksums(tensors)))
    assert kept == plain
    with pytest.raises(ValueError, match="2 checksums for 3 tensors"):
        list(encode_raw(names, tensors, sender_id=SENDER, round_=ROUND, crcs=[0, 0]))


# ---- memory: one piece per stream, never a copy of the model ----------------------------------


def test_a_stream_holds_one_piece_of_host_memory_at_a_time() -> None:
    """A neighbor's GetModel reads the published snapshot itself: however many streams serve it
    at once, each adds a piece (chunk_bytes) of memory, not a model. tracemalloc sees every
    bytes object and numpy buffer (a `.numpy().tobytes()` or a `bytes()` of the tensor would
    show as 32 MiB); torch's own allocations it does not see, which the load test covers
    (tests/system/test_load.py, peak RSS of a server streaming to 64 neighbors)."""
    import tracemalloc

    model = [torch.randn(2048, 4096, generator=generated(22))]  # (2048, 4096): 32 MiB
    crcs = checksums(model)
    chunk = 256 << 10
    tracemalloc.start()
    try:
        stream = encode_raw(["w"], model, sender_id=SENDER, round_=ROUND, chunk_bytes=chunk,
                            crcs=crcs)
        tracemalloc.reset_peak()
        sizes = [len(message) for message in stream]  # each message dropped once measured
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(sizes) > 32 << 20
    assert peak < 3 * chunk, f"encoding held {peak} bytes at once; a piece is {chunk}"


def test_a_device_tensor_is_streamed_from_host_pieces_with_the_same_bytes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor on a GPU is copied to the host one piece at a time (peer.wire._host_piece):
    the CPU tensors here are read the way a device tensor is (as a torch uint8 view, sliced
    and copied), and the stream and checksums are those of the plain CPU path."""
    import peer.wire

    tensors = [torch.randn(5, 3, generator=generated(23)), torch.randn(7).to(torch.bfloat16),
               torch.zeros(0), torch.arange(9, dtype=torch.int64)]
    names = ["w", "b", "empty", "i"]
    plain = list(encode_raw(names, tensors, sender_id=SENDER, round_=ROUND, chunk_bytes=11))
    plain_crcs = checksums(tensors)
    monkeypatch.setattr(peer.wire, "_flat_bytes",
                        lambda t: t.detach().contiguous().reshape(-1).view(torch.uint8))
    assert checksums(tensors, piece_bytes=5) == plain_crcs
    assert list(encode_raw(names, tensors, sender_id=SENDER, round_=ROUND, chunk_bytes=11)) == plain


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_tensor_streams_the_same_bytes_as_its_cpu_copy() -> None:
    tensors = [torch.randn(300, 500, generator=generated(24)), torch.randn(3)]
    names = ["w", "b"]
    cuda = [t.to("cuda") for t in tensors]
    assert checksums(cuda) == checksums(tensors)
    assert (list(encode_raw(names, cuda, sender_id=SENDER, round_=ROUND, chunk_bytes=4096))
            == list(encode_raw(names, tensors, sender_id=SENDER, round_=ROUND, chunk_bytes=4096)))

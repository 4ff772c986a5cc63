"""Property-based tests of peer/wire's tensor streams (issue #9): every mutation of a valid stream
decodes exactly or is refused with a ProtocolError, never anything else (no sockets).

Each example starts from a VALID stream (streams.py): a small random model (1-4 tensors of one
float dtype, random shapes, empty ones included, any names, magnitudes from subnormal to near the
dtype's top), sent dense or through a random compressor of the registry (random K or S), cut
into pieces of a random size, from a random sender and round. Then it mutates it. Every decode
runs with the tightest limits the valid stream passes (max_total_bytes: its declared size,
max_chunk_bytes: its piece size), and the properties are:

  valid       it decodes bit-identically (dense: the tensors; compressed: the codec's own decoding
              of each record), its messages given as bytes or as parsed TensorChunks, re-cut into
              any pieces, with empty pieces and unknown fields added (the changes that keep the
              meaning);
  transport   bytes flipped, inserted or deleted in any message, messages cut, dropped, repeated,
              reordered or replaced by garbage, extra trailing messages, an empty stream: it
              decodes to exactly what the valid stream gives, or raises InvalidMessage,
              TruncatedStream or TooLarge (REFUSED), never another exception. Exactly: the
              CRC-32C covers the payloads, and the receiver checks every other header field,
              except a compressed header's codec parameters (a changed scale is a valid message);
  header      a header field set to a wrong value is refused, and before any data message is
              pulled, except a wrong CRC-32C (known once the bytes are in);
  huge sizes  a declared size above the limit is TooLarge before any data message is pulled and
              before any buffer of that size is allocated (tracemalloc);
  records     garbage compressed records (wrong k, s, scale, seed or index coding, out-of-range or
              repeated indices, wrong bit counts, bad padding) sent with a right framing and
              CRC-32C: InvalidMessage, or exactly what the codec itself decodes, finite;
  non-finite  a model holding NaN or Inf: refused, or finite after a lossy codec;
  receiver    a receiver configured with another compressor (or none) refuses the stream, unless
              it uses the same codec configured alike, and then decodes it as the sender meant;
  endless     a stream that never ends is refused once it passes its declared size.

Settings: derandomize (the same examples on every run, in CI too), no deadline, no example
database. test_every_property_with_many_examples (slow) runs them all on many more examples.
"""

from __future__ import annotations

import itertools
import math
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from crossgrad.errors import InvalidMessage, TooLarge, TruncatedStream
from crossgrad.v1 import tensor_pb2 as pb
from peer.compression import COMPRESSOR_FORMS, Compressed, Compressor
from peer.compression.bits import pack_varints, packed_nbytes
from peer.compression.sparse import BITMAP, VARINT
from peer.wire import decode, frame_bytes, specs_of

from streams import (
    ENCODINGS,
    Stream,
    any_encoding,
    assert_bit_exact,
    counted,
    names,
    sent_as,
    streams,
)

REFUSED = (InvalidMessage, TruncatedStream, TooLarge)  # what decode documents for a bad stream
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
UNKNOWN_FIELD = b"\x78\x01"  # field 15, varint 1: what a newer sender might add (tensor.proto)


def assert_finite_and_shaped(stream: Stream, tensors: Sequence[torch.Tensor]) -> None:
    for t, sent in zip(tensors, stream.tensors, strict=True):
        assert t.shape == sent.shape and t.dtype == sent.dtype
        assert bool(torch.isfinite(t).all())


# ---- properties --------------------------------------------------------------------------------


def check_round_trip(stream: Stream, data: st.DataObject) -> None:
    """A valid stream, and any re-cut of it with empty pieces and unknown fields, decodes
    bit-identically."""
    decoded = stream.decode(sent_as(data, stream.messages))
    assert_bit_exact(decoded.tensors, stream.want())
    assert (decoded.sender_id, decoded.round) == (stream.sender, stream.round)
    assert decoded.wire_bytes == sum(frame_bytes(len(m)) for m in stream.messages)
    payload = b"".join(pb.TensorChunk.FromString(m).data for m in stream.messages[1:])
    cuts = sorted(data.draw(st.lists(st.integers(0, len(payload)), max_size=8)))
    pieces = [payload[a:b] for a, b in itertools.pairwise([0, *cuts, len(payload)])]
    recut = [stream.messages[0], *(pb.TensorChunk(data=p).SerializeToString() for p in pieces)]
    marked = data.draw(st.lists(st.booleans(), min_size=len(recut), max_size=len(recut)))
    recut = [m + UNKNOWN_FIELD if mark else m for m, mark in zip(recut, marked, strict=True)]
    decoded = stream.decode(sent_as(data, recut), max_chunk_bytes=max(1, len(payload)))
    assert_bit_exact(decoded.tensors, stream.want())


def _edit_bytes(data: st.DataObject, m: bytes) -> bytes:
    j = data.draw(st.integers(0, len(m)))
    kind = data.draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
    if kind == "insert" or j == len(m):
        return m[:j] + bytes([data.draw(st.integers(0, 255))]) + m[j:]
    if kind == "flip":
        return m[:j] + bytes([m[j] ^ data.draw(st.integers(1, 255))]) + m[j + 1:]
    return m[:j] + m[j + 1:] if kind == "delete" else m[:j]


def transported(data: st.DataObject, messages: list[bytes]) -> list[bytes]:
    """The stream after one corruption in transit."""
    ms = list(messages)
    i = data.draw(st.integers(0, len(ms) - 1))
    kind = data.draw(st.sampled_from(["bytes", "cut stream", "drop", "repeat", "reorder",
                                      "garbage", "trailing", "empty"]))
    event(f"transport: {kind}")
    if kind == "bytes":
        ms[i] = _edit_bytes(data, ms[i])
    elif kind == "cut stream":
        ms = ms[:i]
    elif kind == "drop":
        del ms[i]
    elif kind == "repeat":
        ms.insert(data.draw(st.integers(0, len(ms))), ms[i])
    elif kind == "reorder":
        ms = data.draw(st.permutations(ms))
    elif kind == "garbage":
        ms[i] = data.draw(st.binary(max_size=64))
    elif kind == "trailing":
        ms.append(data.draw(st.binary(max_size=64) | st.just(ms[0]) | st.binary(
            min_size=1, max_size=48).map(lambda b: pb.TensorChunk(data=b).SerializeToString())))
    else:
        ms = []
    return ms


def check_transport(stream: Stream, data: st.DataObject) -> None:
    mutated = transported(data, stream.messages)
    try:
        decoded = stream.decode(sent_as(data, mutated))
    except REFUSED as exc:
        event(f"transport: {type(exc).__name__}")
        return
    event("transport: decoded")
    if stream.compressor is not None and mutated[:1] != stream.messages[:1]:
        # a compressed header's codec parameters are no CRC's business: a valid, other message
        assert_finite_and_shaped(stream, decoded.tensors)
    else:
        assert_bit_exact(decoded.tensors, stream.want())


uint32, uint64 = st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)
int64 = st.integers(-1, 8) | st.integers(-(2**63), 2**63 - 1)
enums = st.integers(-1, 9) | st.integers(-(2**31), 2**31 - 1)  # proto3 enums are open


def edit_header(data: st.DataObject, header: pb.StreamHeader) -> str:
    """Set one header field to a (drawn) wrong value, in place; the field's name."""
    fields = ["sender_id", "round", "total_bytes", "tensors", "name", "shape", "dtype", "codec",
              "byte_length", "crc32c"]
    field = data.draw(st.sampled_from(fields))
    tensors = header.tensors
    i = data.draw(st.integers(0, len(tensors) - 1))
    if field in ("sender_id", "round", "total_bytes"):
        setattr(header, field, data.draw(uint32 if field == "sender_id" else uint64))
    elif field == "tensors":  # one too few, one too many, or two swapped
        kept = list(tensors)
        j = data.draw(st.integers(0, len(kept) - 1))
        how = data.draw(st.sampled_from(["drop", "copy", "swap"]))
        if how == "drop":
            del kept[i]
        elif how == "copy":
            kept.insert(j, kept[i])
        else:
            kept[i], kept[j] = kept[j], kept[i]
        edited = [pb.TensorHeader.FromString(h.SerializeToString()) for h in kept]
        del tensors[:]
        tensors.extend(edited)
    elif field == "shape":
        del tensors[i].shape[:]
        tensors[i].shape.extend(data.draw(st.lists(int64, max_size=4)))
    else:
        values = {"name": names, "dtype": enums, "codec": enums, "byte_length": uint64,
                  "crc32c": uint32}
        setattr(tensors[i], field, data.draw(values[field]))
    return field


def check_header(stream: Stream, data: st.DataObject) -> None:
    header = pb.TensorChunk.FromString(stream.messages[0]).header
    field = edit_header(data, header)
    if header == pb.TensorChunk.FromString(stream.messages[0]).header:
        return  # the drawn "wrong" value was the right one
    pulled: list[int] = []
    messages = [pb.TensorChunk(header=header).SerializeToString(), *stream.messages[1:]]
    with pytest.raises(REFUSED):
        stream.decode(counted(sent_as(data, messages), pulled))
    if field != "crc32c":
        assert pulled == [0], f"{field}: decode read data before refusing the header"


def check_huge_size(stream: Stream, data: st.DataObject) -> None:
    """A declared size far above the limit (in total, or as one tensor's length)."""
    declared = data.draw(st.integers(max(1 << 24, stream.total + 1), 2**64 - 1))
    header = pb.TensorChunk.FromString(stream.messages[0]).header
    if data.draw(st.booleans()):
        header.total_bytes = declared
    else:  # a consistent header: the total is the sum
        i = data.draw(st.integers(0, len(header.tensors) - 1))
        rest = header.total_bytes - header.tensors[i].byte_length
        header.tensors[i].byte_length = declared - rest  # declared > total >= rest
        header.total_bytes = declared
    messages = [pb.TensorChunk(header=header).SerializeToString(), *stream.messages[1:]]
    pulled: list[int] = []
    tracemalloc.start()
    try:
        with pytest.raises(TooLarge, match=str(header.total_bytes)):
            stream.decode(counted(messages, pulled))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert pulled == [0]
    assert peak < 1 << 20, f"{peak} bytes allocated while refusing {header.total_bytes}"


floats = st.floats() | st.integers(-3, 400).map(float)  # NaN, Inf, huge, fractional, plausible


def bad_record(data: st.DataObject, record: Compressed) -> Compressed:
    """The record with one thing wrong that a sender (buggy or hostile) could put on the wire."""
    params, payload = dict(record.params), record.payload
    kinds = ["param", "drop param", "payload", "random payload"]
    kind = data.draw(st.sampled_from(kinds + (["topk gaps", "topk bitmap"]
                                              if record.codec == "topk" else [])))
    event(f"record: {kind}")
    if kind == "param":
        key = data.draw(st.sampled_from([*sorted(params), "extra"]))
        params[key] = data.draw(floats)
    elif kind == "drop param" and params:
        del params[data.draw(st.sampled_from(sorted(params)))]
    elif kind == "payload":
        payload = _edit_bytes(data, payload)
    elif kind == "random payload":  # qsgd: levels above s; sign and bitmaps: padding bits set
        payload = data.draw(st.binary(min_size=len(payload), max_size=len(payload)) |
                            st.binary(max_size=len(payload) + 16))
    elif kind in ("topk gaps", "topk bitmap"):  # k indices, some out of range, maybe repeated
        d, k = record.numel, int(params["k"])
        values = payload[:k * record.dtype.itemsize]
        if kind == "topk gaps":
            unique = data.draw(st.booleans())
            idx = sorted(data.draw(st.lists(st.integers(0, 2 * d), min_size=k, max_size=k,
                                            unique=unique)))
            params["index_coding"] = float(VARINT)
            payload = values + pack_varints(np.diff(np.array(idx, np.uint64), prepend=0))
        else:  # a position at or above d sets a padding bit
            nbytes = packed_nbytes(d, 1)
            idx = data.draw(st.lists(st.integers(0, max(0, 8 * nbytes - 1)), min_size=k,
                                     max_size=k, unique=True))
            marks = np.zeros(8 * nbytes, np.bool_)
            marks[idx] = True
            params["index_coding"] = float(BITMAP)
            payload = values + np.packbits(marks, bitorder="little").tobytes()
    return replace(record, params=params, payload=payload)


def check_record(stream: Stream, data: st.DataObject) -> None:
    if stream.compressor is None:
        return
    records = list(stream.records)
    i = data.draw(st.integers(0, len(records) - 1))
    records[i] = bad_record(data, records[i])
    bad = stream.with_records(records)  # the framing, totals and CRC-32C are right
    try:
        decoded = bad.decode(sent_as(data, bad.messages))
    except InvalidMessage:
        event(f"record {stream.compressor.name}: refused")
        return
    event(f"record {stream.compressor.name}: decoded")
    assert_finite_and_shaped(stream, decoded.tensors)
    assert_bit_exact(decoded.tensors, bad.want())  # nothing but what the codec decodes


NON_FINITE = [math.nan, -math.nan, math.inf, -math.inf]
# May deliver a poisoned model as finite tensors: the casts clamp Inf to their largest finite
# value (peer/compression/dense.py) and randk may not draw the poisoned coordinate.
MAY_HIDE_NON_FINITE = {"fp16", "bf16", "randk"}


def check_non_finite(stream: Stream, data: st.DataObject) -> None:
    tensors = [t.clone() for t in stream.tensors]
    poisonable = [j for j, t in enumerate(tensors) if t.numel()]
    if not poisonable:
        return
    i = data.draw(st.sampled_from(poisonable))
    tensors[i].view(-1)[data.draw(st.integers(0, tensors[i].numel() - 1))] = data.draw(
        st.sampled_from(NON_FINITE))
    poisoned = stream.with_tensors(tensors)
    try:
        decoded = poisoned.decode(sent_as(data, poisoned.messages))
    except InvalidMessage as exc:
        assert "NaN or Inf" in str(exc) or "nan" in str(exc) or "inf" in str(exc), str(exc)
        return
    assert stream.compressor is not None and stream.compressor.name in MAY_HIDE_NON_FINITE
    assert_finite_and_shaped(stream, decoded.tensors)


def codec_of(compressor: Compressor | None) -> str:
    return "none" if compressor is None else compressor.name


def check_other_receiver(stream: Stream, data: st.DataObject) -> None:
    """A receiver configured with another compressor (or none) than the sender's."""
    receiver = data.draw(any_encoding)
    try:
        decoded = decode(stream.messages, specs_of(stream.names, stream.tensors),
                         sender_id=stream.sender, round_=stream.round, compressor=receiver,
                         max_total_bytes=stream.total, max_chunk_bytes=stream.chunk_bytes)
    except InvalidMessage:
        return
    # accepted only when both use the same codec (dense is `none`'s), configured alike for these
    # shapes (e.g. topk:0.3 and topk:0.31 keep as many elements): then as the sender meant it
    assert codec_of(receiver) == codec_of(stream.compressor)
    assert_bit_exact(decoded.tensors, stream.want())


def check_endless(stream: Stream, data: st.DataObject) -> None:
    if len(stream.messages) == 1:  # no data pieces: nothing to repeat
        return
    pulled: list[int] = []
    endless = itertools.chain(stream.messages, itertools.cycle(stream.messages[1:]))
    with pytest.raises(InvalidMessage, match="more than"):
        stream.decode(counted(endless, pulled))
    assert len(pulled) == len(stream.messages) + 1


PROPERTIES: dict[str, Callable[[Stream, st.DataObject], None]] = {
    "round trip": check_round_trip, "transport": check_transport, "header": check_header,
    "huge size": check_huge_size, "record": check_record, "non-finite": check_non_finite,
    "other receiver": check_other_receiver, "endless": check_endless,
}


# ---- tests -------------------------------------------------------------------------------------


@settings(FUZZ, max_examples=80)
@given(stream=streams(), data=st.data())
def test_valid_streams_round_trip_bit_identically(stream: Stream, data: st.DataObject) -> None:
    check_round_trip(stream, data)


@settings(FUZZ, max_examples=300)
@given(stream=streams(), data=st.data())
def test_a_stream_corrupted_in_transit_decodes_exactly_or_is_refused(
        stream: Stream, data: st.DataObject) -> None:
    check_transport(stream, data)


@settings(FUZZ, max_examples=150)
@given(stream=streams(), data=st.data())
def test_a_wrong_header_field_is_refused_before_any_data(stream: Stream,
                                                         data: st.DataObject) -> None:
    check_header(stream, data)


@FUZZ
@given(stream=streams(), data=st.data())
def test_a_huge_declared_size_is_refused_before_allocation(stream: Stream,
                                                           data: st.DataObject) -> None:
    check_huge_size(stream, data)


def test_the_allocation_probe_sees_numpy_buffers() -> None:
    """check_huge_size's tracemalloc sees the buffers decode would allocate (numpy's), so its
    bound is not vacuous."""
    tracemalloc.start()
    try:
        buffer = np.empty(1 << 24, np.uint8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak >= buffer.nbytes


@pytest.mark.parametrize("form", COMPRESSOR_FORMS)
def test_a_garbage_compressed_record_is_refused_or_decoded_as_the_codec_does(form: str) -> None:
    @settings(FUZZ, max_examples=50)
    @given(stream=streams(encoding=ENCODINGS[form]), data=st.data())
    def check(stream: Stream, data: st.DataObject) -> None:
        check_record(stream, data)

    check()


@settings(FUZZ, max_examples=80)
@given(stream=streams(), data=st.data())
def test_a_non_finite_model_never_arrives_non_finite(stream: Stream, data: st.DataObject) -> None:
    check_non_finite(stream, data)


@settings(FUZZ, max_examples=60)
@given(stream=streams(), data=st.data())
def test_a_receiver_configured_otherwise_refuses_or_decodes_alike(stream: Stream,
                                                                 data: st.DataObject) -> None:
    check_other_receiver(stream, data)


@settings(FUZZ, max_examples=20)
@given(stream=streams(), data=st.data())
def test_an_endless_stream_is_refused_past_its_declared_size(stream: Stream,
                                                             data: st.DataObject) -> None:
    check_endless(stream, data)


@pytest.mark.slow
@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_every_property_with_many_examples(encoding: str) -> None:
    @settings(FUZZ, max_examples=300)
    @given(stream=streams(encoding=ENCODINGS[encoding]), data=st.data())
    def check_all(stream: Stream, data: st.DataObject) -> None:
        for check in PROPERTIES.values():
            check(stream, data)

    check_all()

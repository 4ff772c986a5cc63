"""Helpers shared by the tensor-stream tests (test_wire, test_wire_fuzz): a tensor's bytes as the
wire carries them, the bit-exact comparison every round trip ends with, and the hypothesis
strategy of valid streams (`streams`) that test_wire_fuzz mutates."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from google.protobuf.message import DecodeError
from hypothesis import strategies as st

from crossgrad.v1 import tensor_pb2 as pb
from peer.compression import COMPRESSOR_FORMS, Compressed, Compressor, make
from peer.wire import Decoded, Message, decode, encode_compressed_raw, encode_raw, specs_of


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


# ---- valid streams, as hypothesis draws them ---------------------------------------------------


@dataclass(frozen=True)
class Stream:
    """A valid stream and everything it was made from."""

    names: list[str]
    tensors: list[torch.Tensor]
    compressor: Compressor | None  # None: dense (CODEC_NONE)
    seeds: list[int]  # the compressor's seed for each tensor
    records: list[Compressed]  # what the compressor made of each tensor; empty when dense
    sender: int
    round: int
    chunk_bytes: int
    messages: list[bytes]  # serialized TensorChunks: the header, then the data pieces

    @property
    def total(self) -> int:
        return int(pb.TensorChunk.FromString(self.messages[0]).header.total_bytes)

    def decode(self, messages: Iterable[Message], **limits: int) -> Decoded:
        limits = {"max_total_bytes": self.total, "max_chunk_bytes": self.chunk_bytes, **limits}
        return decode(messages, specs_of(self.names, self.tensors), sender_id=self.sender,
                      round_=self.round, compressor=self.compressor, **limits)

    def want(self) -> list[torch.Tensor]:
        """What decoding the valid stream gives."""
        if self.compressor is None:
            return self.tensors
        return [self.compressor.decompress(r) for r in self.records]

    def with_tensors(self, tensors: list[torch.Tensor]) -> Stream:
        return encoded(self.names, tensors, self.compressor, self.seeds, self.sender, self.round,
                       self.chunk_bytes)

    def with_records(self, records: list[Compressed]) -> Stream:
        messages = list(encode_compressed_raw(self.names, records, sender_id=self.sender,
                                              round_=self.round, chunk_bytes=self.chunk_bytes))
        return replace(self, records=records, messages=messages)


def encoded(names: list[str], tensors: list[torch.Tensor], compressor: Compressor | None,
            seeds: list[int], sender: int, round_: int, chunk_bytes: int) -> Stream:
    records: list[Compressed] = []
    if compressor is None:
        raw = encode_raw(names, tensors, sender_id=sender, round_=round_, chunk_bytes=chunk_bytes)
    else:
        records = [compressor.compress(t, seed=s) for t, s in zip(tensors, seeds, strict=True)]
        raw = encode_compressed_raw(names, records, sender_id=sender, round_=round_,
                                    chunk_bytes=chunk_bytes)
    return Stream(names, tensors, compressor, seeds, records, sender, round_, chunk_bytes,
                  list(raw))


# The argument of each compressor form (COMPRESSOR_FORMS: "topk:K", "qsgd:S", ...): a KeyError
# here means a compressor with a new kind of parameter, which this file must learn to draw.
ARGS: dict[str, st.SearchStrategy[str]] = {
    "K": st.sampled_from(["0.01", "0.3", "0.9"]) | st.integers(1, 300).map(str),
    "S": st.sampled_from(["1", "2", "3", "4", "7", "8", "127", "128", "1000"]),
}


def _specs(form: str) -> st.SearchStrategy[str]:
    name, _, arg = form.partition(":")
    return ARGS[arg].map(lambda value: f"{name}:{value}") if arg else st.just(name)


# How a stream's tensors travel: dense, or each compressor form with a drawn argument.
ENCODINGS: dict[str, st.SearchStrategy[Compressor | None]] = {
    "dense": st.none(), **{form: _specs(form).map(make) for form in COMPRESSOR_FORMS}}
any_encoding = st.sampled_from(sorted(ENCODINGS)).flatmap(ENCODINGS.__getitem__)
shapes = st.lists(st.integers(0, 6), max_size=3).map(tuple)
names = st.text(st.characters(exclude_categories=["Cs"]), max_size=10)  # any valid UTF-8
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Magnitudes of a tensor's values: plain, zeros (and -0.0), subnormals, near the dtype's top.
# Near the top means max/(8 numel), and at most 2**500: what qsgd and sign can send. qsgd's L2
# norm travels as a scale of the dtype (the receiver refuses one above float16's 65504) and is
# summed in float64 (whose squares overflow above 2**512); sign sums its L1 mean before dividing.
SCALES: list[Callable[[torch.finfo, int], float]] = [
    lambda info, n: 1.0, lambda info, n: 0.0, lambda info, n: info.tiny / 4,
    lambda info, n: min(info.max, 2.0**500) / (8 * max(1, n))]


@st.composite
def streams(draw: st.DrawFn,
            encoding: st.SearchStrategy[Compressor | None] = any_encoding) -> Stream:
    """A valid stream of a small model: 1-4 tensors of one float dtype and random shapes (empty
    ones too), with any names and magnitudes (SCALES), dense or compressed (`encoding`), in pieces
    of 1-48 bytes, from any sender for any round."""
    shape_list = draw(st.lists(shapes, min_size=1, max_size=4))
    n = len(shape_list)
    name_list = [f"{name}#{i}" for i, name in enumerate(draw(st.lists(names, min_size=n,
                                                                       max_size=n)))]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from(FLOATS))
    scale = draw(st.sampled_from(SCALES))
    tensors = [(torch.randn(shape, generator=g, dtype=torch.float64)
                * scale(torch.finfo(dtype), math.prod(shape))).to(dtype) for shape in shape_list]
    seeds = draw(st.lists(st.integers(0, 2**63 - 1), min_size=n, max_size=n))
    return encoded(name_list, tensors, draw(encoding), seeds, draw(st.integers(0, 2**32 - 1)),
                   draw(st.integers(0, 2**64 - 1)), draw(st.integers(1, 48)))


def sent_as(data: st.DataObject, messages: Sequence[bytes]) -> list[Message]:
    """Each message as bytes or, at random, as the TensorChunk it parses into (decode takes both,
    through different paths)."""
    out: list[Message] = []
    for m in messages:
        if data.draw(st.booleans()):
            try:
                out.append(pb.TensorChunk.FromString(m))
                continue
            except DecodeError:
                pass
        out.append(m)
    return out


def counted(messages: Iterable[Message], pulled: list[int]) -> Iterator[Message]:
    """The messages, noting in `pulled` each one decode asks for."""
    for i, m in enumerate(messages):
        pulled.append(i)
        yield m

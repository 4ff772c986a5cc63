"""Malformed compressed cross-gradients over real gRPC (issue #4), on 127.0.0.1:0.

Which direction carries compressed tensors into a node: only the answer of
ComputeCrossGradient, in a run with a compressor (compcga, compngc, or cga/ngc with
--compressor). No request of any service carries a tensor (part (a) says so), so a bad
compressed stream reaches a node only as the answer of a neighbor it asked. Node 1 below is
such a neighbor: a real gRPC server that answers node 0's ComputeCrossGradient with its honest
compressed cross-gradient edited by the test. Record edits go through peer/wire's
encode_compressed_raw like any sender's, so the framing, totals and CRC-32C are right and what
fails is the codec's own check; header edits change the framing itself.

Node 0 is a real PeerRuntime whose GrpcNeighborhood fetches from the fake (part (b)). For every
bad answer: the fetch raises the ProtocolError class whose status (crossgrad/rpc.py STATUS) is
the one tensor.proto documents, with a message naming the neighbor, the round, the tensor and
the problem; a gathering round counts it as a rejected answer and logs it; node 0's parameters,
algorithm state and error-feedback memories are unchanged; and node 0 still answers health,
GetStatus and GetModel. A whole round with a bad answer ends exactly as the simulator's round
without that answer (part (c)). Part (d): node 0 as the server of compressed cross-gradients.
Part (e): bad compressor specs stop the CLI at start.

Runs: 3 nodes on a ring, the embedded digits data; node 0's neighbors are 1 and 2. The model's
tensors are (128, 64), (128,), (64, 128), (64,), (10, 64), (10,): the last has 10 elements, so
its bit arrays end in 6 padding bits.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from crossgrad import cli, rpc
from crossgrad.errors import InvalidMessage, ProtocolError, TruncatedStream
from crossgrad.v1 import bootstrap_pb2, peer_pb2, tensor_pb2
from peer.client import Misses
from peer.compression import Compressed, make
from peer.compression import decode as decode_record
from peer.compression.bits import pack_varints, unpack_varints
from peer.compression.sparse import BITMAP, VARINT
from peer.node import Node
from peer.wire import decode, encode, encode_compressed_raw, specs_of

from harness import (
    PEER,
    Cluster,
    FakePeer,
    Run,
    Trio,
    ask,
    assert_same,
    clone,
    load_run,
    round_in_memory,
    rpc_error,
)

CHUNK = 1024  # the fake's pieces: a compressed cross-gradient takes several
W0, B2 = "net.1.weight", "net.5.bias"  # tensor 0 (8192 elements) and tensor 5 (10 elements)
D0, D5 = 128 * 64, 10
# The run each compressor is tested in (every algorithm that compresses cross-gradients).
ALGORITHM = {"topk:0.05": "compcga", "sign": "compngc", "qsgd:4": "cga"}
K0 = round(0.05 * D0)  # topk:0.05 keeps 410 of tensor 0's elements


# ================================================================================================
# nodes, the fake neighbor, node 0's state
# ================================================================================================


def compressed_run(compressor: str) -> Run:
    run = load_run(3, algorithm=ALGORITHM[compressor], compressor=compressor)
    assert run.assigned[0].neighbors == (1, 2)
    return run


@pytest.fixture(scope="module")
def runs() -> dict[str, Run]:
    return {spec: compressed_run(spec) for spec in ALGORITHM}


RecordEdit = Callable[[list[Compressed]], list[Compressed]]
ChunkEdit = Callable[[list[tensor_pb2.TensorChunk]], list[tensor_pb2.TensorChunk]]


def stream(names: Sequence[str], records: Sequence[Compressed],
           round_: int) -> list[tensor_pb2.TensorChunk]:
    """What an honest sender's wire code makes of these records (node 1, round_)."""
    return [tensor_pb2.TensorChunk.FromString(raw) for raw in encode_compressed_raw(
        names, records, sender_id=1, round_=round_, chunk_bytes=CHUNK)]


class CompressingFake(FakePeer):
    """Node 1 as a plain gRPC server. GetModel: its model (times `model_scale`).
    ComputeCrossGradient: its real compressed cross-gradient of the requester's model (taken
    out of band from `requesters`), through `edit_records`, encoded, through `edit_chunks`."""

    def __init__(self, node: Node) -> None:
        super().__init__(node, chunk_bytes=64 * CHUNK)
        self.edit_records: RecordEdit | None = None
        self.edit_chunks: ChunkEdit | None = None
        self.model_scale = 1.0

    def honest_records(self, requester: int, round_: int) -> list[Compressed]:
        self.honest_cross_gradient(requester, round_)
        records = self.node.cross_gradient_records(requester, round_)
        assert records is not None
        return records

    def model_stream(self, request: peer_pb2.GetModelRequest,
                     context: grpc.ServicerContext) -> Iterator[tensor_pb2.TensorChunk]:
        params = [p * self.model_scale for p in self.node.params]
        return encode(self.node.names, params, sender_id=1, round_=request.round,
                      chunk_bytes=self.chunk_bytes)

    def cross_gradient_stream(self, request: peer_pb2.CrossGradientRequest,
                              context: grpc.ServicerContext) -> list[tensor_pb2.TensorChunk]:
        records = self.honest_records(request.requester_id, request.round)
        if self.edit_records is not None:
            records = self.edit_records(list(records))
        chunks = stream(self.node.names, records, request.round)
        if self.edit_chunks is not None:
            chunks = self.edit_chunks(chunks)
        return chunks


Compressing = Trio[CompressingFake]


def prefix(c: Compressing) -> str:
    """How node 0's client starts the message of a refused answer of this round."""
    return (f"cross_gradient of round {c.node0.round} from node 1 at "
            f"{c.fake_server.address} rejected: ")


def reset(c: Compressing) -> None:
    c.fake.edit_records = c.fake.edit_chunks = None
    c.fake.model_scale = 1.0
    c.hood.misses = Misses()


@pytest.fixture(scope="module")
def warm(runs: dict[str, Run]) -> Iterator[dict[str, Compressing]]:
    """A trio per compressor whose node 0 holds state worth corrupting: it did round 0 with
    honest neighbors (momentum, its own error-feedback memory) and served node 2's compressed
    cross-gradient of round 0 (sender memories of link 2); it is now at round 1, published."""
    clusters: dict[str, Compressing] = {}
    with Cluster() as cluster:
        for spec, run in runs.items():
            c = clusters[spec] = cluster.trio(run, CompressingFake(run.node(1)))
            record = c.node0.run_round(c.hood)
            assert (record.answered, c.hood.misses.total) == ([1, 2], 0)
            c.node0.publish()
            assert ask(cluster.peer_stub(c.rt0.address), "ComputeCrossGradient", 2, 0,
                       timeout=10)
            # Both links' memories: node 2 asked; node 1's cross-gradient was computed when its
            # model arrived (peer/node.py, prepare_cross_gradient), whether or not it asks.
            assert c.node0.feedback is not None and len(c.node0.feedback) == 12
        yield clusters


@pytest.fixture
def fresh(runs: dict[str, Run], cluster: Cluster) -> Callable[[str], Compressing]:
    """fresh(compressor) -> a new trio at round 0, stopped after the test."""
    return lambda spec: cluster.trio(runs[spec], CompressingFake(runs[spec].node(1)))


def state_of(node: Node) -> dict[str, Any]:
    """Everything a neighbor's answer could corrupt, as copies."""
    algorithm = node.algorithm
    return {
        "params": clone(node.params),
        "round": node.round,
        "published": node.latest_published(),
        "model": clone(node.model(node.round)),
        "algorithm": copy.deepcopy(algorithm.state_dict()),  # momentum, CGA's v, self memory
        "stats": dict(algorithm.stats),
        "sender memories": node.feedback.state_dict() if node.feedback is not None else {},
        "cached from node 1": (node.neighbor_model(1, node.round) is not None,
                               node.has_cross_gradient(1, node.round)),
    }


def equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
                and a.dtype == b.dtype and np.array_equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def assert_state_unchanged(node: Node, before: dict[str, Any]) -> None:
    after = state_of(node)
    changed = [key for key in before if not equal(before[key], after[key])]
    assert not changed, f"node {node.id}'s state changed: {changed}"


def assert_still_serves(c: Compressing) -> None:
    """Node 0 answers health, GetStatus and GetModel (its current model) on a new channel."""
    status = c.cluster.assert_still_serves(c.rt0, requester=2)
    assert status.state == "TRAINING"


# ================================================================================================
# (a) which RPCs carry tensors
# ================================================================================================


def _carries_bytes(message: Descriptor, seen: frozenset[str] = frozenset()) -> list[str]:
    """Paths of the bytes fields (tensor payloads travel as bytes) and TensorChunk fields."""
    found = []
    for f in message.fields:
        if f.type == FieldDescriptor.TYPE_BYTES:
            found.append(f.full_name)
        elif f.message_type is not None and f.message_type.full_name not in seen:
            if f.message_type.full_name == "crossgrad.v1.TensorChunk":
                found.append(f.full_name)
            else:
                found += _carries_bytes(f.message_type, seen | {message.full_name})
    return found


def test_no_request_carries_a_tensor_only_answers_do() -> None:
    """So a bad compressed stream can reach a node only as a neighbor's answer: the fake
    servers here and in test_replicas_rpc.py are the whole attack surface for tensors."""
    streams = []
    for module, name in ((peer_pb2, "Peer"), (bootstrap_pb2, "Bootstrap")):
        for method in module.DESCRIPTOR.services_by_name[name].methods:
            assert _carries_bytes(method.input_type) == [], method.full_name
            if method.output_type.full_name == "crossgrad.v1.TensorChunk":
                streams.append(method.full_name)
            else:
                assert _carries_bytes(method.output_type) == [], method.full_name
    assert streams == [f"{PEER}.{m}" for m in ("GetModel", "ComputeCrossGradient",
                                               "GetModelUpdate", "GetReplica", "GetEstimate")]


# ================================================================================================
# (b) node 0 fetches a bad compressed cross-gradient from node 1
# ================================================================================================


def on(index: int, edit: Callable[[Compressed], Compressed]) -> RecordEdit:
    """A record edit of tensor `index` only."""
    def apply(records: list[Compressed]) -> list[Compressed]:
        records[index] = edit(records[index])
        return records
    return apply


def params(**changes: float) -> Callable[[Compressed], Compressed]:
    return lambda r: dataclasses.replace(r, params={**r.params, **changes})


def payload(change: Callable[[bytes], bytes]) -> Callable[[Compressed], Compressed]:
    return lambda r: dataclasses.replace(r, payload=change(r.payload))


def foreign(spec: str) -> RecordEdit:
    """The same tensors compressed with another compressor than the run's."""
    return lambda records: [make(spec).compress(decode_record(r), seed=7) for r in records]


def topk_parts(r: Compressed) -> tuple[np.ndarray, np.ndarray]:
    """(values, indices) of an honest float32 topk record with varint-coded indices."""
    k = int(r.params["k"])
    assert r.dtype == torch.float32 and r.params["index_coding"] == VARINT
    values = np.frombuffer(r.payload[:4 * k], np.float32).copy()
    gaps = unpack_varints(r.payload[4 * k:], k, "test")
    return values, np.cumsum(gaps.astype(np.int64))


def topk(change: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
         ) -> Callable[[Compressed], Compressed]:
    """Edit a topk record's values and indices, re-encoded as varint gaps; k = the values."""
    def apply(r: Compressed) -> Compressed:
        values, idx = change(*topk_parts(r))
        gaps = np.diff(idx, prepend=0).astype(np.uint64)
        return dataclasses.replace(
            r, params={"k": float(len(values)), "index_coding": VARINT},
            payload=values.astype(np.float32).tobytes() + pack_varints(gaps))
    return apply


def last_index(value: int) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    def change(values: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx[-1] = value
        return values, idx
    return change


def repeat_first(values: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx[1] = idx[0]
    return values, idx


def drop_last(values: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return values[:-1], idx[:-1]


def drop_last_index(values: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return values, idx[:-1]


def nan_value(values: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values[0] = math.nan
    return values, idx


def bitmap_beyond_the_end(r: Compressed) -> Compressed:
    """Tensor 5 (10 elements, k = 1) with its one index coded in a bitmap as index 10: bit 10
    of the 16, i.e. a padding bit."""
    assert r.shape == (D5,) and r.params["k"] == 1
    return dataclasses.replace(r, params={"k": 1.0, "index_coding": BITMAP},
                               payload=r.payload[:4] + bytes([0, 1 << (D5 - 8)]))


def header(change: Callable[[tensor_pb2.StreamHeader], None]) -> ChunkEdit:
    def apply(chunks: list[tensor_pb2.TensorChunk]) -> list[tensor_pb2.TensorChunk]:
        change(chunks[0].header)
        return chunks
    return apply


def set_codec(value: int) -> ChunkEdit:
    def change(h: tensor_pb2.StreamHeader) -> None:
        h.tensors[0].codec = value  # an open enum: any int goes on the wire
    return header(change)


def declare_more(h: tensor_pb2.StreamHeader) -> None:
    """Tensor 0's byte_length (and the total) 8 bytes above what is sent."""
    h.tensors[0].byte_length += 8
    h.total_bytes += 8


def declare_less(h: tensor_pb2.StreamHeader) -> None:
    """Tensor 0's byte_length (and the total) 8 bytes below what is sent."""
    h.tensors[0].byte_length -= 8
    h.total_bytes -= 8


def declare_huge(h: tensor_pb2.StreamHeader) -> None:
    """A consistent header whose tensor 0 is larger than any encoding of 8192 float32."""
    extra = 2 * D0 * 4 + 1025 - h.tensors[0].byte_length
    h.tensors[0].byte_length += extra
    h.total_bytes += extra


def cut_short(chunks: list[tensor_pb2.TensorChunk]) -> list[tensor_pb2.TensorChunk]:
    return chunks[:-1]


@dataclass(frozen=True)
class Case:
    compressor: str
    name: str
    edit_records: RecordEdit | None
    edit_chunks: ChunkEdit | None
    error: type[ProtocolError]
    says: tuple[str, ...]  # substrings of the message after node 0's prefix

    @property
    def code(self) -> grpc.StatusCode:
        return {InvalidMessage: grpc.StatusCode.INVALID_ARGUMENT,
                TruncatedStream: grpc.StatusCode.DATA_LOSS}[self.error]


def bad(compressor: str, name: str, edit: RecordEdit, *says: str) -> Case:
    """Records edited before the sender's wire code: consistent framing, a bad record."""
    return Case(compressor, name, edit, None, InvalidMessage, says)


def bad_framing(compressor: str, name: str, edit: ChunkEdit, *says: str,
                error: type[ProtocolError] = InvalidMessage) -> Case:
    """Honest records, the encoded stream edited: its header or its messages."""
    return Case(compressor, name, None, edit, error, says)


T0, T5 = f"tensor {W0!r}: ", f"tensor {B2!r}: "  # codec errors name the tensor
H0 = f"tensor 0 ({W0!r}): "  # header errors name its position too
CASES = [
    # topk (compcga)
    bad("topk:0.05", "index out of range", on(0, topk(last_index(D0))),
        T0 + f"topk indices: index {D0} out of range for {D0} elements"),
    bad("topk:0.05", "index out of range in a bitmap", on(5, bitmap_beyond_the_end),
        T5 + "topk indices: nonzero padding bits after the last of 10 bits"),
    bad("topk:0.05", "repeated index", on(0, topk(repeat_first)),
        T0 + "topk indices: index 1 repeats index 0 (a zero gap); indices must be unique"),
    bad("topk:0.05", "k not the run's", on(0, topk(drop_last)),
        T0 + f"topk record: k={K0 - 1}.0, expected {K0} (topk:0.05 of {D0} elements)"),
    bad("topk:0.05", "one index fewer than k", on(0, topk(drop_last_index)),
        T0 + f"topk indices: {K0 - 1} varints, expected {K0}"),
    bad("topk:0.05", "payload shorter than the k values", on(0, payload(lambda b: b[:100])),
        T0 + f"topk payload: 100 bytes, shorter than its k={K0} values of torch.float32"),
    bad("topk:0.05", "NaN value", on(0, topk(nan_value)), T0 + "topk values: NaN or Inf"),
    bad("topk:0.05", "unknown index coding", on(0, params(index_coding=2.0)),
        T0 + "topk record: index_coding=2.0, expected an integer in [0, 1]"),
    bad("topk:0.05", "unexpected parameter", on(0, params(scale=1.0)),
        T0 + "topk record: parameters ['index_coding', 'k', 'scale'], "
             "expected ['index_coding', 'k']"),
    bad_framing("topk:0.05", "unknown codec enum value", set_codec(99),
        H0 + "codec 99 is not accepted here; expected CODEC_TOPK (the run's compressor)"),
    bad("topk:0.05", "sign stream", foreign("sign"),
        H0 + "codec CODEC_SIGN is not accepted here; expected CODEC_TOPK"),
    bad_framing("topk:0.05", "byte_length above the payload", header(declare_more),
        "the stream ended after", error=TruncatedStream),
    bad_framing("topk:0.05", "byte_length below the payload", header(declare_less),
        "the stream carries more than the", "bytes its header declares"),
    bad_framing("topk:0.05", "byte_length beyond any encoding", header(declare_huge),
        H0 + f"byte_length {2 * D0 * 4 + 1025} is more than any topk encoding of shape "
             "(128, 64) of torch.float32 takes"),
    # sign (compngc)
    bad("sign", "bit array one byte short", on(0, payload(lambda b: b[:-1])),
        T0 + f"sign bits: {D0 // 8 - 1} bytes, expected {D0 // 8} ({D0} fields of 1 bits)"),
    bad("sign", "bit array one byte long", on(0, payload(lambda b: b + b"\0")),
        T0 + f"sign bits: {D0 // 8 + 1} bytes, expected {D0 // 8}"),
    bad("sign", "padding bits set", on(5, payload(lambda b: b[:-1] + bytes([b[-1] | 0x80]))),
        T5 + "sign bits: nonzero padding bits after the last of 10 bits (a truncated or "
             "misaligned bit array)"),
    bad("sign", "NaN scale", on(0, params(scale=math.nan)),
        T0 + "sign record: parameter scale=nan must be a finite number"),
    bad("sign", "Inf scale", on(0, params(scale=math.inf)),
        T0 + "sign record: parameter scale=inf must be a finite number"),
    bad("sign", "negative scale", on(0, params(scale=-1.0)),
        T0 + "sign record: scale=-1.0, expected a finite scale in [0, 3.40282e+38]"),
    bad("sign", "scale beyond float32", on(0, params(scale=1e39)),
        T0 + "sign record: scale=1e+39, expected a finite scale in [0, 3.40282e+38]"),
    bad("sign", "no scale", on(0, lambda r: dataclasses.replace(r, params={})),
        T0 + "sign record: parameters [], expected ['scale']"),
    bad("sign", "topk stream", foreign("topk:0.05"),
        H0 + "codec CODEC_TOPK is not accepted here; expected CODEC_SIGN"),
    bad_framing("sign", "stream cut short", cut_short, "the stream ended after",
        error=TruncatedStream),
    # qsgd:4 (cga --compressor qsgd:4): 3 level bits + 1 sign bit per element
    bad("qsgd:4", "NaN norm", on(0, params(norm=math.nan)),
        T0 + "qsgd record: parameter norm=nan must be a finite number"),
    bad("qsgd:4", "Inf norm", on(0, params(norm=math.inf)),
        T0 + "qsgd record: parameter norm=inf must be a finite number"),
    bad("qsgd:4", "s not the run's", on(0, params(s=8.0)),
        T0 + "qsgd record: s=8.0, expected 4 (this run compresses with qsgd:4)"),
    bad("qsgd:4", "level above s", on(0, payload(lambda b: bytes([b[0] | 0x07]) + b[1:])),
        T0 + "qsgd levels: a level of 7, above s=4"),
    bad("qsgd:4", "levels one byte short", on(0, payload(lambda b: b[:-1])),
        T0 + f"qsgd levels: {D0 // 2 - 1} bytes, expected {D0 // 2} ({D0} fields of 4 bits)"),
    bad("qsgd:4", "sign stream", foreign("sign"),
        H0 + "codec CODEC_SIGN is not accepted here; expected CODEC_QSGD"),
]


@pytest.mark.parametrize("compressor", list(ALGORITHM))
def test_an_honest_compressed_answer_is_accepted(warm: dict[str, Compressing],
                                                 compressor: str) -> None:
    """The harness: the fake's unedited answer validates, so what fails below is the edit."""
    c = warm[compressor]
    reset(c)
    r = c.node0.round
    before = c.hood.traffic.received.get((1, "cross_gradient"), 0)
    got = c.hood.fetch_cross_gradient(1, r)
    records = c.fake.honest_records(0, r)
    assert {rec.codec for rec in records} == {compressor.partition(":")[0]}
    assert_same(got, [make(compressor).decompress(rec) for rec in records])
    assert_same(got, c.fake.node.cached_cross_gradient(0, r) or [])
    assert c.hood.traffic.received[(1, "cross_gradient")] > before
    assert c.hood.misses.total == 0


@pytest.mark.parametrize("case", CASES, ids=[f"{c.compressor}-{c.name}" for c in CASES])
def test_a_bad_compressed_answer_is_refused_and_changes_nothing(
        warm: dict[str, Compressing], case: Case, caplog: pytest.LogCaptureFixture) -> None:
    c = warm[case.compressor]
    reset(c)
    c.fake.edit_records, c.fake.edit_chunks = case.edit_records, case.edit_chunks
    r = c.node0.round
    before = state_of(c.node0)
    rejected_before = c.rt0.status().rejected_messages

    with pytest.raises(ProtocolError) as info:
        c.hood.fetch_cross_gradient(1, r)
    exc = info.value
    assert type(exc) is case.error, f"{type(exc).__name__}: {exc}"
    assert rpc.status_of(exc) == (case.error, case.code)
    message = str(exc)
    assert message.startswith(prefix(c)), message
    for part in case.says:
        assert part in message, message

    # In a round: left out, counted as rejected (not unavailable), logged with the reason.
    with caplog.at_level(logging.WARNING, logger="peer.client"):
        assert c.hood.cross_gradients(r, [1]) == {}
    misses = c.hood.misses
    assert (misses.rejected, misses.unavailable, misses.by_peer) == (1, 0, {1: 1})
    warnings = [rec.getMessage() for rec in caplog.records if rec.name == "peer.client"]
    assert len(warnings) == 1 and warnings[0].startswith(f"node 0 round {r}: {prefix(c)}")
    assert case.says[0] in warnings[0]
    status = c.rt0.status()
    assert status.rejected_messages == rejected_before + 1
    assert status.missed_neighbor_answers == 1

    assert_state_unchanged(c.node0, before)
    assert_still_serves(c)


# ================================================================================================
# (c) a whole round with a bad compressed answer
# ================================================================================================


@pytest.fixture(scope="module")
def reference(runs: dict[str, Run]) -> dict[str, dict[str, Any]]:
    """Node 0 after round 0 of the compcga (topk) run in memory, with every answer ("honest")
    and without node 1's cross-gradient ("mute"): its parameters and algorithm state."""
    out = {}
    for name, mute in (("honest", ()), ("mute", (1,))):
        node0 = round_in_memory(runs["topk:0.05"], mute=mute)
        out[name] = {"params": clone(node0.params),
                     "algorithm": copy.deepcopy(node0.algorithm.state_dict())}
    assert not equal(out["honest"]["params"], out["mute"]["params"])
    return out


ROUND_CASES = [c for c in CASES if c.compressor == "topk:0.05" and c.name in (
    "index out of range", "repeated index", "NaN value", "unknown codec enum value",
    "byte_length above the payload")]


def test_a_round_with_honest_compressed_answers_matches_the_simulator(
        fresh: Callable[[str], Compressing], reference: dict[str, dict[str, Any]]) -> None:
    c = fresh("topk:0.05")
    record = c.node0.run_round(c.hood)
    assert (record.answered, record.missing, c.hood.misses.total) == ([1, 2], [], 0)
    assert equal(c.node0.params, reference["honest"]["params"])
    assert equal(c.node0.algorithm.state_dict(), reference["honest"]["algorithm"])


@pytest.mark.parametrize("case", ROUND_CASES, ids=[c.name for c in ROUND_CASES])
def test_a_round_with_a_bad_compressed_answer_equals_one_without_it(
        fresh: Callable[[str], Compressing], reference: dict[str, dict[str, Any]],
        case: Case) -> None:
    c = fresh("topk:0.05")
    c.fake.edit_records, c.fake.edit_chunks = case.edit_records, case.edit_chunks
    record = c.node0.run_round(c.hood)
    assert (record.round, c.node0.round) == (0, 1)
    assert (record.answered, record.missing) == ([1, 2], [])  # its model was used, not its answer
    misses = c.hood.misses
    assert (misses.rejected, misses.unavailable, misses.by_peer) == (1, 0, {1: 1})
    assert equal(c.node0.params, reference["mute"]["params"])
    assert equal(c.node0.algorithm.state_dict(), reference["mute"]["algorithm"])
    c.node0.publish()
    assert_still_serves(c)


# ================================================================================================
# (d) node 0 as the server of compressed cross-gradients
# ================================================================================================


def test_refused_requests_leave_the_sender_memories_alone_and_a_retry_compresses_once(
        fresh: Callable[[str], Compressing]) -> None:
    c = fresh("topk:0.05")
    feedback = c.node0.feedback
    assert feedback is not None and len(feedback) == 0
    stub = c.cluster.peer_stub(c.rt0.address)

    def compute(requester: int, round_: int) -> list[tensor_pb2.TensorChunk]:
        return ask(stub, "ComputeCrossGradient", requester, round_, timeout=10)

    for requester, round_, code in ((7, 0, grpc.StatusCode.PERMISSION_DENIED),
                                    (1, 2**40, grpc.StatusCode.INVALID_ARGUMENT)):
        assert rpc_error(functools.partial(compute, requester, round_)).code() == code
    assert len(feedback) == 0 and not c.node0.has_cross_gradient(1, 0)

    first = compute(1, 0)
    memories = feedback.state_dict()
    assert sorted(memories) == [f"1.{i}" for i in range(6)]
    assert compute(1, 0) == first  # the retry gets the same records ...
    assert equal(feedback.state_dict(), memories)  # ... and error feedback ran once
    got = decode(first, specs_of(c.node0.names, c.node0.params), sender_id=0, round_=0,
                 compressor=feedback.compressor)
    assert_same(got.tensors, c.node0.cached_cross_gradient(1, 0) or [])


def test_a_cross_gradient_that_cannot_be_compressed_is_invalid_argument(
        fresh: Callable[[str], Compressing]) -> None:
    """Node 1's model is finite (so it passes GetModel's checks) but so large that its gradient
    on node 0's data is NaN: the compressed answer would be refused by any receiver, so node 0
    refuses the request instead, its memories untouched, and keeps serving."""
    c = fresh("topk:0.05")
    c.fake.model_scale = 1e30
    before = state_of(c.node0)
    stub = c.cluster.peer_stub(c.rt0.address)
    err = rpc_error(lambda: ask(stub, "ComputeCrossGradient", 1, 0, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "error feedback for link 1, tensor 0: the compressed tensor would be refused: " \
           "topk values: NaN or Inf" in (err.details() or "")
    remembered = c.node0.neighbor_model(1, 0)  # the (valid) model it fetched is kept
    assert remembered is not None and all(bool(torch.isfinite(p).all()) for p in remembered)
    before["cached from node 1"] = (True, False)
    assert_state_unchanged(c.node0, before)
    assert c.node0.feedback is not None and len(c.node0.feedback) == 0
    assert_still_serves(c)


# ================================================================================================
# (e) bad compressor specs stop the CLI at start
# ================================================================================================

KNOWN = "known compressors: bf16, fp16, none, qsgd:S, randk:K, sign, topk:K"
SPECS = [
    ("zstd", f"unknown compressor 'zstd'; {KNOWN}"),
    ("topk:0", "topk: k=0.0 must be a fraction in (0, 1) of the elements or an integer count"),
    ("topk:-0.1", "topk: k=-0.1 must be a fraction in (0, 1)"),
    ("randk:0", "randk: k=0.0 must be a fraction in (0, 1)"),
    ("topk:1.5", "topk: k=1.5 must be a fraction in (0, 1) of the elements or an integer count"),
    ("randk:2.5", "randk: k=2.5 must be a fraction in (0, 1)"),
    ("topk", "compressor 'topk' needs k: write topk:K"),
    ("qsgd:0", "qsgd: s=0.0 must be an integer number of levels in [1, 16777215]"),
    ("qsgd:0.5", "qsgd: s=0.5 must be an integer number of levels"),
    ("qsgd:-3", "qsgd: s=-3.0 must be an integer number of levels"),
    ("sign:2", "compressor 'sign' takes no parameter, got sign:2; write sign"),
]


@pytest.mark.parametrize("command", ["simulate", "bootstrap"])
@pytest.mark.parametrize(("spec", "expected"), SPECS, ids=[s for s, _ in SPECS])
def test_a_bad_compressor_stops_the_cli_at_start_with_one_line(
        command: str, spec: str, expected: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """In process (the real `main`): a spec that got through would start a run or a server,
    which the monkeypatches turn into a failure instead of a hang."""
    import bootstrap.server
    from peer import simulate

    def started(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{command} started with --compressor {spec}")

    monkeypatch.setattr(simulate, "run", started)
    monkeypatch.setattr(bootstrap.server, "serve", started)
    where = ["--out", str(tmp_path)] if command == "simulate" else ["--bind", "127.0.0.1:0"]
    assert cli.main([command, "--algorithm", "compcga", "--compressor", spec, *where]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"crossgrad {command}: error: ") and expected in lines[0], err

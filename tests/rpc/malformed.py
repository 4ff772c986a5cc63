"""Hypothesis strategies of malformed requests to every method of crossgrad.v1.Peer and
crossgrad.v1.Bootstrap, as the bytes a client puts on the wire (the fuzz driver, fuzz.py, sends
them). Each `Probe` is one request to one method, made in one of these ways (`Probe.kind`):

    raw         random bytes, short or long
    fields      a well-formed request of the method's type whose every field is drawn from its
                edges: node ids of the run, of its neighbors and just past it, uint32 and uint64
                limits (a negative number as the parser sees it), round numbers around the
                node's and the run's last, NaN, Inf and subnormal doubles, empty, odd and long
                strings (up to 1 MiB), long repeated fields
    utf8        a well-formed request with a string field (or field 1) carrying invalid UTF-8
    overflow    a varint that overflows 64 bits, -1 as ten bytes, a uint32 field given a
                64-bit value, a non-canonical (padded) varint
    unknown     fields the contract does not define, of every wire type, and the invalid ones
                (field 0, wire types 6 and 7, an unmatched end-group)
    truncated   a well-formed request cut short
    flipped     a well-formed request with bytes flipped, inserted or deleted
    wrong-type  a well-formed message of another type (another method's request, a response)
    merged      two well-formed requests of the method's type, concatenated (the parser merges)

The values worth trying depend on the node under test, which the driver learns from it first
(`Known`): its id and neighbors, the run's size, its round and the run's last.

Field values come from the message descriptors, so a field added to a request is fuzzed without
a change here; request fields are scalars today, and a nested message field fails loudly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from crossgrad.v1 import bootstrap_pb2, peer_pb2, tensor_pb2

Code = grpc.StatusCode
PEER = "crossgrad.v1.Peer"
BOOTSTRAP = "crossgrad.v1.Bootstrap"
U32_EDGES = (2**31 - 1, 2**31, 2**32 - 1)
U64_EDGES = (2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1)
LONG = (1 << 10, 1 << 16, 1 << 20)  # characters of a long string, elements of a long list
BAD_UTF8 = (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"ok\x80")
KINDS = ("raw", "fields", "utf8", "overflow", "unknown", "truncated", "flipped", "wrong-type",
         "merged")

# Every caller may meet these: a wrong token or certificate, and its per-caller limits.
_GATE = frozenset({Code.UNAUTHENTICATED, Code.RESOURCE_EXHAUSTED})
# What the servicers answer a request that parses but says nothing valid, or does not parse.
_ANY = _GATE | {Code.OK, Code.INVALID_ARGUMENT}
# peer.proto: a non-neighbor, a stale round, a future one not reached in time, a node starting
# or draining; RESOURCE_EXHAUSTED is also a neighbor over its bytes of the round.
_PEER_STREAM = _ANY | {Code.PERMISSION_DENIED, Code.FAILED_PRECONDITION,
                       Code.DEADLINE_EXCEEDED, Code.UNAVAILABLE}
# bootstrap.proto: another node's id under mutual TLS, a taken id, an id that never joined.
_OWN_ID = _ANY | {Code.PERMISSION_DENIED, Code.NOT_FOUND}


@dataclass(frozen=True)
class Method:
    """One RPC as the fuzzer sees it: where to send, what it takes and answers, and every
    status code its service documents for it (peer.proto, bootstrap.proto, the servicers)."""

    service: str
    name: str
    request: type[Message]
    response: type[Message]  # of each streamed message, for a streaming method
    streams: bool
    answers: frozenset[grpc.StatusCode]
    # It waits by design (a round not published yet, a watch that runs until the caller's
    # deadline), so the driver gives it a short deadline.
    waits: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


METHODS = (
    Method(PEER, "GetModel", peer_pb2.GetModelRequest, tensor_pb2.TensorChunk, True,
           _PEER_STREAM, True),
    Method(PEER, "ComputeCrossGradient", peer_pb2.CrossGradientRequest, tensor_pb2.TensorChunk,
           True, _PEER_STREAM, True),
    Method(PEER, "GetStatus", peer_pb2.GetStatusRequest, peer_pb2.PeerStatus, False, _ANY,
           False),
    # Under replicas and EF21 / CLAG; a node without them answers FAILED_PRECONDITION.
    Method(PEER, "GetModelUpdate", peer_pb2.ModelUpdateRequest, tensor_pb2.TensorChunk, True,
           _PEER_STREAM, True),
    Method(PEER, "GetReplica", peer_pb2.ReplicaRequest, tensor_pb2.TensorChunk, True,
           _PEER_STREAM, True),
    Method(PEER, "GetEstimate", peer_pb2.EstimateRequest, tensor_pb2.TensorChunk, True,
           _PEER_STREAM, True),
    Method(BOOTSTRAP, "Join", bootstrap_pb2.JoinRequest, bootstrap_pb2.JoinResponse, False,
           _ANY | {Code.PERMISSION_DENIED, Code.ALREADY_EXISTS}, False),
    Method(BOOTSTRAP, "Heartbeat", bootstrap_pb2.HeartbeatRequest,
           bootstrap_pb2.HeartbeatResponse, False, _OWN_ID, False),
    Method(BOOTSTRAP, "GetAssignment", bootstrap_pb2.GetAssignmentRequest,
           bootstrap_pb2.Assignment, False,
           _ANY | {Code.NOT_FOUND, Code.FAILED_PRECONDITION}, False),
    # A watch ends when its caller's deadline does, or UNAVAILABLE when the bootstrap stops.
    Method(BOOTSTRAP, "WatchAssignment", bootstrap_pb2.GetAssignmentRequest,
           bootstrap_pb2.Assignment, True,
           _ANY | {Code.NOT_FOUND, Code.DEADLINE_EXCEEDED, Code.UNAVAILABLE}, True),
    Method(BOOTSTRAP, "Leave", bootstrap_pb2.LeaveRequest, bootstrap_pb2.LeaveResponse, False,
           _OWN_ID, False),
    Method(BOOTSTRAP, "ListPeers", bootstrap_pb2.ListPeersRequest,
           bootstrap_pb2.ListPeersResponse, False, _ANY, False),
)
# Messages of the contract whose fields are all scalars: what a wrong-type probe sends.
FLAT_MESSAGES = tuple(
    cls for module in (peer_pb2, bootstrap_pb2, tensor_pb2)
    for cls in (getattr(module, name) for name in module.DESCRIPTOR.message_types_by_name)
    if all(f.type != FieldDescriptor.TYPE_MESSAGE for f in cls.DESCRIPTOR.fields))


@dataclass(frozen=True)
class Known:
    """Values worth trying on the node under test (fuzz.learn asks it for them)."""

    ids: tuple[int, ...]  # its id, its neighbors', every id of the run, the first past it
    rounds: tuple[int, ...]  # 0, around its round, around the run's last


@dataclass(frozen=True)
class Probe:
    method: Method
    kind: str  # one of KINDS
    payload: bytes  # what goes on the wire as the request

    def __str__(self) -> str:
        shown = self.payload[:48].hex() + ("..." if len(self.payload) > 48 else "")
        return f"{self.method.name} {self.kind} ({len(self.payload)} bytes: {shown})"


# ---- the protobuf wire format, written by hand (so that it can be written wrong) ---------------
# peer/compression/bits.pack_varints packs uint64 arrays; these must go past 64 bits.


def varint(n: int) -> bytes:
    """Unsigned LEB128 of any n >= 0, including ones protobuf refuses (over 64 bits)."""
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    return tag(number, 2) + varint(len(payload)) + payload


# ---- field values ------------------------------------------------------------------------------


@st.composite
def _rarely(draw: st.DrawFn, common: st.SearchStrategy[Any],
            rare: st.SearchStrategy[Any]) -> Any:
    """`rare` one time in ten: long values cost time to send, and a few say what they say."""
    return draw(rare if draw(st.integers(0, 9)) == 0 else common)


@st.composite
def _edges(draw: st.DrawFn, known: Sequence[int], limits: Sequence[int], bits: int) -> int:
    """An unsigned value: half the time one the node knows (an id, a round: the values that
    get past the first checks), else a type limit or anything."""
    pick = draw(st.integers(0, 3))
    if pick < 2:
        return draw(st.sampled_from(known))
    return draw(st.sampled_from(limits) if pick == 2 else st.integers(0, 2**bits - 1))


def _strings() -> st.SearchStrategy[str]:
    return _rarely(
        st.one_of(st.text(max_size=24),
                  st.sampled_from(["", " ", "\x00", "127.0.0.1:1", "[::1]:0", "host:-1", "a:b:c",
                                   "done"])),
        st.sampled_from(LONG).map(lambda n: "x" * n))


def field_values(field: FieldDescriptor, known: Known) -> st.SearchStrategy[Any]:
    """The edges of one scalar field of a request (a repeated one: short and long lists)."""
    kind = field.type
    scalar: st.SearchStrategy[Any]
    if kind == FieldDescriptor.TYPE_UINT32:
        scalar = _edges(known.ids, U32_EDGES, 32)
    elif kind == FieldDescriptor.TYPE_UINT64:
        scalar = _edges(known.rounds, U64_EDGES, 64)
    elif kind == FieldDescriptor.TYPE_FIXED64:  # a digest: none, the edges, any
        scalar = st.one_of(st.sampled_from((0, 1, *U64_EDGES)), st.integers(0, 2**64 - 1))
    elif kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_INT32):
        bits = 64 if kind == FieldDescriptor.TYPE_INT64 else 32
        scalar = st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    elif kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        scalar = st.floats(width=64 if kind == FieldDescriptor.TYPE_DOUBLE else 32)
    elif kind == FieldDescriptor.TYPE_BOOL:
        scalar = st.booleans()
    elif kind == FieldDescriptor.TYPE_STRING:
        scalar = _strings()
    elif kind == FieldDescriptor.TYPE_BYTES:
        scalar = st.binary(max_size=64)
    elif kind == FieldDescriptor.TYPE_ENUM:
        scalar = st.integers(-(2**31), 2**31 - 1)  # unknown values too (open enums)
    else:
        raise TypeError(f"{field.full_name}: no fuzz values for protobuf type {kind}; "
                        "add them to malformed.field_values")
    if not field.is_repeated:
        return scalar
    many = st.tuples(st.sampled_from(LONG[:2]), scalar).map(lambda nv: [nv[1]] * nv[0])
    return _rarely(st.lists(scalar, max_size=8), many)


def messages(cls: type[Message], known: Known) -> st.SearchStrategy[bytes]:
    """Well-formed messages of `cls` with every field drawn from its edges, serialized."""
    fields = {f.name: field_values(f, known) for f in cls.DESCRIPTOR.fields}
    return st.fixed_dictionaries(fields).map(lambda values: cls(**values).SerializeToString())


# ---- mutations of a well-formed request (`base`: its strategy) ---------------------------------


def _field_numbers(cls: type[Message], *types: int) -> list[int]:
    return [f.number for f in cls.DESCRIPTOR.fields if not types or f.type in types]


@st.composite
def _bad_utf8(draw: st.DrawFn, cls: type[Message], base: st.SearchStrategy[bytes]) -> bytes:
    numbers = _field_numbers(cls, FieldDescriptor.TYPE_STRING) or [1]
    text = draw(st.sampled_from(BAD_UTF8)) + draw(st.binary(max_size=8))
    return draw(base) + length_delimited(draw(st.sampled_from(numbers)), text)


_OVERFLOWS = st.one_of(
    st.sampled_from([
        varint(2**64), varint(2**70 - 1),  # more than 64 bits: the parser must refuse them
        varint(2**64 - 1),  # -1 as an int64 writes it: ten bytes
        b"\x80" * 10 + b"\x01",  # eleven bytes
        b"\xff" * 9,  # ends inside the varint
        b"\x80\x80\x00",  # 0, padded: legal
    ]),
    st.integers(2**32, 2**64 - 1).map(varint))  # 64 bits for a uint32 field: truncated


@st.composite
def _overflow(draw: st.DrawFn, cls: type[Message], base: st.SearchStrategy[bytes]) -> bytes:
    numbers = _field_numbers(cls, FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64,
                             FieldDescriptor.TYPE_BOOL) or [1]
    return draw(base) + tag(draw(st.sampled_from(numbers)), 0) + draw(_OVERFLOWS)


@st.composite
def _unknown(draw: st.DrawFn, cls: type[Message], base: st.SearchStrategy[bytes]) -> bytes:
    past = max(_field_numbers(cls), default=0) + 1  # the contract's numbers are 1..N
    out = draw(base)
    for _ in range(draw(st.integers(1, 3))):
        number = draw(st.integers(past, 2**29 - 1)
                      | st.sampled_from([0, 19000, 2**29 - 1]))  # 0 is never valid
        wire = draw(st.integers(0, 7))
        if wire == 0:
            out += tag(number, 0) + varint(draw(st.integers(0, 2**64 - 1)))
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            out += tag(number, wire) + draw(st.binary(min_size=size, max_size=size))
        elif wire == 2:
            out += length_delimited(number, draw(st.binary(max_size=32)))
        elif wire == 3:  # a group, closed or not
            out += tag(number, 3) + draw(st.sampled_from([tag(number, 4), b""]))
        else:  # an end-group with no start, and the wire types that do not exist
            out += tag(number, wire) + draw(st.binary(max_size=4))
    return out


@st.composite
def _flipped(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        at = draw(st.integers(0, len(data)))
        if op == "insert" or not data:
            data.insert(at, draw(st.integers(0, 255)))
        elif op == "flip":
            data[at % len(data)] ^= draw(st.integers(1, 255))
        else:
            del data[at % len(data)]
    return bytes(data)


@st.composite
def _truncated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    whole = draw(base)
    return whole[:draw(st.integers(0, max(0, len(whole) - 1)))]


def _payloads(method: Method, known: Known) -> dict[str, st.SearchStrategy[bytes]]:
    """A strategy of payloads for `method` per kind (KINDS)."""
    cls = method.request
    base = messages(cls, known)
    return {
        "raw": _rarely(st.binary(max_size=256), st.sampled_from(LONG).map(lambda n: b"\xff" * n)),
        "fields": base,
        "utf8": _bad_utf8(cls, base),
        "overflow": _overflow(cls, base),
        "unknown": _unknown(cls, base),
        "truncated": _truncated(base),
        "flipped": _flipped(base),
        "wrong-type": st.one_of(*[messages(other, known) for other in FLAT_MESSAGES
                                  if other is not cls]),
        "merged": st.tuples(base, base).map(b"".join),
    }


def probes(methods: Sequence[Method], known: Known) -> st.SearchStrategy[Probe]:
    """One malformed (or merely odd) request to one of `methods`: the method and the kind
    drawn first (a one_of over them all would weigh every branch of a nested one_of alike:
    wrong-type, a one_of of every message type, would take most draws)."""
    table = {method.name: _payloads(method, known) for method in methods}

    @st.composite
    def probe(draw: st.DrawFn) -> Probe:
        method = draw(st.sampled_from(methods))
        kind = draw(st.sampled_from(KINDS))
        return Probe(method, kind, draw(table[method.name][kind]))

    return probe()

"""The Peer service of a real node (peer/servicer.py, peer/client.py) on 127.0.0.1:0.

Server side: a node checks every request (who asks, for which round, how big) and answers the
status code peer.proto documents, without changing its model. Client side: a malicious neighbor
(a real gRPC server streaming hand-made bad tensor streams) is refused with the status
tensor.proto documents, counted, and left out of the round, which then ends exactly as if that
neighbor had not answered (docs/architecture.md, "Faults": a node never crashes, hangs or
corrupts its model because of a peer's message).

Accounting: after real rounds among three runtimes, GetStatus's bytes per link and per message
kind add up to its totals, each link's two ends agree, and the kinds are what the algorithm
sends (no cross-gradients under dpsgd; sign-compressed ones far smaller than models).

Nodes are built as a deployment builds them (peer/builder.py) from one small run: 3 nodes on a
ring, the embedded digits data, CGA. Node 0's neighbors are 1 and 2.
"""

from __future__ import annotations

import copy
import functools
import math
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import grpc
import pytest
import torch

from crossgrad import rpc
from crossgrad.errors import (
    DeadlineExceeded,
    InvalidMessage,
    ProtocolError,
    TooLarge,
    TruncatedStream,
)
from crossgrad.v1 import peer_pb2, peer_pb2_grpc, tensor_pb2
from peer.node import Node, Params
from peer.service import PeerRuntime
from peer.wire import decode, encode, specs_of

from harness import (
    METHODS,
    MIB,
    PEER,
    Cluster,
    FakePeer,
    Open,
    Run,
    Trio,
    ask,
    assert_same,
    clone,
    fetch,
    gather,
    load_run,
    peer_status,
    round_in_memory,
    rpc_error,
)

BIG = 4 * rpc.DEFAULT_MAX_MESSAGE_BYTES  # a limit above the default one
CURRENT_ROUND = 5  # the served node of part (a) has published rounds 0..5 and keeps 2..5


@pytest.fixture(scope="module")
def run3() -> Run:
    run = load_run(3)
    assert run.assigned[0].neighbors == (1, 2)
    return run


def rejected(stub: peer_pb2_grpc.PeerStub) -> int:
    return peer_status(stub).rejected_messages


@pytest.fixture(scope="module")
def dead_address() -> Iterator[str]:
    """An address that refuses connections: a port held bound (so no one else takes it), never
    listened on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


# ================================================================================================
# (a) server side: request checks on a real node
# ================================================================================================


@dataclass
class Served:
    cluster: Cluster
    runtime: PeerRuntime
    node: Node
    params: Params  # copy of the node's parameters before any request
    stub: peer_pb2_grpc.PeerStub
    channel: grpc.Channel


@pytest.fixture(scope="module")
def served(run3: Run, dead_address: str) -> Iterator[Served]:
    """Node 0 serving, at round CURRENT_ROUND (rounds 0..5 published as run_round would, the
    parameters left as they are); its neighbors are unreachable."""
    node = run3.node(0)
    for r in range(CURRENT_ROUND + 1):
        node.round = r
        node.publish()
    with Cluster() as cluster:
        runtime = cluster.runtime(0)
        runtime.attach(node, {1: dead_address, 2: dead_address}, epoch=1)
        channel = cluster.channel(runtime.address)
        yield Served(cluster, runtime, node, clone(node.params), peer_pb2_grpc.PeerStub(channel),
                     channel)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("requester", [7, 0], ids=["unknown node 7", "itself"])
def test_a_requester_that_is_not_a_neighbor_is_permission_denied(
        served: Served, method: str, requester: int) -> None:
    before = rejected(served.stub)
    err = rpc_error(lambda: ask(served.stub, method, requester, CURRENT_ROUND))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    details = err.details() or ""
    assert f"node {requester}" in details
    assert re.search(r"neighbors\D*1\D+2\b", details), details  # names the neighbors
    assert rejected(served.stub) == before + 1


@pytest.mark.parametrize("method", METHODS)
def test_a_node_of_the_run_that_is_not_a_neighbor_is_permission_denied(
        method: str, dead_address: str, cluster: Cluster) -> None:
    """4-node ring: node 0's neighbors are 1 and 3; node 2 is in the run, not a neighbor."""
    run = load_run(4)
    assert run.assigned[0].neighbors == (1, 3)
    node = run.node(0)
    node.publish()
    runtime = cluster.runtime(0)
    runtime.attach(node, {1: dead_address, 3: dead_address}, epoch=1)
    stub = cluster.peer_stub(runtime.address)
    err = rpc_error(lambda: ask(stub, method, 2, 0))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "node 2" in (err.details() or "")
    assert re.search(r"neighbors\D*1\D+3\b", err.details() or "")
    assert type(rpc.from_rpc_error(err, method)).__name__ == "NotANeighbor"
    chunks = ask(stub, "GetModel", 3, 0)  # a neighbor is served
    assert_same(decode(chunks, specs_of(node.names, node.params), sender_id=0,
                       round_=0).tensors, node.params)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("round_", [0, CURRENT_ROUND - 4])
def test_a_stale_round_is_failed_precondition(served: Served, method: str, round_: int) -> None:
    err = rpc_error(lambda: ask(served.stub, method, 1, round_))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = err.details() or ""
    assert f"round {round_}" in details and "stale" in details
    assert type(rpc.from_rpc_error(err, method)).__name__ == "StaleRound"


@pytest.mark.parametrize("round_", range(CURRENT_ROUND - 3, CURRENT_ROUND + 1))
def test_the_kept_rounds_are_served(served: Served, round_: int) -> None:
    chunks = ask(served.stub, "GetModel", 2, round_)
    decoded = decode(chunks, specs_of(served.node.names, served.params), sender_id=0,
                     round_=round_)
    assert_same(decoded.tensors, served.params)


@pytest.mark.parametrize("method", METHODS)
def test_a_round_past_any_run_is_invalid_argument(served: Served, method: str) -> None:
    before = rejected(served.stub)
    err = rpc_error(lambda: ask(served.stub, method, 1, 2**63))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.details() or ""
    assert f"round {2**63}" in details and f"round {CURRENT_ROUND}" in details
    assert rejected(served.stub) == before + 1


@pytest.mark.parametrize("method", METHODS)
def test_a_requester_ahead_is_waited_for_until_its_deadline(served: Served, method: str) -> None:
    """A neighbor two rounds ahead is not refused (that let groups run away from each other):
    the node waits for itself to get there, until the call's deadline; not a rejection."""
    before = rejected(served.stub)
    started = time.monotonic()
    err = rpc_error(lambda: ask(served.stub, method, 1, CURRENT_ROUND + 2, timeout=0.5))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3.0
    assert rejected(served.stub) == before


@pytest.mark.parametrize("method", METHODS)
def test_the_next_round_not_yet_published_is_deadline_exceeded(served: Served,
                                                               method: str) -> None:
    """GetModel waits for the node's own publication; ComputeCrossGradient for the requester's
    model (unreachable here). Either way the call ends at its deadline, not later."""
    started = time.monotonic()
    err = rpc_error(lambda: ask(served.stub, method, 1, CURRENT_ROUND + 1, timeout=0.5))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3.0
    assert served.node.latest_published() == CURRENT_ROUND


def test_get_status_describes_the_node(served: Served) -> None:
    status = peer_status(served.stub, requester="grpcurl")
    assert status.node_id == 0
    assert status.round == CURRENT_ROUND
    assert list(status.neighbor_ids) == [1, 2]
    assert set(status.weights) == {1, 2}
    assert math.isclose(status.self_weight + sum(status.weights.values()), 1.0)
    assert status.topology_epoch == 1
    assert status.state == "TRAINING"
    assert status.address == served.runtime.address


def test_a_request_above_the_receive_limit_is_resource_exhausted(served: Served,
                                                                 channel: Open) -> None:
    assert served.runtime.server is not None
    # The client's own send limit would refuse it first: raise it, so the server is what refuses.
    big = channel(served.runtime.server.address, max_message_bytes=BIG)
    raw = big.unary_unary(f"/{PEER}/GetStatus", request_serializer=None,
                          response_deserializer=None)
    payload = peer_pb2.GetStatusRequest(
        requester="x" * (rpc.DEFAULT_MAX_MESSAGE_BYTES + 1024)).SerializeToString()
    assert len(payload) > rpc.DEFAULT_MAX_MESSAGE_BYTES
    err = rpc_error(lambda: raw(payload, timeout=10))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    small = peer_pb2.GetStatusRequest(requester="x" * 1024).SerializeToString()
    assert peer_pb2.PeerStatus.FromString(raw(small, timeout=5)).node_id == 0


UNDECODABLE = b"\xff\xff\xff"  # not a protobuf message: a truncated varint of field 31


def raw_call(ch: grpc.Channel, method: str) -> Callable[..., object]:
    """`method` of the Peer service taking and giving raw bytes (read to the end)."""
    path = f"/{PEER}/{method}"
    if method == "GetStatus":
        return ch.unary_unary(path, request_serializer=None, response_deserializer=None)
    stream = ch.unary_stream(path, request_serializer=None, response_deserializer=None)
    return lambda request, **kwargs: list(stream(request, **kwargs))


@pytest.mark.parametrize("method", [*METHODS, "GetStatus"])
def test_an_undecodable_request_is_invalid_argument(served: Served, method: str) -> None:
    err = rpc_error(lambda: raw_call(served.channel, method)(UNDECODABLE, timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf message" in (err.details() or "")


def test_a_starting_node_is_unavailable(cluster: Cluster) -> None:
    """Served but not attached (no assignment yet): UNAVAILABLE once its own wait is over."""
    runtime = cluster.runtime(4, timeout=0.2)
    stub = cluster.peer_stub(runtime.address)
    for method in METHODS:
        err = rpc_error(functools.partial(ask, stub, method, 1, 0, timeout=10))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert "node 4" in (err.details() or "")
    status = stub.GetStatus(peer_pb2.GetStatusRequest(), timeout=5)
    assert status.node_id == 4 and status.state == "STARTING"


def test_a_node_restarting_mid_run_answers_at_once(cluster: Cluster) -> None:
    """Asked for a later round (the run is under way: this node is resuming), a node that is
    not ready does not make its neighbor wait out the call's deadline for it."""
    runtime = cluster.runtime(4, timeout=30.0)
    stub = cluster.peer_stub(runtime.address)
    for method in METHODS:
        started = time.monotonic()
        err = rpc_error(functools.partial(ask, stub, method, 1, 40, timeout=30))
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        assert "is starting" in (err.details() or "")
        assert time.monotonic() - started < 15.0  # not the 30 s deadline


def test_the_node_survives_every_bad_request_with_its_model_unchanged(
        served: Served, channel: Open) -> None:
    stub, before = served.stub, rejected(served.stub)
    bad: list[tuple[str, int, int, float, grpc.StatusCode]] = [
        ("GetModel", 7, CURRENT_ROUND, 5.0, grpc.StatusCode.PERMISSION_DENIED),
        ("ComputeCrossGradient", 7, CURRENT_ROUND, 5.0, grpc.StatusCode.PERMISSION_DENIED),
        ("GetModel", 1, 0, 5.0, grpc.StatusCode.FAILED_PRECONDITION),
        ("ComputeCrossGradient", 2, 1, 5.0, grpc.StatusCode.FAILED_PRECONDITION),
        ("GetModel", 2, 2**40, 5.0, grpc.StatusCode.INVALID_ARGUMENT),
        ("ComputeCrossGradient", 1, 2**40, 5.0, grpc.StatusCode.INVALID_ARGUMENT),
        ("GetModel", 1, CURRENT_ROUND + 1, 0.3, grpc.StatusCode.DEADLINE_EXCEEDED),
    ]
    for method, requester, round_, timeout, code in bad:
        err = rpc_error(functools.partial(ask, stub, method, requester, round_, timeout))
        assert err.code() == code, (method, requester, round_, err.details())
    assert served.runtime.server is not None
    big = channel(served.runtime.server.address, max_message_bytes=BIG)
    too_big = b"\x0a" + b"\xff" * (rpc.DEFAULT_MAX_MESSAGE_BYTES + 10)
    err = rpc_error(functools.partial(raw_call(big, "GetModel"), too_big, timeout=10))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for method in (*METHODS, "GetStatus"):  # refused with INVALID_ARGUMENT
        rpc_error(functools.partial(raw_call(served.channel, method), UNDECODABLE, timeout=5))

    assert rejected(stub) >= before + 4  # not a neighbor (2) and past any run (2) at least
    served.cluster.assert_still_serves(served.runtime, round_=CURRENT_ROUND,
                                       params=served.params, requester=1)
    assert_same(served.node.params, served.params)
    assert served.node.round == CURRENT_ROUND
    assert served.node.latest_published() == CURRENT_ROUND


# ================================================================================================
# (b) client side: a malicious neighbor
# ================================================================================================

CHUNK = 4096  # the fake's pieces: the digits MLP (172 KiB) takes ~43 of them


def corrupt(kind: str, names: Sequence[str], tensors: Params, sender: int,
            round_: int) -> list[tensor_pb2.TensorChunk]:
    """The stream a malicious (or broken) node sends instead of `tensors`."""
    tensors = clone(tensors)
    if kind == "NaN":
        tensors[0].view(-1)[3] = math.nan
    if kind == "Inf":
        tensors[-1].view(-1)[0] = math.inf
    chunks = list(encode(names, tensors, sender_id=sender + (kind == "other sender"),
                         round_=round_ + (kind == "other round"), chunk_bytes=CHUNK))
    header = chunks[0].header
    if kind == "wrong shape":  # (128, 64) sent as (64, 128): same byte length
        shape = list(header.tensors[0].shape)
        del header.tensors[0].shape[:]
        header.tensors[0].shape.extend(reversed(shape))
    elif kind == "wrong dtype":
        header.tensors[0].dtype = tensor_pb2.DTYPE_FLOAT64
    elif kind == "wrong byte length":  # consistent total, and the bytes are there too
        header.tensors[1].byte_length += 4
        header.total_bytes += 4
        chunks.append(tensor_pb2.TensorChunk(data=b"\x00" * 4))
    elif kind == "unknown tensor name":
        header.tensors[2].name = "backdoor.weight"
    elif kind == "truncated":
        chunks = chunks[:-2]
    elif kind == "checksum mismatch":
        data = bytearray(chunks[5].data)
        data[100] ^= 0x10
        chunks[5] = tensor_pb2.TensorChunk(data=bytes(data))
    elif kind == "oversized piece":  # above the receiver's message limit
        piece = tensor_pb2.TensorChunk(data=bytes(rpc.DEFAULT_MAX_MESSAGE_BYTES + MIB))
        chunks = [chunks[0], piece]
    return chunks


# kind -> the ProtocolError class fetch_* raises (its rpc.STATUS code is the documented one)
ATTACKS: dict[str, type[ProtocolError]] = {
    "wrong shape": InvalidMessage,
    "wrong dtype": InvalidMessage,
    "wrong byte length": InvalidMessage,
    "unknown tensor name": InvalidMessage,
    "NaN": InvalidMessage,
    "Inf": InvalidMessage,
    "truncated": TruncatedStream,
    "other round": InvalidMessage,
    "other sender": InvalidMessage,
    "oversized piece": TooLarge,
    "checksum mismatch": InvalidMessage,
}
DOCUMENTED = {InvalidMessage: grpc.StatusCode.INVALID_ARGUMENT,
              TruncatedStream: grpc.StatusCode.DATA_LOSS,
              TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED}


class MaliciousPeer(FakePeer):
    """Node 1 as a real gRPC server whose streams are corrupted as `attacks` says per method.

    Honest answers are what node 1 would send (FakePeer's). "stall" sends the header, then
    nothing until the test ends."""

    def __init__(self, node: Node) -> None:
        super().__init__(node)
        self.attacks: dict[str, str] = {}

    def _answer(self, method: str, round_: int,
                tensors: Params) -> Iterator[tensor_pb2.TensorChunk]:
        kind = self.attacks.get(method, "honest")
        chunks = corrupt(kind, self.node.names, tensors, self.node.id, round_)
        if kind == "stall":
            yield chunks[0]
            self.released.wait(30)
            return
        yield from chunks

    def model_stream(self, request: peer_pb2.GetModelRequest,
                     context: grpc.ServicerContext) -> Iterator[tensor_pb2.TensorChunk]:
        return self._answer("GetModel", request.round, self.node.params)

    def cross_gradient_stream(self, request: peer_pb2.CrossGradientRequest,
                              context: grpc.ServicerContext) -> Iterator[tensor_pb2.TensorChunk]:
        grads = self.honest_cross_gradient(request.requester_id, request.round)
        return self._answer("ComputeCrossGradient", request.round, grads)


@pytest.fixture
def trio(run3: Run, cluster: Cluster) -> Trio[MaliciousPeer]:
    """Node 0 under test; node 1 the malicious fake, served with a message limit above the
    default so it can send oversized pieces; node 2 honest."""
    return cluster.trio(run3, MaliciousPeer(run3.node(1)), max_message_bytes=BIG)


@pytest.mark.parametrize("method", METHODS)
def test_an_honest_fake_is_accepted(trio: Trio[MaliciousPeer], method: str) -> None:
    """The harness itself: the fake's honest streams validate, so what fails below is the attack."""
    got = fetch(trio.hood, method, 1)
    node1 = trio.fake.node
    want = node1.params if method == "GetModel" else node1.cross_gradient(
        0, 0, trio.node0.model(0))
    assert_same(got, want)
    assert trio.hood.misses.total == 0


@pytest.mark.parametrize("kind", list(ATTACKS))
@pytest.mark.parametrize("method", METHODS)
def test_a_bad_stream_is_refused_with_the_documented_status(trio: Trio[MaliciousPeer],
                                                            method: str, kind: str) -> None:
    trio.fake.attacks[method] = kind
    cls = ATTACKS[kind]
    with pytest.raises(ProtocolError) as info:
        fetch(trio.hood, method, 1)
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    assert rpc.STATUS[cls] == DOCUMENTED[cls]
    message = str(info.value)
    assert "node 1" in message and "round 0" in message, message
    assert trio.node0.neighbor_model(1, 0) is None  # nothing it sent was kept

    assert gather(trio.hood, method, [1]) == {}
    misses = trio.hood.misses
    assert (misses.rejected, misses.unavailable, misses.by_peer) == (1, 0, {1: 1})
    status = trio.rt0.status()
    assert status.rejected_messages >= 1 and status.missed_neighbor_answers == 1


@pytest.mark.parametrize("method", METHODS)
def test_a_stalled_stream_ends_at_the_deadline_and_counts_as_unavailable(
        trio: Trio[MaliciousPeer], method: str) -> None:
    trio.fake.attacks[method] = "stall"
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        fetch(trio.hood, method, 1, timeout=0.3)
    trio.hood.timeout = 0.3
    assert gather(trio.hood, method, [1]) == {}
    assert time.monotonic() - started < 5.0
    misses = trio.hood.misses
    assert (misses.rejected, misses.unavailable, misses.by_peer) == (0, 1, {1: 1})


@pytest.fixture(scope="module")
def reference(run3: Run) -> dict[str, Params]:
    """Node 0's parameters after round 0 in memory: every neighbor answering ("honest"),
    neighbor 1 giving no model ("GetModel"), neighbor 1 giving its model but no cross-gradient
    ("ComputeCrossGradient")."""
    out: dict[str, Params] = {}
    for name, silent, mute in (("honest", (), ()), ("GetModel", (1,), ()),
                               ("ComputeCrossGradient", (), (1,))):
        out[name] = clone(round_in_memory(run3, silent, mute).params)
    # the comparison below can tell the three apart
    for a, b in (("honest", "GetModel"), ("honest", "ComputeCrossGradient"),
                 ("GetModel", "ComputeCrossGradient")):
        assert not all(torch.equal(x, y) for x, y in zip(out[a], out[b], strict=True))
    return out


def test_a_round_with_an_honest_fake_matches_the_simulator(
        trio: Trio[MaliciousPeer], reference: dict[str, Params]) -> None:
    record = trio.node0.run_round(trio.hood)
    assert (record.answered, record.missing) == ([1, 2], [])
    assert_same(trio.node0.params, reference["honest"])


@pytest.mark.parametrize("kind", list(ATTACKS))
@pytest.mark.parametrize("method", METHODS)
def test_a_round_with_a_malicious_neighbor_equals_one_where_it_did_not_answer(
        trio: Trio[MaliciousPeer], reference: dict[str, Params], method: str, kind: str) -> None:
    start = clone(trio.node0.params)
    trio.fake.attacks[method] = kind
    record = trio.node0.run_round(trio.hood)

    assert record.round == 0 and trio.node0.round == 1
    if method == "GetModel":  # left out of the whole round
        assert (record.answered, record.missing) == ([2], [1])
        assert ("ComputeCrossGradient", 0, 0) not in trio.fake.calls
    else:  # its model was used; its cross-gradient was not
        assert (record.answered, record.missing) == ([1, 2], [])
        assert ("ComputeCrossGradient", 0, 0) in trio.fake.calls
    misses = trio.hood.misses
    assert (misses.rejected, misses.unavailable, misses.by_peer) == (1, 0, {1: 1})
    assert all(bool(torch.isfinite(p).all()) for p in trio.node0.params)
    assert_same(trio.node0.params, reference[method])

    # the honest node keeps serving: the round it did and the one it goes on with
    trio.cluster.assert_still_serves(trio.rt0, round_=0, params=start, requester=2)
    trio.node0.publish()
    trio.cluster.assert_still_serves(trio.rt0, round_=1, requester=2)


def test_the_malicious_neighbor_does_not_disturb_the_honest_one(
        trio: Trio[MaliciousPeer], reference: dict[str, Params]) -> None:
    """Node 2 (honest) served node 0 its model and its cross-gradient through the same round."""
    trio.fake.attacks.update({"GetModel": "NaN", "ComputeCrossGradient": "NaN"})
    before = copy.deepcopy(trio.rt2.traffic.sent)
    trio.node0.run_round(trio.hood)
    sent = trio.rt2.traffic.sent
    assert sent.get((0, "model"), 0) > before.get((0, "model"), 0)
    assert sent.get((0, "cross_gradient"), 0) > before.get((0, "cross_gradient"), 0)
    assert_same(trio.node0.params, reference["GetModel"])


# ================================================================================================
# (c) accounting: bytes per link and per message kind in GetStatus, after real rounds
# ================================================================================================


@dataclass(frozen=True)
class Accounted:
    algorithm: str
    compressor: str
    statuses: dict[int, peer_pb2.PeerStatus]  # by node id, asked over gRPC after the rounds


ACCOUNTED_RUNS = {"dpsgd": dict(algorithm="dpsgd"), "cga": dict(algorithm="cga"),
                  "cga+sign": dict(algorithm="cga", compressor="sign")}


@pytest.fixture(scope="module", params=list(ACCOUNTED_RUNS))
def accounted(request: pytest.FixtureRequest) -> Iterator[Accounted]:
    """Three real runtimes on a ring (everyone a neighbor of everyone) after two rounds each,
    every model and cross-gradient over gRPC; then each one's GetStatus."""
    settings = ACCOUNTED_RUNS[request.param]
    run = load_run(3, **settings)
    nodes = run.nodes()
    with Cluster() as cluster:
        runtimes = cluster.peers(nodes)
        for _ in range(2):
            for node in nodes.values():
                node.publish()
            for i, node in nodes.items():
                hood = runtimes[i].hood
                assert hood is not None
                record = node.run_round(hood)
                assert record.missing == [], record
        statuses = {i: peer_status(cluster.peer_stub(rt.address)) for i, rt in runtimes.items()}
        yield Accounted(run.config.algorithm, run.config.compressor, statuses)


def kind_pairs(kinds: Sequence[peer_pb2.KindBytes]) -> dict[str, tuple[int, int]]:
    return {k.kind: (k.sent_bytes, k.received_bytes) for k in kinds}


def test_bytes_per_kind_and_per_link_add_up_to_the_totals(accounted: Accounted) -> None:
    for i, s in accounted.statuses.items():
        assert [k.kind for k in s.kinds] == ["cross_gradient", "model"], i  # sorted, both
        assert [link.peer_id for link in s.links] == [j for j in range(3) if j != i]
        assert s.bytes_sent == sum(k.sent_bytes for k in s.kinds)
        assert s.bytes_received == sum(k.received_bytes for k in s.kinds)
        assert s.bytes_sent == sum(link.sent_bytes for link in s.links)
        assert s.bytes_received == sum(link.received_bytes for link in s.links)
        for link in s.links:
            assert [k.kind for k in link.kinds] == ["cross_gradient", "model"]
            assert link.sent_bytes == sum(k.sent_bytes for k in link.kinds)
            assert link.received_bytes == sum(k.received_bytes for k in link.kinds)
        for kind, (sent, received) in kind_pairs(s.kinds).items():
            assert sent == sum(kind_pairs(link.kinds)[kind][0] for link in s.links)
            assert received == sum(kind_pairs(link.kinds)[kind][1] for link in s.links)


def test_what_one_end_of_a_link_sent_the_other_received(accounted: Accounted) -> None:
    """Both ends count the same messages the same way, kind by kind (headers included)."""
    links = {(i, link.peer_id): kind_pairs(link.kinds)
             for i, s in accounted.statuses.items() for link in s.links}
    for (i, j), kinds in links.items():
        for kind, (sent, _) in kinds.items():
            assert sent == links[(j, i)][kind][1], (i, j, kind)


def test_models_always_cross_and_cross_gradients_only_for_cga(accounted: Accounted) -> None:
    for s in accounted.statuses.values():
        per_link = {link.peer_id: kind_pairs(link.kinds) for link in s.links}
        for kinds in per_link.values():
            assert min(kinds["model"]) > 0
            if accounted.algorithm == "dpsgd":
                assert kinds["cross_gradient"] == (0, 0)
            else:
                assert min(kinds["cross_gradient"]) > 0


def test_compressed_cross_gradients_cost_far_fewer_bytes_than_models(
        accounted: Accounted) -> None:
    if accounted.algorithm == "dpsgd":
        pytest.skip("dpsgd sends no cross-gradients")
    for s in accounted.statuses.values():
        kinds = kind_pairs(s.kinds)
        ratio = kinds["model"][1] / kinds["cross_gradient"][1]  # bytes received
        if accounted.compressor == "sign":  # 1 bit per value instead of 32, plus headers
            assert ratio > 20, kinds
        else:  # a gradient is as large as the model
            assert 0.95 < ratio < 1.05, kinds

"""Model replicas and EF21 / CLAG estimates over real gRPC (peer/replicas.py,
peer/compression/threepoint.py; docs/algorithms.md, "Compressed models: replicas").

Three runtimes serve on 127.0.0.1 and this test drives their rounds in the simulator's order
(every node's run_round, then every node's finish_round), each node reaching its neighbors over
gRPC only: GetModelUpdate, GetReplica, GetEstimate and ComputeCrossGradient at the server's copy
of the requester's replica. After every round each neighbor's copy equals the owner's replica
bit for bit (round, digest, tensors), and so do both ends' estimates; the models equal the
simulator's. Faults are injected on the server side (a stream refused), and the run then equals
a simulated run with the same message withheld (simulate's `drop`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grpc
import pytest
import torch

from crossgrad.v1 import tensor_pb2
from peer.compression import make as make_compressor
from peer.exporter import PeerCollector
from peer.messages import model_update_raw
from peer.node import Node
from peer.service import PeerRuntime
from peer.servicer import PeerServicer
from peer.simulate import InMemoryNeighborhood, simulate_round
from peer.wire import encode_compressed_raw, encode_raw

from harness import Cluster, FakePeer, Run, load_run

CASES: dict[str, dict[str, Any]] = {
    "cga+topk": dict(algorithm="cga", model_compressor="topk:0.1", consensus_step=0.5),
    "ngc+sign": dict(algorithm="ngc", model_compressor="sign", consensus_step=0.3),
    "compcga+ef21": dict(algorithm="compcga", compressor="topk:0.1", feedback="ef21"),
    "compcga+clag+sign models": dict(algorithm="compcga", compressor="topk:0.1",
                                      feedback="clag:1", model_compressor="sign",
                                      consensus_step=0.5),
}
ROUNDS = 3


def in_memory(run: Run, drop: frozenset[tuple[str, int, int, int]] = frozenset()
              ) -> dict[int, Node]:
    nodes = run.nodes()
    hoods: dict[int, InMemoryNeighborhood] = {}
    hoods.update({i: InMemoryNeighborhood(i, nodes, peers=hoods, drop=drop) for i in nodes})
    ordered = [nodes[i] for i in sorted(nodes)]
    for _ in range(ROUNDS):
        simulate_round(ordered, hoods)
    return nodes


def networked(cluster: Cluster, run: Run, check: bool = True,
              runtimes: dict[int, PeerRuntime] | None = None) -> dict[int, Node]:
    """ROUNDS rounds of `run` over gRPC; `runtimes`, when given, gets the peers' runtimes."""
    nodes = run.nodes()
    started = cluster.peers(nodes)
    if runtimes is not None:
        runtimes.update(started)
    runtimes = started
    for _ in range(ROUNDS):
        for node in nodes.values():
            node.publish()
        for i, node in nodes.items():
            record = node.run_round(hood(runtimes[i]))
            assert record.missing == [], record
        for i, node in nodes.items():
            node.finish_round(hood(runtimes[i]))
        if check:
            assert_both_ends_agree(nodes)
    return nodes


def hood(runtime: PeerRuntime) -> Any:
    assert runtime.hood is not None
    return runtime.hood


def assert_both_ends_agree(nodes: Mapping[int, Node]) -> None:
    """Replicas: every neighbor's copy of x^_i is i's own; estimates: the receiver's h of each
    link equals the sender's, with the same digest."""
    for i, node in nodes.items():
        for l in node.assignment.neighbors:
            other = nodes[l]
            if node.replicas is not None:
                assert other.replicas is not None
                copy, own = other.replicas.latest_copy(i), node.replicas.current
                assert copy is not None
                assert (copy.round, copy.digest) == (own.round, own.digest), (i, l)
                assert_equal(copy.params, own.params)
            if node.threepoint is not None:
                assert other.threepoint is not None
                assert node.threepoint.digest("sent", l) == other.threepoint.digest("received", i)
                for k in range(len(node.params)):
                    sent = node.threepoint.estimate("sent", l, k)
                    got = other.threepoint.estimate("received", i, k)
                    assert sent is not None and got is not None
                    assert torch.equal(sent, got), (i, l, k)


def assert_equal(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> None:
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def assert_same_run(got: Mapping[int, Node], want: Mapping[int, Node]) -> None:
    for i in want:
        assert_equal(got[i].params, want[i].params)
        assert got[i].resyncs == want[i].resyncs, i


@pytest.mark.parametrize("case", list(CASES))
def test_networked_rounds_keep_both_ends_equal_and_equal_the_simulator(
        cluster: Cluster, case: str) -> None:
    run = load_run(3, **CASES[case])
    got = networked(cluster, run)
    assert_same_run(got, in_memory(run))
    assert all(n.resyncs == 0 for n in got.values())


@pytest.fixture
def refuse(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[tuple[str, int, int, int]]]:
    """(method, server, requester, round) streams the server refuses UNAVAILABLE; a
    cross-gradient is computed first (the server's estimates move on), as when a stream breaks
    after the server did its part."""
    refused: set[tuple[str, int, int, int]] = set()
    for method in ("GetModelUpdate", "ComputeCrossGradient"):
        original = getattr(PeerServicer, method)

        def wrapped(self: PeerServicer, request: Any, context: grpc.ServicerContext,
                    original: Any = original, method: str = method) -> Iterator[bytes]:
            key = (method, self.runtime.node_id, request.requester_id, request.round)
            if key not in refused:
                yield from original(self, request, context)
                return
            refused.discard(key)  # once
            for _ in original(self, request, context):
                pass
            context.abort(grpc.StatusCode.UNAVAILABLE, "injected: the stream broke")

        monkeypatch.setattr(PeerServicer, method, wrapped)
    yield refused


def test_a_missed_model_update_is_resynchronised_and_equals_the_simulated_repair(
        cluster: Cluster, refuse: set[tuple[str, int, int, int]]) -> None:
    run = load_run(3, **CASES["cga+topk"])
    refuse.add(("GetModelUpdate", 1, 0, 1))  # node 0 misses node 1's update of round 1
    runtimes: dict[int, PeerRuntime] = {}
    got = networked(cluster, run, runtimes=runtimes)  # both ends agree after every round
    want = in_memory(run, drop=frozenset({("model_update", 0, 1, 1)}))
    assert want[0].resyncs == 1
    assert_same_run(got, want)
    assert not refuse  # the fault happened
    # counted where a person looks: GetStatus and the Prometheus collector
    assert runtimes[0].status().resyncs == 1
    scraped = {s.name: s.value for family in PeerCollector(runtimes[0]).collect()
               for s in family.samples}
    assert scraped["crossgrad_resyncs_total"] == 1


def test_a_missed_cross_gradient_message_resynchronises_the_estimates(
        cluster: Cluster, refuse: set[tuple[str, int, int, int]]) -> None:
    run = load_run(3, **CASES["compcga+ef21"])
    refuse.add(("ComputeCrossGradient", 2, 0, 1))  # node 0 misses node 2's message of round 1
    runtimes: dict[int, PeerRuntime] = {}
    nodes = networked(cluster, run, check=False, runtimes=runtimes)
    assert hood(runtimes[0]).misses.by_peer == {2: 1}  # round 1 went on without it
    assert_both_ends_agree(nodes)  # round 2's message did not apply: a resync did
    want = in_memory(run, drop=frozenset({("cross_gradient", 0, 2, 1)}))
    assert nodes[0].resyncs == want[0].resyncs == 1
    assert_same_run(nodes, want)


# ---- bad model-update streams ----------------------------------------------------------------
def _nan_values(raws: list[bytes], node: Node) -> list[bytes]:
    """The honest update with its first top-k value NaN (CRCs made for the bad bytes)."""
    records, base = node.model_update(0)
    bad = [dataclasses.replace(records[0], payload=b"\x00\x00\xc0\x7f" + records[0].payload[4:]),
           *records[1:]]
    return list(encode_compressed_raw(node.names, bad, sender_id=node.id, round_=0,
                                      base_digest=base))


def _flip(raws: list[bytes], node: Node) -> list[bytes]:
    last = bytearray(raws[-1])
    last[-1] ^= 0xFF
    return [*raws[:-1], bytes(last)]


def _other_codec(raws: list[bytes], node: Node) -> list[bytes]:
    records, base = node.model_update(0)
    signs = [make_compressor("sign").compress(torch.ones(r.shape), seed=0) for r in records]
    return list(encode_compressed_raw(node.names, signs, sender_id=node.id, round_=0,
                                      base_digest=base))


BAD_UPDATES: dict[str, tuple[Callable[[list[bytes], Node], list[bytes]], str]] = {
    "NaN values": (_nan_values, "invalid_answer"),
    "corrupted in transit": (_flip, "invalid_answer"),
    "truncated": (lambda raws, node: raws[:-1], "truncated_answer"),
    "another codec": (_other_codec, "invalid_answer"),
    "another round": (lambda raws, node: list(encode_compressed_raw(
        node.names, node.model_update(0)[0], sender_id=node.id, round_=1,
        base_digest=node.model_update(0)[1])), "invalid_answer"),
}


class BadUpdates(FakePeer):
    """Node 1 after its round 0, serving its update of round 0 as `mangle` makes it, and its
    replicas honestly unless `bad_replica`."""

    def __init__(self, node: Node, mangle: Callable[[list[bytes], Node], list[bytes]],
                 bad_replica: bool = False) -> None:
        super().__init__(node)
        self.mangle = mangle
        self.bad_replica = bad_replica

    def GetModelUpdate(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        raws = list(model_update_raw(self.node, request.round))
        for raw in self.mangle(raws, self.node):
            yield tensor_pb2.TensorChunk.FromString(raw)

    def GetReplica(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        replica = self.node.own_replica(request.round)
        for raw in encode_raw(self.node.names, replica.params, sender_id=self.node.id,
                              round_=request.round,
                              base_digest=0 if self.bad_replica else replica.digest):
            yield tensor_pb2.TensorChunk.FromString(raw)


def after_round_zero() -> dict[int, Node]:
    """Every node after run_round of round 0 (its update published), before finish_round."""
    nodes = load_run(3, **CASES["cga+topk"]).nodes()
    hoods: dict[int, InMemoryNeighborhood] = {}
    hoods.update({i: InMemoryNeighborhood(i, nodes, peers=hoods) for i in nodes})
    for node in nodes.values():
        node.publish()
    for i, node in nodes.items():
        node.run_round(hoods[i])
    return nodes


@pytest.mark.parametrize("case", list(BAD_UPDATES))
def test_a_bad_update_stream_is_refused_and_leaves_the_copy_unchanged(
        cluster: Cluster, case: str) -> None:
    nodes = after_round_zero()
    mangle, reason = BAD_UPDATES[case]
    fake = cluster.fake(BadUpdates(nodes[1], mangle, bad_replica=True))
    honest = cluster.fake(BadUpdates(nodes[2], lambda raws, node: raws))
    hood_ = cluster.neighborhood(nodes[0], {1: fake.address, 2: honest.address})
    assert nodes[0].replicas is not None
    before = nodes[0].replicas.latest_copy(1)
    assert hood_.model_updates(0, [1]) == {}
    assert hood_.misses.rejected_by == {reason: 1}
    assert nodes[0].replicas.latest_copy(1) is before  # not touched
    # the round's second half: the update refused, the resync refused too (a replica without
    # its digest): node 1 is left out of the gossip and node 0's copy stays as it was
    assert nodes[0].finish_round(hood_) == [1]
    assert nodes[0].replicas.latest_copy(1) is before and nodes[0].resyncs == 0


def test_an_update_for_another_replica_is_not_applied_a_resync_is(cluster: Cluster) -> None:
    nodes = after_round_zero()
    def stale(raws: list[bytes], node: Node) -> list[bytes]:
        return list(encode_compressed_raw(node.names, node.model_update(0)[0],
                                          sender_id=node.id, round_=0, base_digest=12345))

    fake = cluster.fake(BadUpdates(nodes[1], stale))
    honest = cluster.fake(BadUpdates(nodes[2], lambda raws, node: raws))
    hood_ = cluster.neighborhood(nodes[0], {1: fake.address, 2: honest.address})
    assert nodes[0].finish_round(hood_) == []
    assert nodes[0].resyncs == 1
    assert nodes[0].replicas is not None and nodes[1].replicas is not None
    copy, own = nodes[0].replicas.latest_copy(1), nodes[1].replicas.current
    assert copy is not None and (copy.round, copy.digest) == (own.round, own.digest) == (
        1, own.digest)
    assert_equal(copy.params, own.params)

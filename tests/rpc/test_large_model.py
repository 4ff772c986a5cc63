"""The receiver's limit on one tensor stream, and where received tensors land (peer/client.py).

Limit: a neighbor whose stream header declares more than the receiver's `max_model_bytes` is
refused at the header (RESOURCE_EXHAUSTED, TooLarge), before any data is read or any tensor
allocated; its stream is cancelled (the sender stops long before it has sent what it declared),
the receiving node's model is untouched and it keeps serving. A node whose own model is above
its limit is a ConfigError at start-up (check_model_fits).

Placement: every received tensor (models, dense and decompressed cross-gradients) leaves
GrpcNeighborhood on the node's device with the node's dtypes, and the CPU buffer it was decoded
into is released. Without a GPU this is shown with a node on torch's "meta" device (a real
device with no storage: anything left on the CPU, or any CPU buffer kept, shows); with one, a
CGA round among three nodes on CUDA runs over real gRPC and matches the CPU run.

Nodes: the 3-node ring of tests/rpc/harness.py (digits data, the digits MLP, CGA).
"""

from __future__ import annotations

import gc
import inspect
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch

import peer.client
from crossgrad import rpc
from crossgrad.errors import ConfigError, TooLarge
from crossgrad.v1 import peer_pb2, tensor_pb2
from peer.client import GrpcNeighborhood, check_model_fits
from peer.node import Node, Params
from peer.service import PeerRuntime
from peer.simulate import InMemoryNeighborhood
from peer.wire import Decoded, decode, encode

from harness import (
    CPU,
    METHODS,
    MIB,
    Cluster,
    FakePeer,
    assert_same,
    clone,
    fetch,
    gather,
    load_run,
)

TIB = 1 << 40
PIECE = tensor_pb2.TensorChunk(data=bytes(MIB))  # one 1 MiB data message


def run_nodes(device: torch.device, compressor: str = "none") -> dict[int, Node]:
    """Nodes 0-2 of the run, fresh, as a deployment builds them (peer/builder.py)."""
    return load_run(3, compressor=compressor).nodes(device)


def model_bytes(node: Node) -> int:
    return sum(p.numel() * p.element_size() for p in node.params)


# ================================================================================================
# the limit
# ================================================================================================


class Boaster(FakePeer):
    """A fake node 1 whose stream headers declare 1 TiB (its real header, total_bytes raised),
    then send 1 MiB data messages for as long as they are taken: it never stops on its own."""

    def __init__(self, node: Node) -> None:
        super().__init__(node)
        self.pieces_sent = 0
        self.done = threading.Event()  # set once its call has ended, for whatever reason

    def boast(self, request: Any,
              context: grpc.ServicerContext) -> Iterator[tensor_pb2.TensorChunk]:
        context.add_callback(self.done.set)
        chunk = next(encode(self.node.names, self.node.params, sender_id=self.node.id,
                            round_=request.round))
        chunk.header.total_bytes = TIB
        yield chunk
        for _ in range(TIB // MIB):
            self.pieces_sent += 1
            yield PIECE

    def model_stream(self, request: peer_pb2.GetModelRequest,
                     context: grpc.ServicerContext) -> Iterator[tensor_pb2.TensorChunk]:
        return self.boast(request, context)

    def cross_gradient_stream(self, request: peer_pb2.CrossGradientRequest,
                              context: grpc.ServicerContext) -> Iterator[tensor_pb2.TensorChunk]:
        return self.boast(request, context)


@dataclass
class Receiver:
    """Node 0 serving (a PeerRuntime) with node 1 a Boaster; node 2 is never asked."""

    cluster: Cluster
    node: Node
    runtime: PeerRuntime
    boaster: Boaster
    params: Params  # node 0's parameters before anything was received

    @property
    def hood(self) -> GrpcNeighborhood:
        assert self.runtime.hood is not None
        return self.runtime.hood


@pytest.fixture
def receiver(cluster: Cluster) -> Receiver:
    nodes = run_nodes(CPU)
    boaster = Boaster(nodes[1])
    fake = cluster.fake(boaster)
    nodes[0].publish()
    runtime = cluster.runtime(0)
    runtime.attach(nodes[0], {1: fake.address, 2: "127.0.0.1:1"}, epoch=1)
    return Receiver(cluster, nodes[0], runtime, boaster, clone(nodes[0].params))


@pytest.mark.parametrize("method", METHODS)
def test_a_stream_declaring_more_than_the_limit_is_refused_at_its_header(
        receiver: Receiver, method: str) -> None:
    with pytest.raises(TooLarge) as info:
        fetch(receiver.hood, method, 1)
    message = str(info.value)
    assert "node 1" in message and "round 0" in message, message  # the sender
    assert f"1.0 TiB ({TIB} bytes)" in message, message  # what it declared
    assert f"8.0 GiB ({rpc.DEFAULT_MAX_MODEL_BYTES} bytes)" in message, message  # the limit
    assert "raise --max-model-bytes on this node" in message, message  # what to do
    assert "\n" not in message
    assert rpc.status_of(info.value)[1] == grpc.StatusCode.RESOURCE_EXHAUSTED

    # The receiver cancelled the call: the sender's stream ended long before the 1 TiB it
    # declared (flow control lets a few MiB through at most).
    assert receiver.boaster.done.wait(10)
    assert receiver.boaster.pieces_sent < 64, receiver.boaster.pieces_sent

    # Nothing it sent was kept; the round leaves it out as a rejected answer.
    assert receiver.node.neighbor_model(1, 0) is None
    assert gather(receiver.hood, method, [1]) == {}
    misses = receiver.hood.misses
    assert (misses.rejected, misses.unavailable, misses.by_peer) == (1, 0, {1: 1})
    assert_same(receiver.node.params, receiver.params)

    # ... and node 0 keeps serving its model.
    receiver.cluster.assert_still_serves(receiver.runtime, round_=0, params=receiver.params,
                                         requester=2)


def test_a_real_model_above_a_lowered_limit_is_refused_with_both_sizes(cluster: Cluster) -> None:
    """An honest neighbor whose model is above this node's (lowered) limit: its real stream is
    refused the same way; at the limit itself it is accepted (the limit is inclusive)."""
    nodes = run_nodes(CPU)
    size = model_bytes(nodes[1])
    nodes[1].publish()
    sender = cluster.runtime(1)
    sender.attach(nodes[1], {}, epoch=1)
    low = cluster.neighborhood(nodes[0], {1: sender.address}, max_model_bytes=size - 1)
    exact = cluster.neighborhood(nodes[0], {1: sender.address}, max_model_bytes=size)
    with pytest.raises(TooLarge) as info:
        low.fetch_model(1, 0)
    message = str(info.value)
    assert f"({size} bytes)" in message and f"({size - 1} bytes)" in message, message
    assert "KiB" in message and "--max-model-bytes" in message, message
    assert_same(exact.fetch_model(1, 0), nodes[1].params)


def test_a_node_whose_own_model_is_above_its_limit_is_a_config_error() -> None:
    node = run_nodes(CPU)[0]
    size = model_bytes(node)
    check_model_fits(node.names, node.params, size)  # exactly at the limit: fine
    with pytest.raises(ConfigError) as info:
        check_model_fits(node.names, node.params, size - 1)
    message = str(info.value)
    assert f"({size} bytes in {len(node.params)} tensors)" in message, message
    assert f"raise --max-model-bytes to at least {size}" in message, message
    for bad in (0, -5):
        with pytest.raises(ConfigError, match="must be positive"):
            check_model_fits(node.names, node.params, bad)
        with pytest.raises(ConfigError, match="must be positive"):
            GrpcNeighborhood(node, {}, timeout=1, max_model_bytes=bad)


def test_the_default_limit_lets_a_2_gb_model_through() -> None:
    assert rpc.DEFAULT_MAX_MODEL_BYTES >= 2 * 10**9
    default = inspect.signature(GrpcNeighborhood).parameters["max_model_bytes"].default
    assert default == rpc.DEFAULT_MAX_MODEL_BYTES


# ================================================================================================
# placement
# ================================================================================================


def spy_on_decode(monkeypatch: pytest.MonkeyPatch) -> list[weakref.ref[torch.Tensor]]:
    """Weak references to every tensor peer.client's decode returns (the CPU buffers)."""
    decoded: list[weakref.ref[torch.Tensor]] = []

    def spy(*args: Any, **kwargs: Any) -> Decoded:
        out = decode(*args, **kwargs)
        decoded.extend(weakref.ref(t) for t in out.tensors)
        return out

    monkeypatch.setattr(peer.client, "decode", spy)
    return decoded


def assert_placed(got: Params, node: Node, device: torch.device) -> None:
    assert [t.device for t in got] == [device] * len(node.params)
    assert [t.dtype for t in got] == [p.dtype for p in node.params]
    assert [t.shape for t in got] == [p.shape for p in node.params]


@pytest.mark.parametrize("compressor", ["none", "sign"])
def test_received_tensors_land_on_the_nodes_device_and_no_cpu_copy_stays(
        monkeypatch: pytest.MonkeyPatch, compressor: str, cluster: Cluster) -> None:
    """Node 0 on the meta device fetches node 1's model and node 1's cross-gradient of node 0's
    model (dense, or sign-compressed and decompressed on receipt) over real gRPC."""
    meta = torch.device("meta")
    cpu_nodes = run_nodes(CPU, compressor=compressor)
    node0 = run_nodes(meta, compressor=compressor)[0]
    node1 = cpu_nodes[1]
    node1.publish()
    # node 1 computes the cross-gradient of node 0's round-0 model (the CPU twin's: the same
    # values), as if it had fetched it: a meta node has no bytes to serve.
    node1.remember_model(0, 0, clone(cpu_nodes[0].params))
    sender = cluster.runtime(1)
    sender.attach(node1, {}, epoch=1)
    hood = cluster.neighborhood(node0, {1: sender.address})
    decoded = spy_on_decode(monkeypatch)
    model = hood.fetch_model(1, 0)
    grads = hood.fetch_cross_gradient(1, 0)
    hood.close()  # the transfer is over: nothing of it may stay alive
    assert node0.trainer.device == meta
    assert_placed(model, node0, meta)
    assert_placed(grads, node0, meta)
    assert node0.neighbor_model(1, 0) is model  # kept for serving, on the device too
    gc.collect()
    assert len(decoded) == 2 * len(node0.params)
    assert all(ref() is None for ref in decoded), "a decoded CPU buffer outlived the transfer"


def test_on_a_cpu_node_received_tensors_are_the_decoded_ones(
        monkeypatch: pytest.MonkeyPatch, cluster: Cluster) -> None:
    """No copy on the CPU: placement returns the decoded tensors themselves."""
    nodes = run_nodes(CPU)
    nodes[1].publish()
    sender = cluster.runtime(1)
    sender.attach(nodes[1], {}, epoch=1)
    hood = cluster.neighborhood(nodes[0], {1: sender.address})
    decoded = spy_on_decode(monkeypatch)
    model = hood.fetch_model(1, 0)
    assert [id(t) for t in model] == [id(ref()) for ref in decoded]
    assert_same(model, nodes[1].params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cga_round_on_cuda_over_grpc_matches_the_cpu_round(cluster: Cluster) -> None:
    """Three nodes on the GPU (as `--device auto` puts them on a GPU host), each served by a
    PeerRuntime: node 0 fetches its neighbors' models and cross-gradients over gRPC and runs a
    CGA round; everything it received is on the GPU, and it ends where the CPU simulator does."""
    cuda = torch.device("cuda")
    nodes = run_nodes(cuda)
    runtimes = cluster.peers(nodes)
    for node in nodes.values():
        node.publish()
    hood = runtimes[0].hood
    assert hood is not None
    model = hood.fetch_model(1, 0)
    grads = hood.fetch_cross_gradient(1, 0)
    assert_placed(model, nodes[0], cuda)
    assert_placed(grads, nodes[0], cuda)
    record = nodes[0].run_round(hood)
    assert (record.answered, record.missing) == ([1, 2], [])
    assert all(p.device.type == "cuda" for p in nodes[0].params)

    cpu = run_nodes(CPU)
    for node in cpu.values():
        node.publish()
    cpu[0].run_round(InMemoryNeighborhood(0, cpu))
    for got, want in zip(nodes[0].params, cpu[0].params, strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)

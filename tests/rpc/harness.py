"""The one harness of the RPC tests (docs/conventions.md, "One of each helper"): real servers
on 127.0.0.1:0, real PeerRuntimes, fake neighbors, and the checks every Peer test makes.

    Cluster               what a test (or a module) starts: servers, peers, fakes, a bootstrap,
                          channels, neighborhoods; a context manager that stops all of them
    Trio                  node 0 under test, node 1 a fake, node 2 honest (Cluster.trio)
    FakePeer              a node as a plain gRPC Peer server, honest until a test scripts it
    ScriptedNeighborhood  in memory, with chosen neighbors silent or mute (reference rounds)
    Run, load_run         the small run of the Peer tests: 3 nodes on a ring, digits, the MLP
    assert_still_serves   health SERVING, GetStatus answers, the model served bit for bit

Security: `Cluster(certs=...)` (crossgrad/certs.py) runs every server, runtime, channel and
neighborhood it makes with mutual TLS, each under the certificate that names it: node I's
runtime, fake and neighborhood as node-I, the bootstrap as itself, a test's channels as the
client certificate unless told another identity; `token=True` makes it TLS with the run's token
instead. Without certificates everything is plaintext, as the in-process tests always were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bootstrap.server import serve as serve_bootstrap
from crossgrad import rpc
from crossgrad.certs import Made
from crossgrad.config import RunConfig
from crossgrad.security import Role, Security, SecurityFlags, load_security, node_server_name
from crossgrad.v1 import bootstrap_pb2_grpc, peer_pb2, peer_pb2_grpc, tensor_pb2
from peer.builder import RunData, assignments, load_run_data, make_node, validate_config
from peer.client import GrpcNeighborhood
from peer.node import Node, Params
from peer.rounds import Assignment
from peer.service import PeerOptions, PeerRuntime
from peer.simulate import InMemoryNeighborhood
from peer.wire import decode, encode, specs_of

PEER = "crossgrad.v1.Peer"
BOOTSTRAP = "crossgrad.v1.Bootstrap"
METHODS = ["GetModel", "ComputeCrossGradient"]  # the two methods that stream tensors
CPU = torch.device("cpu")
MIB = 1 << 20
Serve = Callable[..., rpc.RunningServer]
Open = Callable[..., grpc.Channel]
Chunks = Iterable[tensor_pb2.TensorChunk]

# ================================================================================================
# the run, and exact comparisons of parameter lists ("the node's state is unchanged")
# ================================================================================================

SETTINGS: dict[str, object] = dict(nodes=3, topology="ring", partition="iid", rounds=10,
                                   batch_size=16, device="cpu", dataset="digits")


@dataclass(frozen=True)
class Run:
    """One run's data and assignments: nodes are built fresh (and identical) on demand, as a
    deployment builds them (peer/builder.py)."""

    config: RunConfig
    data: RunData
    assigned: dict[int, Assignment]

    def node(self, i: int, device: torch.device = CPU) -> Node:
        return make_node(self.config, self.data, i, self.assigned[i], device)

    def nodes(self, device: torch.device = CPU) -> dict[int, Node]:
        return {i: self.node(i, device) for i in range(self.config.nodes)}


@functools.cache  # the data set loads once per process; nodes are built fresh each time
def load_run(nodes: int = 3, **overrides: str) -> Run:
    """SETTINGS with `nodes` and `overrides`, validated as the CLI validates a run."""
    settings = {**SETTINGS, "nodes": nodes, **overrides}
    config = validate_config(RunConfig(**settings))  # type: ignore[arg-type]
    _, assigned = assignments(config)
    return Run(config, load_run_data(config), assigned)


def clone(params: Sequence[torch.Tensor]) -> Params:
    return [p.detach().clone() for p in params]


def assert_same(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


class ScriptedNeighborhood(InMemoryNeighborhood):
    """In memory, but `silent` neighbors give no model and `mute` ones no cross-gradient."""

    def __init__(self, me: int, nodes: dict[int, Node], silent: Sequence[int] = (),
                 mute: Sequence[int] = ()) -> None:
        super().__init__(me, nodes)
        self.silent, self.mute = set(silent), set(mute)

    def models(self, round_: int, neighbors: Sequence[int]) -> dict[int, Params]:
        return super().models(round_, [j for j in neighbors if j not in self.silent])

    def cross_gradients(self, round_: int, neighbors: Sequence[int]) -> dict[int, Params]:
        return super().cross_gradients(round_, [j for j in neighbors if j not in self.mute])


def round_in_memory(run: Run, silent: Sequence[int] = (), mute: Sequence[int] = ()) -> Node:
    """Node 0 after round 0 of `run` in memory, its `silent` and `mute` neighbors scripted: what
    a round over gRPC must equal when those neighbors' answers are refused."""
    nodes = run.nodes()
    for node in nodes.values():
        node.publish()
    nodes[0].run_round(ScriptedNeighborhood(0, nodes, silent, mute))
    return nodes[0]


# ================================================================================================
# calls
# ================================================================================================


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    """The RpcError `call` raises (the test fails if it raises none)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def ask(stub: peer_pb2_grpc.PeerStub, method: str, requester: int, round_: int,
        timeout: float = 5.0) -> list[tensor_pb2.TensorChunk]:
    """GetModel or ComputeCrossGradient, read to the end."""
    if method == "GetModel":
        return list(stub.GetModel(peer_pb2.GetModelRequest(requester_id=requester, round=round_),
                                  timeout=timeout))
    request = peer_pb2.CrossGradientRequest(requester_id=requester, round=round_)
    return list(stub.ComputeCrossGradient(request, timeout=timeout))


def peer_status(stub: peer_pb2_grpc.PeerStub, requester: str = "test") -> peer_pb2.PeerStatus:
    return stub.GetStatus(peer_pb2.GetStatusRequest(requester=requester), timeout=5)


def fetch(hood: GrpcNeighborhood, method: str, peer: int, round_: int = 0,
          timeout: float | None = None) -> Params:
    """One neighbor's answer through the client (raises what the client raises)."""
    if method == "GetModel":
        return hood.fetch_model(peer, round_, timeout)
    return hood.fetch_cross_gradient(peer, round_, timeout)


def gather(hood: GrpcNeighborhood, method: str, peers: Sequence[int],
           round_: int = 0) -> dict[int, Params]:
    """The neighbors' answers as a round gathers them (a refused one is left out)."""
    if method == "GetModel":
        return hood.models(round_, peers)
    return hood.cross_gradients(round_, peers)


def peer_service(servicer: peer_pb2_grpc.PeerServicer | None = None) -> rpc.Service:
    """The Peer service of `servicer`; by default the generated base, every method
    UNIMPLEMENTED (enough for health)."""
    impl = servicer or peer_pb2_grpc.PeerServicer()
    return rpc.Service(PEER, lambda s: peer_pb2_grpc.add_PeerServicer_to_server(impl, s))


def bootstrap_service(servicer: bootstrap_pb2_grpc.BootstrapServicer) -> rpc.Service:
    return rpc.Service(BOOTSTRAP, lambda s: bootstrap_pb2_grpc.add_BootstrapServicer_to_server(
        servicer, s))


# ================================================================================================
# fake peers
# ================================================================================================


class FakePeer(peer_pb2_grpc.PeerServicer):
    """`node` as a plain gRPC server. Honest by default: GetModel streams its model, and
    ComputeCrossGradient its real cross-gradient of the requester's model, taken out of band
    from `requesters` (the nodes under test). Subclasses script other answers by overriding
    model_stream / cross_gradient_stream; a stream that stalls waits on `released`, which the
    Cluster sets before it stops anything."""

    def __init__(self, node: Node, chunk_bytes: int = rpc.DEFAULT_CHUNK_BYTES) -> None:
        self.node = node
        self.chunk_bytes = chunk_bytes
        self.requesters: dict[int, Node] = {}
        self.calls: list[tuple[str, int, int]] = []  # (method, requester, round) as received
        self.released = threading.Event()

    def honest_cross_gradient(self, requester: int, round_: int) -> Params:
        return self.node.cross_gradient(requester, round_,
                                        self.requesters[requester].model(round_))

    def model_stream(self, request: peer_pb2.GetModelRequest,
                     context: grpc.ServicerContext) -> Chunks:
        return encode(self.node.names, self.node.params, sender_id=self.node.id,
                      round_=request.round, chunk_bytes=self.chunk_bytes)

    def cross_gradient_stream(self, request: peer_pb2.CrossGradientRequest,
                              context: grpc.ServicerContext) -> Chunks:
        grads = self.honest_cross_gradient(request.requester_id, request.round)
        return encode(self.node.names, grads, sender_id=self.node.id, round_=request.round,
                      chunk_bytes=self.chunk_bytes)

    def GetModel(self, request: peer_pb2.GetModelRequest,
                 context: grpc.ServicerContext) -> Iterator[tensor_pb2.TensorChunk]:
        self.calls.append(("GetModel", request.requester_id, request.round))
        yield from self.model_stream(request, context)

    def ComputeCrossGradient(self, request: peer_pb2.CrossGradientRequest,
                             context: grpc.ServicerContext) -> Iterator[tensor_pb2.TensorChunk]:
        self.calls.append(("ComputeCrossGradient", request.requester_id, request.round))
        yield from self.cross_gradient_stream(request, context)


FakeT = TypeVar("FakeT", bound=FakePeer)


@dataclass
class Trio(Generic[FakeT]):
    """Node 0 (under test) and node 2 (honest) as PeerRuntimes; node 1 is `fake`. On the
    3-node ring every node is a neighbor of the other two."""

    cluster: Cluster
    fake: FakeT
    fake_server: rpc.RunningServer
    node0: Node
    node2: Node
    rt0: PeerRuntime
    rt2: PeerRuntime

    @property
    def hood(self) -> GrpcNeighborhood:
        assert self.rt0.hood is not None
        return self.rt0.hood


# ================================================================================================
# the cluster
# ================================================================================================


class Cluster:
    """Everything one test starts, on 127.0.0.1:0, stopped by close() (or the with block's end)
    whatever the outcome: fakes released first, then the rest in reverse order of start."""

    def __init__(self, certs: Made | None = None, *, token: bool = False) -> None:
        self.certs = certs
        self.token = token
        self._securities: dict[str, Security] = {}
        self._fakes: list[FakePeer] = []
        self._stack = contextlib.ExitStack()

    def security(self, identity: str) -> Security | None:
        """What `identity` ("node-3", "bootstrap", "client") presents and serves with: its
        certificate (with the token in token mode), or None (plaintext) without certificates."""
        if self.certs is None:
            return None
        if identity not in self._securities:
            certs = self.certs
            flags = SecurityFlags(ca=str(certs.ca), cert=str(certs.cert(identity)),
                                  key=str(certs.key(identity)))
            if self.token:
                flags = dataclasses.replace(flags, token_file=str(certs.token),
                                            client_auth="token")
            role = Role.CLIENT if identity == "client" else Role.SERVER
            self._securities[identity] = load_security(flags, role, command="test", environ={})
        return self._securities[identity]

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for fake in self._fakes:
            fake.released.set()
        self._stack.close()

    # ---- servers --------------------------------------------------------------------------
    def serve(self, services: Sequence[rpc.Service], bind: str = "127.0.0.1:0",
              identity: str = "node-0", *, aio: bool = False,
              **kwargs: Any) -> rpc.RunningServer:
        """A server through the one server factory (health NOT_SERVING until set_serving),
        under `identity`'s certificate when the cluster has certificates; `aio`: on grpc.aio
        (make_aio_server, whose servicers are async)."""
        make = rpc.make_aio_server if aio else rpc.make_server
        server = make(bind, services, security=self.security(identity), **kwargs)
        self._stack.callback(server.stop, grace=0)
        return server

    def fake(self, servicer: FakePeer, **kwargs: Any) -> rpc.RunningServer:
        """`servicer` served and SERVING, as its node would be."""
        kwargs.setdefault("identity", f"node-{servicer.node.id}")
        server = self.serve([peer_service(servicer)], **kwargs)
        server.set_serving()
        self._fakes.append(servicer)
        return server

    def bootstrap(self, settings: RunConfig, state: str | Path | None = None,
                  lease_seconds: float = 30.0, bind: str = "127.0.0.1:0",
                  **kwargs: Any) -> rpc.RunningServer:
        """A real bootstrap (bootstrap/server.py), SERVING."""
        server = serve_bootstrap(settings, bind, state, lease_seconds,
                                 security=self.security("bootstrap"), **kwargs)
        self._stack.callback(server.stop, grace=0)
        return server

    # ---- peers ----------------------------------------------------------------------------
    def runtime(self, node_id: int, *, serve: bool = True, timeout: float = 5.0,
                **options: Any) -> PeerRuntime:
        """A PeerRuntime; served (NOT_SERVING until a node is attached) unless `serve` is
        False (runtime.start() serves). With no bootstrap option the test attaches a node."""
        options.setdefault("bootstrap", "unused:1")
        options.setdefault("security", self.security(f"node-{node_id}"))
        runtime = PeerRuntime(PeerOptions(node_id=node_id, bind="127.0.0.1:0", timeout=timeout,
                                          **options))
        self._stack.callback(self._stop_runtime, runtime)
        if serve:
            runtime.serve()
        return runtime

    @staticmethod
    def _stop_runtime(runtime: PeerRuntime) -> None:
        runtime.shutdown(grace=0)
        if runtime.hood is not None:
            runtime.hood.close()

    def peers(self, nodes: Mapping[int, Node], **options: Any) -> dict[int, PeerRuntime]:
        """A runtime per node (PeerOptions `options`), each attached to its assignment's
        neighbors among them."""
        runtimes = {i: self.runtime(i, **options) for i in nodes}
        for i, runtime in runtimes.items():
            runtime.attach(nodes[i], {j: runtimes[j].address
                                      for j in nodes[i].assignment.neighbors}, epoch=1)
        return runtimes

    def trio(self, run: Run, fake: FakeT, **fake_server: Any) -> Trio[FakeT]:
        """Nodes 0 and 2 of `run` as runtimes at round 0 (published), node 1 `fake` (served
        with `fake_server` options); each attached to the other two."""
        server = self.fake(fake, **fake_server)
        node0, node2 = run.node(0), run.node(2)
        node0.publish()
        node2.publish()
        fake.requesters[0] = node0
        rt0, rt2 = self.runtime(0), self.runtime(2)
        rt0.attach(node0, {1: server.address, 2: rt2.address}, epoch=1)
        rt2.attach(node2, {0: rt0.address, 1: server.address}, epoch=1)
        return Trio(self, fake, server, node0, node2, rt0, rt2)

    def neighborhood(self, node: Node, addresses: Mapping[int, str], *, timeout: float = 5.0,
                     **kwargs: Any) -> GrpcNeighborhood:
        """A client of `addresses` for `node`, outside any runtime."""
        kwargs.setdefault("security", self.security(f"node-{node.id}"))
        hood = GrpcNeighborhood(node, addresses, timeout=timeout, **kwargs)
        self._stack.callback(hood.close)
        return hood

    # ---- channels -------------------------------------------------------------------------
    def _channel(self, address: str, identity: str = "client", **kwargs: Any) -> grpc.Channel:
        kwargs.setdefault("security", self.security(identity))
        return rpc.make_channel(address, **kwargs)

    def channel(self, address: str, identity: str = "client", **kwargs: Any) -> grpc.Channel:
        """A channel through the one channel factory, closed with the cluster; with
        certificates it presents `identity`'s (default: the client certificate)."""
        ch = self._channel(address, identity, **kwargs)
        self._stack.callback(ch.close)
        return ch

    def peer_stub(self, address: str, identity: str = "client") -> peer_pb2_grpc.PeerStub:
        return peer_pb2_grpc.PeerStub(self.channel(address, identity))

    def bootstrap_stub(self, address: str,
                       identity: str = "client") -> bootstrap_pb2_grpc.BootstrapStub:
        return bootstrap_pb2_grpc.BootstrapStub(self.channel(address, identity))

    def health_stub(self, address: str, identity: str = "client") -> health_pb2_grpc.HealthStub:
        return health_pb2_grpc.HealthStub(self.channel(address, identity))

    # ---- checks ---------------------------------------------------------------------------
    def assert_still_serves(self, runtime: PeerRuntime, *, round_: int | None = None,
                            params: Sequence[torch.Tensor] | None = None,
                            requester: int | None = None) -> peer_pb2.PeerStatus:
        """On a new channel: health SERVING; GetStatus of this node at its round; GetModel of
        `round_` (default: the node's round) from `requester` (default: its first neighbor)
        bit-identical to `params` (default: the node's parameters). Returns the status."""
        node = runtime.node
        assert node is not None, f"node {runtime.node_id} has no node attached"
        round_ = node.round if round_ is None else round_
        want = node.params if params is None else params
        asker = node.assignment.neighbors[0] if requester is None else requester
        with self._channel(runtime.address, f"node-{asker}",
                           server_name=node_server_name(node.id)) as ch:
            health = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=PEER), timeout=5)
            stub = peer_pb2_grpc.PeerStub(ch)
            status = peer_status(stub)
            chunks = ask(stub, "GetModel", asker, round_)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert (status.node_id, status.round) == (node.id, node.round)
        decoded = decode(chunks, specs_of(node.names, want), sender_id=node.id, round_=round_)
        assert_same(decoded.tensors, want)
        return status

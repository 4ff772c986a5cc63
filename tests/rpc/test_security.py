"""Who may call what, over real TLS (docs/security.md): real servers on 127.0.0.1:0 with
certificates the tests make (crossgrad/certs.py), through the one RPC harness.

A 4-node ring under mutual TLS, each node a PeerRuntime serving under its own certificate: node
0's neighbors are 1 and 3, node 2 is not one. Every refusal comes with its status code, one log
line and a count in GetStatus (`refusals`), and leaves node 0 serving an unchanged model. The
refusals a TLS handshake makes (another CA, no client certificate, a plaintext client) never
become calls: the client sees UNAVAILABLE and grpc logs the failed handshake itself.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from crossgrad.certs import Made, _Issuer, load_ca, make_run_certificates
from crossgrad.guard import RETRY_PUSHBACK_KEY, CallerLimits
from crossgrad.rpc import make_channel
from crossgrad.security import Role, Security, SecurityFlags, load_security, node_server_name
from crossgrad.status import show_status
from crossgrad.v1 import bootstrap_pb2, peer_pb2, peer_pb2_grpc
from peer.service import PeerRuntime

from harness import Cluster, assert_same, clone, load_run, peer_status, rpc_error

NODES = 4
UNAVAILABLE, DENIED = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture
def certs(run_certs: Made) -> Made:
    return run_certs


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Made:
    return make_run_certificates(tmp_path_factory.mktemp("other-ca"), NODES)


@dataclass
class Ring:
    cluster: Cluster
    runtimes: dict[int, PeerRuntime]

    @property
    def node0(self) -> PeerRuntime:
        return self.runtimes[0]

    def stub(self, identity: str = "client", node: int = 0) -> peer_pb2_grpc.PeerStub:
        return peer_pb2_grpc.PeerStub(self.cluster.channel(
            self.runtimes[node].address, identity, server_name=node_server_name(node)))

    def refusals(self) -> dict[str, int]:
        return dict(peer_status(self.stub()).refusals)


def start_ring(cluster: Cluster, **options: object) -> Ring:
    nodes = load_run(NODES).nodes()
    for node in nodes.values():
        node.publish()
    return Ring(cluster, cluster.peers(nodes, **options))


@pytest.fixture
def ring(certs: Made) -> Iterator[Ring]:
    with Cluster(certs) as cluster:
        yield start_ring(cluster)


def get_model(stub: peer_pb2_grpc.PeerStub, requester: int, round_: int = 0) -> list[object]:
    return list(stub.GetModel(peer_pb2.GetModelRequest(requester_id=requester, round=round_),
                              timeout=10))


def cross_gradient(stub: peer_pb2_grpc.PeerStub, requester: int) -> list[object]:
    return list(stub.ComputeCrossGradient(
        peer_pb2.CrossGradientRequest(requester_id=requester, round=0), timeout=10))


def assert_refused(call: object, code: grpc.StatusCode, words: str) -> None:
    err = rpc_error(call)  # type: ignore[arg-type]
    assert err.code() == code, (err.code(), err.details())
    assert words in (err.details() or ""), err.details()


def test_neighbors_fetch_models_and_cross_gradients_under_their_own_certificates(
        ring: Ring) -> None:
    before = clone(ring.node0.node.params)  # type: ignore[union-attr]
    assert get_model(ring.stub("node-1"), requester=1)
    assert cross_gradient(ring.stub("node-3"), requester=3)  # node 0 fetched node 3's model
    assert ring.refusals() == {}
    ring.cluster.assert_still_serves(ring.node0, round_=0, params=before)


def test_a_node_claiming_another_id_is_refused(ring: Ring,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Node 2 presents its own certificate and claims to be node 1 (a neighbor of node 0)."""
    before = clone(ring.node0.node.params)  # type: ignore[union-attr]
    with caplog.at_level(logging.WARNING, logger="crossgrad.guard"):
        assert_refused(lambda: get_model(ring.stub("node-2"), requester=1), DENIED,
                       "requester_id 1 disagrees with the caller's certificate, which names "
                       "node 2")
        assert_refused(lambda: cross_gradient(ring.stub("node-2"), requester=1), DENIED,
                       "names node 2")
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 2, lines
    for line in lines:  # the server, the method, the caller, the code and the reason
        assert line.startswith(f"server at {ring.node0.address} refused /crossgrad.v1.Peer/")
        assert "from node 2 at ipv4:127.0.0.1:" in line and "PERMISSION_DENIED" in line
        assert "disagrees" in line and "b'" not in line
    assert ring.refusals() == {"PERMISSION_DENIED": 2}
    ring.cluster.assert_still_serves(ring.node0, round_=0, params=before)


def test_a_non_neighbor_and_a_person_may_not_fetch(ring: Ring) -> None:
    assert_refused(lambda: get_model(ring.stub("node-2"), requester=2), DENIED,
                   "node 2 is not a neighbor of node 0")
    assert_refused(lambda: cross_gradient(ring.stub("node-2"), requester=2), DENIED,
                   "not a neighbor")
    assert_refused(lambda: get_model(ring.stub("client"), requester=1), DENIED,
                   "client admin is not a node of this run")
    status = peer_status(ring.stub("client"))  # ...but GetStatus is open to any caller let in
    assert status.node_id == 0 and dict(status.refusals) == {"PERMISSION_DENIED": 3}
    shown = show_status(ring.node0.address, security=ring.cluster.security("client"),
                        server_name=node_server_name(0))
    assert "refused calls: PERMISSION_DENIED 3" in shown
    ring.cluster.assert_still_serves(ring.node0, round_=0)


def test_handshakes_refuse_another_ca_no_certificate_and_plaintext(
        ring: Ring, certs: Made, other_ca: Made) -> None:
    before = clone(ring.node0.node.params)  # type: ignore[union-attr]
    address = ring.node0.address
    strangers = {
        "another CA": load_security(SecurityFlags(ca=str(certs.ca),
                                                  cert=str(other_ca.cert("node-1")),
                                                  key=str(other_ca.key("node-1"))),
                                    Role.CLIENT, command="test", environ={}),
        "no client certificate": load_security(SecurityFlags(ca=str(certs.ca)), Role.CLIENT,
                                               command="test", environ={}),
        "plaintext": Security.plaintext(),
    }
    for what, security in strangers.items():
        with make_channel(address, security=security) as channel:
            err = rpc_error(lambda ch=channel: get_model(peer_pb2_grpc.PeerStub(ch), 1))
        assert err.code() == UNAVAILABLE, (what, err.code(), err.details())
    # and the server's certificate is checked too: node 1's is not node 0's
    with make_channel(address, security=ring.cluster.security("node-1"),
                      server_name=node_server_name(1)) as channel:
        err = rpc_error(lambda: get_model(peer_pb2_grpc.PeerStub(channel), 1))
    assert err.code() == UNAVAILABLE, err.details()
    assert ring.refusals() == {}  # none of them became a call
    ring.cluster.assert_still_serves(ring.node0, round_=0, params=before)


def test_a_certificate_of_the_ca_that_names_no_crossgrad_identity_is_unauthenticated(
        ring: Ring, certs: Made, tmp_path: Path) -> None:
    ca_cert, ca_key = load_ca(certs.ca, certs.key("ca"))
    _Issuer(ca_cert, ca_key, 1, ())("stranger", "https://example.org/someone", [], tmp_path,
                                    server=False)
    security = load_security(SecurityFlags(ca=str(certs.ca),
                                           cert=str(tmp_path / "stranger.pem"),
                                           key=str(tmp_path / "stranger.key")),
                             Role.CLIENT, command="test", environ={})
    with make_channel(ring.node0.address, security=security) as channel:
        stub = peer_pb2_grpc.PeerStub(channel)
        assert_refused(lambda: peer_status(stub), UNAUTHENTICATED,
                       "is not a crossgrad identity")
        assert_refused(lambda: get_model(stub, 1), UNAUTHENTICATED, "crossgrad://node/ID")
    assert ring.refusals() == {"UNAUTHENTICATED": 2}


def test_the_bootstrap_acts_only_on_the_callers_own_id(certs: Made) -> None:
    """The eviction of the issue: Leave for node 3 from anyone but node 3 is refused."""
    config = load_run(NODES).config
    with Cluster(certs) as cluster:
        boot = cluster.bootstrap(config)
        for i in range(NODES):
            cluster.bootstrap_stub(boot.address, f"node-{i}").Join(
                bootstrap_pb2.JoinRequest(node_id=i, address=f"127.0.0.1:{9000 + i}",
                                          num_samples=10), timeout=10)
        as_node1 = cluster.bootstrap_stub(boot.address, "node-1")
        as_client = cluster.bootstrap_stub(boot.address, "client")
        for stub, who in ((as_node1, "node 1"), (as_client, "client admin")):
            assert_refused(lambda s=stub: s.Leave(bootstrap_pb2.LeaveRequest(
                node_id=3, reason="x"), timeout=10), DENIED, f"refused: {who} may leave only")
        assert_refused(lambda: as_node1.Heartbeat(bootstrap_pb2.HeartbeatRequest(
            node_id=3, round=5), timeout=10), DENIED, "Heartbeat for node 3 refused")
        assert_refused(lambda: as_node1.Join(bootstrap_pb2.JoinRequest(
            node_id=3, address="127.0.0.1:1", num_samples=1), timeout=10), DENIED,
            "Join for node 3 refused")
        listed = as_client.ListPeers(bootstrap_pb2.ListPeersRequest(), timeout=10)
        assert {p.node_id: p.state for p in listed.peers}[3] == "ACTIVE"
        assert {p.node_id: p.address for p in listed.peers}[3] == "127.0.0.1:9003"
        assert dict(listed.refusals) == {"PERMISSION_DENIED": 4}
        own = cluster.bootstrap_stub(boot.address, "node-3").Heartbeat(
            bootstrap_pb2.HeartbeatRequest(node_id=3, round=1), timeout=10)
        assert own.topology_epoch >= 1


def test_token_mode_refuses_a_wrong_or_missing_token(certs: Made, tmp_path: Path) -> None:
    with Cluster(certs, token=True) as cluster:
        ring = start_ring(cluster)
        assert get_model(ring.stub("node-1"), requester=1)  # the token, over TLS
        wrong = tmp_path / "wrong"
        wrong.write_text("x" * 43 + "\n")
        strangers = {
            "missing token": load_security(SecurityFlags(ca=str(certs.ca)), Role.CLIENT,
                                           command="test", environ={}),
            "wrong token": load_security(SecurityFlags(ca=str(certs.ca), token_file=str(wrong)),
                                         Role.CLIENT, command="test", environ={}),
        }
        for security in strangers.values():
            with make_channel(ring.node0.address, security=security) as channel:
                stub = peer_pb2_grpc.PeerStub(channel)
                assert_refused(lambda s=stub: get_model(s, 1), UNAUTHENTICATED,
                               "missing or wrong token")
                health = channel.unary_unary(  # health stays open
                    "/grpc.health.v1.Health/Check")(b"", timeout=10)
                assert health == b"\x08\x01"  # SERVING
        assert ring.refusals() == {"UNAUTHENTICATED": 2}
        cluster.assert_still_serves(ring.node0, round_=0)


def test_limits_per_caller_answer_resource_exhausted_with_a_retry_hint(certs: Made) -> None:
    with Cluster(certs) as cluster:
        ring = start_ring(cluster, limits=CallerLimits(streams=1, rate=5.0, burst=5),
                          bytes_per_round=1)
        before = clone(ring.node0.node.params)  # type: ignore[union-attr]
        stub = ring.stub("node-1")
        assert get_model(stub, requester=1)  # the round's bytes: taken by this one
        assert_refused(lambda: get_model(stub, 1), EXHAUSTED, "its limit per round")
        # one stream at a time: one waits for round 1, which node 0 has not published
        waiting = stub.GetModel(peer_pb2.GetModelRequest(requester_id=1, round=1), timeout=30)
        started = threading.Event()

        def hold() -> None:
            started.set()
            with contextlib.suppress(grpc.RpcError):  # cancelled below
                list(waiting)

        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        started.wait()
        err = None
        for _ in range(3):  # rate: 5 calls, and the stream may not have reached the server
            err = rpc_error(lambda: get_model(stub, 1, round_=0))
            if "streams" in (err.details() or "") or "per second" in (err.details() or ""):
                break
        assert err is not None and err.code() == EXHAUSTED, err.details()
        pushback = dict(err.trailing_metadata() or ()).get(RETRY_PUSHBACK_KEY)
        assert pushback is not None and int(pushback) > 0
        waiting.cancel()
        holder.join(timeout=30)
        exhausted = ring.refusals().get("RESOURCE_EXHAUSTED", 0)
        assert exhausted >= 2
        # a neighbor under its limits is not refused: node 3 has its own allowance
        assert get_model(ring.stub("node-3"), requester=3)
        assert_same(ring.node0.node.params, before)  # type: ignore[union-attr]

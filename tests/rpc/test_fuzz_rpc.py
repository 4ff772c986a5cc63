"""Fuzzing a live node and a live bootstrap (issue #9): malformed requests from the fuzz driver
(fuzz.py, malformed.py) to every method of crossgrad.v1.Peer and crossgrad.v1.Bootstrap. Every
answer is a status code its method documents, back within its deadline; afterwards node 0 serves
the same model bit for bit, and the bootstrap lists the real peers as before.

The setting (`start`): node 0 of a 4-node ring of PeerRuntimes at round 0, with the run's
settings (last round 10) as a deployed node has them, and a bootstrap with nodes 0-3 joined (the
run is assembled). Limits are generous, so that the limiter does not answer for the servicers:
calls per second, and the bytes of a round a neighbor may take (the fuzzer asks for the same
round thousands of times).

  test_ten_thousand...  the peer in plaintext: requester ids are claims there, so every id the
                        fuzzer draws (neighbors, non-neighbors, ids past the run) reaches the
                        servicer's checks, not only the certificate's. The bootstrap under
                        mutual TLS, the fuzzer presenting node 3's certificate: Join, Heartbeat
                        and Leave for node 3 reach the registry (the fuzzer may leave, come back,
                        move node 3, report neighbors unreachable), the same calls for nodes 0-2
                        are refused. Without mutual TLS ids are claims, and a fuzzed Leave would
                        rightly evict a real peer.
  test_the_command...   the driver as a program, everything under mutual TLS as node 3.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from crossgrad.certs import Made
from crossgrad.guard import CallerLimits
from crossgrad.security import node_server_name
from crossgrad.v1 import bootstrap_pb2, bootstrap_pb2_grpc
from peer.node import Params
from peer.service import PeerRuntime

from fuzz import fuzz
from harness import Cluster, clone, load_run
from malformed import BOOTSTRAP, KINDS, METHODS, PEER
from procs import ProcessGroup

log = logging.getLogger(__name__)

NODES = 4
FUZZER = f"node-{NODES - 1}"  # the identity the fuzzer presents under mutual TLS
FUZZ_COUNT = 10_000
GENEROUS = CallerLimits(streams=64, rate=1e6, burst=1_000_000)


@pytest.fixture
def certs(run_certs: Made) -> Made:
    return run_certs


@dataclass
class Target:
    """What the fuzzer is let loose on, and what must not change."""

    node0: PeerRuntime
    bootstrap: str  # its address
    admin: bootstrap_pb2_grpc.BootstrapStub
    params: Params  # node 0's, before
    peers: dict[int, tuple[object, ...]]  # the real peers, before

    def real_peers(self) -> dict[int, tuple[object, ...]]:
        """Nodes 0-2 as ListPeers shows them, less what moves by itself (last seen) or may move
        by node 3's own right (the unreachable reports its heartbeats make)."""
        listed = self.admin.ListPeers(bootstrap_pb2.ListPeersRequest(), timeout=10)
        for i in range(NODES):  # and each still gets its assignment (bootstrap/registry.py)
            assert self.admin.GetAssignment(bootstrap_pb2.GetAssignmentRequest(node_id=i),
                                            timeout=10).node_id == i
        return {p.node_id: (p.address, p.num_samples, p.state, p.round, repr(p.loss),
                            p.returns, p.resumes) for p in listed.peers if p.node_id != NODES - 1}


def start(peers: Cluster, boot: Cluster, **settings: Any) -> Target:
    """The ring on `peers`, the bootstrap on `boot`, each node joined under its own identity;
    `settings` of the run (load_run)."""
    run = load_run(NODES, **settings)
    nodes = run.nodes()
    for node in nodes.values():
        node.publish()
    runtimes = peers.peers(nodes, limits=GENEROUS, bytes_per_round=1 << 50)
    for runtime in runtimes.values():
        runtime.settings = run.config
    server = boot.bootstrap(run.config, lease_seconds=3600, limits=GENEROUS)
    for i, runtime in runtimes.items():
        boot.bootstrap_stub(server.address, f"node-{i}").Join(bootstrap_pb2.JoinRequest(
            node_id=i, address=runtime.address, num_samples=100 + i), timeout=10)
    target = Target(runtimes[0], server.address, boot.bootstrap_stub(server.address),
                    clone(nodes[0].params), {})
    target.peers = target.real_peers()
    return target


@pytest.fixture
def clusters(certs: Made) -> Iterator[tuple[Cluster, Cluster]]:
    with Cluster() as plain, Cluster(certs) as tls:
        yield plain, tls


def test_ten_thousand_malformed_requests_get_documented_answers_and_change_nothing(
        clusters: tuple[Cluster, Cluster]) -> None:
    plain, tls = clusters
    target = start(plain, tls)
    report = fuzz({PEER: plain.channel(target.node0.address),
                   BOOTSTRAP: tls.channel(target.bootstrap, FUZZER)}, FUZZ_COUNT, seed_=0)
    log.info("fuzz: %s", report.table())

    assert report.sent == FUZZ_COUNT
    assert report.failed == 0, report.table()
    codes = {method: {code for m, code in report.codes if m == method}
             for method in (m.name for m in METHODS)}
    assert set(report.kinds) == set(KINDS) and all(codes.values()), report.table()
    # The fuzz got past the parser: the servicers' own refusals came back, and valid calls were
    # served (by the registry too: node 3 left, heartbeat once gone, came back, was refused a
    # second address).
    for method in ("GetModel", "ComputeCrossGradient"):
        assert {"OK", "INVALID_ARGUMENT", "PERMISSION_DENIED", "DEADLINE_EXCEEDED"} <= \
            codes[method], report.table()
    assert {"OK", "ALREADY_EXISTS", "PERMISSION_DENIED"} <= codes["Join"], report.table()
    assert {"NOT_FOUND", "PERMISSION_DENIED"} <= codes["Heartbeat"], report.table()
    assert {"OK", "PERMISSION_DENIED"} <= codes["Leave"], report.table()
    # Nothing said node 0 is starting or draining, or that a caller is unknown.
    peer_codes = set().union(*(codes[m.name] for m in METHODS if m.service == PEER))
    assert not peer_codes & {"UNAVAILABLE", "UNAUTHENTICATED"}, report.table()
    assert not any("UNAUTHENTICATED" in c for c in codes.values()), report.table()

    plain.assert_still_serves(target.node0, round_=0, params=target.params)
    assert target.real_peers() == target.peers


def test_malformed_requests_to_a_node_with_replicas_and_estimates_change_nothing(
        clusters: tuple[Cluster, Cluster]) -> None:
    """The methods of model replicas and EF21 estimates, served for real (a node that runs
    them), fuzzed: documented answers only, and its model, replica and copies unchanged."""
    plain, tls = clusters
    target = start(plain, tls, algorithm="compcga", compressor="topk:0.1", feedback="ef21",
                   model_compressor="sign", consensus_step=0.5)
    node = target.node0.node
    assert node is not None and node.replicas is not None
    replicas = node.replicas

    def state() -> list[tuple[int, int, list[torch.Tensor]]]:
        """The replica and the copies, by value: a request naming another digest makes the
        node resynchronise its copy from that very neighbor, which changes no value."""
        held = [replicas.current, *(replicas.latest_copy(j) for j in node.assignment.neighbors)]
        return [(r.round, r.digest, list(r.params)) for r in held if r is not None]

    before = state()
    report = fuzz({PEER: plain.channel(target.node0.address)}, 1500, seed_=2)
    log.info("fuzz: %s", report.table())
    assert report.failed == 0, report.table()
    codes = {method: {code for m, code in report.codes if m == method}
             for method in ("GetModelUpdate", "GetReplica", "GetEstimate")}
    assert "OK" in codes["GetReplica"] and all(codes.values()), report.table()
    after = state()
    assert [(r, d) for r, d, _ in after] == [(r, d) for r, d, _ in before]
    assert all(torch.equal(x, y) for (_, _, xs), (_, _, ys) in zip(after, before, strict=True)
               for x, y in zip(xs, ys, strict=True))
    plain.assert_still_serves(target.node0, round_=0, params=target.params)


def test_the_command_line_driver_under_mutual_tls(certs: Made, procs: ProcessGroup) -> None:
    with Cluster(certs) as cluster:
        target = start(cluster, cluster)
        run = procs.run([sys.executable, "tests/rpc/fuzz.py", "--peer", target.node0.address,
                         "--bootstrap", target.bootstrap, "--count", "300", "--seed", "1",
                         "--tls-ca", str(certs.ca), "--tls-cert", str(certs.cert(FUZZER)),
                         "--tls-key", str(certs.key(FUZZER)),
                         "--peer-server-name", node_server_name(0)], timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "300 requests in" in run.stdout and "0 failures" in run.stdout, run.stdout
        # as node 3, a neighbor of node 0: its requests got past the certificate check
        assert "GetModel" in run.stdout
        cluster.assert_still_serves(target.node0, round_=0, params=target.params)
        assert target.real_peers() == target.peers

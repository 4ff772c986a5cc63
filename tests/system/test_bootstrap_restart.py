"""A bootstrap killed with SIGKILL and started again with the same --state keeps the run.

The real `crossgrad bootstrap` in a process of its own (its own session, its process group killed
on every outcome), and fake peers: real BootstrapStub clients heartbeating from threads, with
backoff and jitter while the bootstrap is unreachable, as docs/deployment.md asks of a peer.
While the bootstrap is down for two leases nobody can heartbeat; started again, it gives every
peer one lease from its restart, so none expires for the bootstrap's own downtime. Then a peer
that really stops is expired after one lease, its neighbors get the repaired graph, and it comes
back when it heartbeats again.

Waits are on what the fake peers saw (one condition, notified at every heartbeat attempt), never
blind sleeps; the only timers are the heartbeat period and the backoff of the fake peers.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bootstrap.topology import build_topology, metropolis_hastings_weights, repair
from crossgrad.config import RunConfig
from crossgrad.rpc import channel_options, make_channel
from crossgrad.v1 import bootstrap_pb2 as pb
from crossgrad.v1 import bootstrap_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
NODES = 4  # a ring of 4: losing node 2 makes 1 and 3 neighbors (a bypass edge), 3 would not
LEASE = 3.0
INTERVAL = LEASE / 6  # heartbeat period of the fake peers
BACKOFF = (0.05, LEASE / 6)  # first retry delay and cap, before jitter (x 0.5..1)
START_TIMEOUT = 90.0  # a process start (the CLI imports torch: ~10 s on a loaded machine)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Beats:
    """What the fake peers saw, under one condition that every heartbeat attempt notifies."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.ok = dict.fromkeys(range(NODES), 0)  # successful heartbeats
        self.failing_since: dict[int, float | None] = dict.fromkeys(range(NODES))  # monotonic
        self.epoch = dict.fromkeys(range(NODES), 0)  # the last epoch answered
        self.epochs_seen: set[int] = set()

    def record(self, node_id: int, epoch: int | None) -> None:
        with self.cond:
            if epoch is None:
                if self.failing_since[node_id] is None:
                    self.failing_since[node_id] = time.monotonic()
            else:
                self.ok[node_id] += 1
                self.failing_since[node_id] = None
                self.epoch[node_id] = epoch
                self.epochs_seen.add(epoch)
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), (
                f"timed out after {timeout:g} s waiting for {what}; peers saw epochs "
                f"{self.epoch}, ok {self.ok}, failing since {self.failing_since}")


def bootstrap_channel(address: str) -> grpc.Channel:
    """crossgrad's channel arguments, with gRPC's reconnect backoff capped like the retries.

    gRPC's own backoff between connection attempts grows by 1.6x up to 120 s, so after a
    bootstrap outage of some 15 s the next attempt can come more than a lease after the restart
    (seen here: 5.7 s after a 17 s outage), and the peer expires. A peer's channel to the
    bootstrap must be back within one lease of its restart; so is this one.
    """
    return grpc.insecure_channel(address, options=[
        *channel_options(),
        ("grpc.initial_reconnect_backoff_ms", int(BACKOFF[0] * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(BACKOFF[1] * 1000)),
    ])


class FakePeer(threading.Thread):
    """Heartbeats node_id every INTERVAL while `beating` is set; a failed call is retried after
    an exponential backoff with jitter, capped well below the lease."""

    def __init__(self, node_id: int, address: str, beats: Beats) -> None:
        super().__init__(name=f"fake-peer-{node_id}", daemon=True)
        self.node_id, self.address, self.beats = node_id, address, beats
        self.beating = threading.Event()
        self.beating.set()
        self.stopped = threading.Event()
        self.rng = random.Random(node_id)

    def run(self) -> None:
        failures, round_ = 0, 0
        channel = bootstrap_channel(self.address)
        try:
            while not self.stopped.is_set():
                if not self.beating.is_set():
                    self.stopped.wait(INTERVAL)
                    continue
                try:
                    reply = bootstrap_pb2_grpc.BootstrapStub(channel).Heartbeat(
                        pb.HeartbeatRequest(node_id=self.node_id, round=round_, loss=0.5,
                                            health="ok"), timeout=2 * INTERVAL)
                except grpc.RpcError:
                    self.beats.record(self.node_id, None)
                    failures += 1
                    delay = min(BACKOFF[1], BACKOFF[0] * 2**failures) * self.rng.uniform(0.5, 1)
                else:
                    self.beats.record(self.node_id, reply.topology_epoch)
                    failures, round_, delay = 0, round_ + 1, INTERVAL
                self.stopped.wait(delay)
        finally:
            channel.close()


class BootstrapProcess:
    """`crossgrad bootstrap` on a fixed port and state file, startable again after a kill."""

    def __init__(self, port: int, state: Path, logs: Path) -> None:
        self.address = f"127.0.0.1:{port}"
        self.state, self.logs = state, logs
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = self.logs / f"bootstrap-{self.starts}.log"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "crossgrad", "--log-level", "INFO", "bootstrap",
                 "--nodes", str(NODES), "--topology", "ring", "--partition", "iid",
                 "--bind", self.address, "--state", str(self.state),
                 "--lease-seconds", str(LEASE), "--insecure"],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        with make_channel(self.address) as channel:  # SERVING once the registry is open
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="crossgrad.v1.Bootstrap"),
                timeout=START_TIMEOUT, wait_for_ready=True)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, log.read_text()

    def kill(self) -> None:
        """SIGKILL the whole process group and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)


@pytest.fixture
def bootstrap(tmp_path: Path) -> Iterator[BootstrapProcess]:
    process = BootstrapProcess(free_port(), tmp_path / "bootstrap.sqlite", tmp_path)
    try:
        yield process
    finally:
        process.kill()


@pytest.fixture
def beats() -> Beats:
    return Beats()


@pytest.fixture
def fake_peers(bootstrap: BootstrapProcess, beats: Beats) -> Iterator[list[FakePeer]]:
    peers = [FakePeer(i, bootstrap.address, beats) for i in range(NODES)]
    try:
        yield peers
    finally:
        for peer in peers:
            peer.stopped.set()
        for peer in peers:
            peer.join(timeout=10)


def list_peers(address: str) -> pb.ListPeersResponse:
    with make_channel(address) as channel:
        reply: pb.ListPeersResponse = bootstrap_pb2_grpc.BootstrapStub(channel).ListPeers(
            pb.ListPeersRequest(), timeout=10)
    return reply


def assignment(address: str, node_id: int) -> pb.Assignment:
    with make_channel(address) as channel:
        reply: pb.Assignment = bootstrap_pb2_grpc.BootstrapStub(channel).GetAssignment(
            pb.GetAssignmentRequest(node_id=node_id), timeout=10)
    return reply


def mixing_row(address: str, node_id: int) -> np.ndarray:
    """(NODES,) the row of the mixing matrix the bootstrap hands node_id."""
    reply = assignment(address, node_id)
    row = np.zeros(NODES)
    row[node_id] = reply.self_weight
    for neighbor in reply.neighbors:
        row[neighbor.node_id] = neighbor.weight
    return row


def expected_weights(dead: list[int]) -> np.ndarray:
    """(NODES, NODES) MH weights of the ring repaired around `dead`."""
    live = np.array([i not in dead for i in range(NODES)])
    ring = build_topology("ring", NODES, RunConfig().seed)
    return metropolis_hastings_weights(repair(ring, live))


@pytest.mark.slow
def test_a_killed_bootstrap_restarts_with_the_run_and_expires_only_real_deaths(
        bootstrap: BootstrapProcess, beats: Beats, fake_peers: list[FakePeer]) -> None:
    bootstrap.start()
    with make_channel(bootstrap.address) as channel:
        stub = bootstrap_pb2_grpc.BootstrapStub(channel)
        for i in range(NODES):
            joined = stub.Join(pb.JoinRequest(node_id=i, address=f"127.0.0.1:{7000 + i}",
                                              num_samples=100), timeout=10)
    assert joined.ready
    for peer in fake_peers:
        peer.start()
    beats.wait(lambda: min(beats.ok.values()) >= 1, 10 * LEASE, "a heartbeat from every peer")

    # Down for two leases: every peer fails to reach it for that long.
    bootstrap.kill()
    beats.wait(lambda: all(since is not None and time.monotonic() - since >= 2 * LEASE
                           for since in beats.failing_since.values()),
               10 * LEASE, "two leases of failed heartbeats at every peer")
    bootstrap.start()
    beats.wait(lambda: all(since is None for since in beats.failing_since.values()),
               2 * LEASE, "every peer's heartbeat after the restart")

    listing = list_peers(bootstrap.address)
    assert listing.topology_epoch == 1
    assert [(p.node_id, p.state, p.returns) for p in listing.peers] == [
        (i, "ACTIVE", 0) for i in range(NODES)]
    assert beats.epochs_seen == {1}, "no epoch change while or after the bootstrap was down"

    # Node 2 really stops: expired after one lease; 1 and 3 now bypass it.
    fake_peers[2].beating.clear()
    stopped_at = time.monotonic()
    beats.wait(lambda: beats.epoch[1] == beats.epoch[3] == 2, 4 * LEASE,
               "the epoch after node 2's lease ran out")
    took = time.monotonic() - stopped_at
    # Its last beat came at most one period (plus scheduling) before it stopped.
    assert took >= LEASE - 2 * INTERVAL, f"node 2 expired {took:.2f} s after it stopped"
    listing = list_peers(bootstrap.address)
    assert listing.topology_epoch == 2
    assert [p.state for p in listing.peers] == ["ACTIVE", "ACTIVE", "EXPIRED", "ACTIVE"]
    assert [n.node_id for n in assignment(bootstrap.address, 1).neighbors] == [0, 3]
    weights = np.stack([mixing_row(bootstrap.address, i) for i in range(NODES)])
    np.testing.assert_allclose(weights, expected_weights(dead=[2]), atol=1e-12)

    # It heartbeats again: back in, original edges restored.
    fake_peers[2].beating.set()
    beats.wait(lambda: beats.epoch[2] == beats.epoch[1] == 3, 4 * LEASE, "node 2's return")
    listing = list_peers(bootstrap.address)
    assert listing.topology_epoch == 3
    assert [(p.state, p.returns) for p in listing.peers] == [
        ("ACTIVE", 0), ("ACTIVE", 0), ("ACTIVE", 1), ("ACTIVE", 0)]
    assert [n.node_id for n in assignment(bootstrap.address, 1).neighbors] == [0, 2]
    weights = np.stack([mixing_row(bootstrap.address, i) for i in range(NODES)])
    np.testing.assert_allclose(weights, expected_weights(dead=[]), atol=1e-12)

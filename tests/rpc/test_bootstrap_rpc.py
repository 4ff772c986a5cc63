"""The Bootstrap service over real gRPC: a server from bootstrap/server.py on 127.0.0.1:0, real
stubs over crossgrad.rpc.make_channel, every bad request answered with its exact status code.

No sleeps: streams are consumed in a thread into a queue, read with a timeout (a wait for the
server's own state polls it, `until`).

The last part is what grpc.aio (crossgrad.rpc.make_aio_server, bootstrap/servicer.py) changes:
the gate of crossgrad/guard.py refuses, counts and logs there as on the peers' servers (the
decisions are shared; only `await context.abort` differs); the stream limit; watches end with
UNAVAILABLE when the server stops (opened before assembly too), end their coroutine when the
client goes away, and hear of an epoch bump the registry's reaper thread made, off the loop.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from bootstrap.convert import (
    SETTINGS_FIELDS,
    assignment_from_proto,
    settings_from_proto,
    settings_to_proto,
)
from bootstrap.registry import LOCAL_FIELDS
from bootstrap.server import SPARE_STREAMS, STREAMS_PER_NODE, BootstrapServer
from bootstrap.servicer import BEATS_BURST, BEATS_PER_SECOND
from crossgrad.certs import Made
from crossgrad.config import RunConfig
from crossgrad.errors import ConfigError, InvalidMessage
from crossgrad.guard import RETRY_PUSHBACK_KEY, CallerLimits
from crossgrad.rpc import DEFAULT_MAX_MESSAGE_BYTES, ERROR_CLASS_KEY, RunningServer, make_channel
from crossgrad.security import Role, SecurityFlags, load_security
from crossgrad.status import format_peers
from crossgrad.v1 import bootstrap_pb2 as pb
from crossgrad.v1 import bootstrap_pb2_grpc
from peer.session import HeartbeatStream

from harness import BOOTSTRAP, Cluster, bootstrap_service, rpc_error

SETTINGS = RunConfig(nodes=3, topology="ring", algorithm="ngc", rounds=40, lr=0.05, seed=7)
TIMEOUT = 5.0  # deadline of every call, and the longest wait for a streamed message


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "bootstrap.sqlite"


@pytest.fixture
def server(state: Path, cluster: Cluster) -> RunningServer:
    return cluster.bootstrap(SETTINGS, state=str(state), lease_seconds=30.0)


@pytest.fixture
def stub(server: RunningServer, cluster: Cluster) -> bootstrap_pb2_grpc.BootstrapStub:
    return cluster.bootstrap_stub(server.address)


def join(stub: bootstrap_pb2_grpc.BootstrapStub, node_id: int,
         address: str | None = None) -> pb.JoinResponse:
    request = pb.JoinRequest(node_id=node_id, address=address or f"127.0.0.1:{7000 + node_id}",
                             num_samples=100)
    response: pb.JoinResponse = stub.Join(request, timeout=TIMEOUT)
    return response


class Watch:
    """A WatchAssignment stream drained by a thread into a queue."""

    def __init__(self, stub: bootstrap_pb2_grpc.BootstrapStub, node_id: int) -> None:
        self.call = stub.WatchAssignment(pb.GetAssignmentRequest(node_id=node_id), timeout=30)
        self.items: queue.Queue[pb.Assignment | grpc.RpcError | None] = queue.Queue()
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        try:
            for message in self.call:
                self.items.put(message)
            self.items.put(None)
        except grpc.RpcError as err:
            self.items.put(err)

    def next(self) -> pb.Assignment | grpc.RpcError | None:
        return self.items.get(timeout=TIMEOUT)

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(timeout=TIMEOUT)


def neighbor_ids(assignment: pb.Assignment) -> list[int]:
    return [n.node_id for n in assignment.neighbors]


# ---- the contract's conversions ----


def test_run_settings_carry_every_shared_field_and_round_trip() -> None:
    assert set(SETTINGS_FIELDS) | set(LOCAL_FIELDS) == {
        f.name for f in dataclasses.fields(RunConfig)}
    assert settings_from_proto(settings_to_proto(SETTINGS)) == SETTINGS
    with pytest.raises(InvalidMessage, match="no settings"):
        settings_from_proto(pb.RunSettings())


def test_a_peer_rejects_an_assignment_whose_weights_do_not_sum_to_one() -> None:
    bad = pb.Assignment(node_id=0, neighbors=[pb.Neighbor(node_id=1, weight=0.7)],
                        self_weight=0.7, settings=settings_to_proto(SETTINGS))
    with pytest.raises(InvalidMessage, match="sum to 1"):
        assignment_from_proto(bad)


# ---- the run ----


def test_health_is_serving(server: RunningServer, cluster: Cluster) -> None:
    answer = cluster.health_stub(server.address).Check(
        health_pb2.HealthCheckRequest(service=BOOTSTRAP), timeout=TIMEOUT)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_peers_join_then_get_neighbors_heartbeat_and_list(
        stub: bootstrap_pb2_grpc.BootstrapStub) -> None:
    first = join(stub, 0)
    assert (first.ready, first.joined, first.expected) == (False, 1, 3)
    assert first.settings == settings_to_proto(SETTINGS)
    join(stub, 1)
    err = rpc_error(lambda: stub.GetAssignment(pb.GetAssignmentRequest(node_id=0),
                                               timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "waiting for peers: 2 of 3 joined" in err.details()
    assert join(stub, 2).ready

    assignment = stub.GetAssignment(pb.GetAssignmentRequest(node_id=0), timeout=TIMEOUT)
    view = assignment_from_proto(assignment)
    assert view.epoch == 1 and view.settings == SETTINGS
    assert [(j, a) for j, a, _ in view.neighbors] == [(1, "127.0.0.1:7001"),
                                                      (2, "127.0.0.1:7002")]
    assert [w for _, _, w in view.neighbors] == pytest.approx([1 / 3, 1 / 3])
    assert view.self_weight == pytest.approx(1 / 3)

    beat = stub.Heartbeat(pb.HeartbeatRequest(node_id=1, round=4, loss=0.5, health="ok"),
                          timeout=TIMEOUT)
    assert (beat.topology_epoch, beat.lease_seconds) == (1, 30.0)
    listing = stub.ListPeers(pb.ListPeersRequest(), timeout=TIMEOUT)
    assert (listing.expected, listing.topology_epoch) == (3, 1)
    assert [(p.node_id, p.state) for p in listing.peers] == [(i, "ACTIVE") for i in range(3)]
    assert (listing.peers[1].round, listing.peers[1].loss) == (4, 0.5)
    assert all(p.last_seen_seconds_ago >= 0 for p in listing.peers)


def test_leave_bumps_the_epoch_and_neighbors_lose_the_peer(
        stub: bootstrap_pb2_grpc.BootstrapStub) -> None:
    for i in range(3):
        join(stub, i)
    stub.Leave(pb.LeaveRequest(node_id=2, reason="draining"), timeout=TIMEOUT)
    beat = stub.Heartbeat(pb.HeartbeatRequest(node_id=0, round=1), timeout=TIMEOUT)
    assert beat.topology_epoch == 2
    assignment = stub.GetAssignment(pb.GetAssignmentRequest(node_id=0), timeout=TIMEOUT)
    assert neighbor_ids(assignment) == [1]
    assert assignment.neighbors[0].weight == pytest.approx(0.5)
    assert assignment.self_weight == pytest.approx(0.5)
    states = [p.state for p in stub.ListPeers(pb.ListPeersRequest(), timeout=TIMEOUT).peers]
    assert states == ["ACTIVE", "ACTIVE", "LEFT"]


def test_watch_delivers_the_first_assignment_and_each_change(
        stub: bootstrap_pb2_grpc.BootstrapStub) -> None:
    join(stub, 0)
    watch = Watch(stub, 0)
    try:
        join(stub, 1)
        join(stub, 2)
        first = watch.next()
        assert isinstance(first, pb.Assignment)
        assert (first.topology_epoch, neighbor_ids(first)) == (1, [1, 2])
        stub.Leave(pb.LeaveRequest(node_id=1, reason="draining"), timeout=TIMEOUT)
        second = watch.next()
        assert isinstance(second, pb.Assignment)
        assert (second.topology_epoch, neighbor_ids(second)) == (2, [2])
        assert watch.items.empty()
    finally:
        watch.close()


def test_a_heartbeat_naming_an_old_epoch_gets_the_new_assignment(
        stub: bootstrap_pb2_grpc.BootstrapStub) -> None:
    def beat(node_id: int, **held: int) -> pb.HeartbeatResponse:
        answer: pb.HeartbeatResponse = stub.Heartbeat(
            pb.HeartbeatRequest(node_id=node_id, **held), timeout=TIMEOUT)
        return answer

    join(stub, 0)
    join(stub, 1)
    assert not beat(0, assignment_epoch=0).HasField("assignment")  # not assembled: none yet
    join(stub, 2)
    first = beat(0, assignment_epoch=0)  # assembled at epoch 1; it holds none
    assert (first.topology_epoch, first.assignment.topology_epoch,
            neighbor_ids(first.assignment)) == (1, 1, [1, 2])
    assert not beat(0, assignment_epoch=1).HasField("assignment")  # it holds the current one
    stub.Leave(pb.LeaveRequest(node_id=1, reason="draining"), timeout=TIMEOUT)
    assert not beat(0).HasField("assignment")  # it did not say: it fetches them itself
    moved = beat(0, assignment_epoch=1)
    assert (moved.topology_epoch, moved.assignment.topology_epoch,
            neighbor_ids(moved.assignment)) == (2, 2, [2])
    assert assignment_from_proto(moved.assignment).self_weight == pytest.approx(0.5)


def test_the_heartbeats_stream_answers_each_heartbeat_as_the_call_does(
        stub: bootstrap_pb2_grpc.BootstrapStub) -> None:
    """One open Heartbeats call, as peers heartbeat (peer.session.HeartbeatStream): each
    message renews, reports and is answered like a Heartbeat call; the first request the call
    would refuse ends the stream with that call's status."""
    join(stub, 0)
    join(stub, 1)
    beats = HeartbeatStream(stub)
    try:
        def send(**fields: Any) -> pb.HeartbeatResponse:
            return beats.send(pb.HeartbeatRequest(**fields), TIMEOUT)

        assert not send(node_id=0, assignment_epoch=0).HasField("assignment")  # not assembled
        join(stub, 2)
        first = send(node_id=0, assignment_epoch=0)
        assert (first.topology_epoch, first.lease_seconds, neighbor_ids(first.assignment)) == (
            1, 30.0, [1, 2])
        assert not send(node_id=0, assignment_epoch=1).HasField("assignment")
        stub.Leave(pb.LeaveRequest(node_id=1, reason="draining"), timeout=TIMEOUT)
        moved = send(node_id=0, assignment_epoch=1, round=7, loss=0.25, health="ok")
        assert (moved.topology_epoch, neighbor_ids(moved.assignment)) == (2, [2])
        listed = stub.ListPeers(pb.ListPeersRequest(), timeout=TIMEOUT)
        assert [(p.round, p.loss, p.state) for p in listed.peers if p.node_id == 0] == [
            (7, 0.25, "ACTIVE")]
        gone = rpc_error(lambda: send(node_id=1))  # it left: NOT_FOUND, as the call says
        assert gone.code() == grpc.StatusCode.NOT_FOUND
        assert "node 1 left the run" in (gone.details() or "")
    finally:
        beats.close()
    beats = HeartbeatStream(stub)  # a new stream after the failed one
    try:
        bad = rpc_error(lambda: beats.send(pb.HeartbeatRequest(node_id=99), TIMEOUT))
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        beats.close()


def test_a_heartbeats_stream_over_its_rate_ends_with_resource_exhausted(
        server: RunningServer, stub: bootstrap_pb2_grpc.BootstrapStub) -> None:
    """A caller that sends heartbeats faster than a peer ever does: the stream's own limit
    (BEATS_BURST at once, BEATS_PER_SECOND after), refused, with a retry hint, and counted."""
    join(stub, 0)
    flood = [pb.HeartbeatRequest(node_id=0, round=i) for i in range(BEATS_BURST + 5)]
    answers: list[pb.HeartbeatResponse] = []
    logged = Logged("crossgrad.guard")  # the count comes with the log line (grpc.aio: after)
    logging.getLogger("crossgrad.guard").addHandler(logged)
    try:
        err = rpc_error(lambda: answers.extend(stub.Heartbeats(iter(flood), timeout=TIMEOUT)))
        assert logged.seen.wait(TIMEOUT), "no log line for the refusal"
    finally:
        logging.getLogger("crossgrad.guard").removeHandler(logged)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert f"over {BEATS_PER_SECOND:g} heartbeats a second on one stream" in (err.details() or "")
    assert BEATS_BURST <= len(answers) < len(flood)
    pushback = dict(err.trailing_metadata() or ()).get(RETRY_PUSHBACK_KEY)
    assert pushback is not None and int(pushback) > 0
    assert server.refusals.snapshot() == {"RESOURCE_EXHAUSTED": 1}


def test_a_malformed_message_on_the_heartbeats_stream_is_invalid_argument(
        server: RunningServer) -> None:
    with make_channel(server.address) as channel:
        raw = channel.stream_stream(f"/{BOOTSTRAP}/Heartbeats")  # bytes as they are
        err = rpc_error(lambda: list(raw(iter([b"\xff\xff\xff"]), timeout=TIMEOUT)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "not a valid protobuf message" in (err.details() or "")


def test_a_stopping_server_ends_heartbeats_streams_with_unavailable(
        server: RunningServer, stub: bootstrap_pb2_grpc.BootstrapStub) -> None:
    """Ended by the stop itself, not cut when its grace runs out: the status says so."""
    join(stub, 0)
    beats = HeartbeatStream(stub)
    try:
        assert beats.send(pb.HeartbeatRequest(node_id=0), TIMEOUT).lease_seconds == 30.0
        server.stop(grace=TIMEOUT)
        end = rpc_error(lambda: beats.send(pb.HeartbeatRequest(node_id=0), TIMEOUT))
        assert end.code() == grpc.StatusCode.UNAVAILABLE
        assert "the bootstrap is stopping; heartbeat again once it is back" in (
            end.details() or "")
    finally:
        beats.close()


def test_a_watch_hears_only_of_changes_to_its_own_assignment(cluster: Cluster,
                                                              tmp_path: Path) -> None:
    """A 5-ring: node 4 leaves and comes back. Node 0 borders it and hears of both epochs;
    node 2 keeps its neighbors and weights (every degree stays 2) and hears of neither."""
    server = cluster.bootstrap(RunConfig(nodes=5, topology="ring"),
                               state=str(tmp_path / "bootstrap.sqlite"), lease_seconds=30.0)
    stub = cluster.bootstrap_stub(server.address)
    for i in range(5):
        join(stub, i)
    bordering, apart = Watch(stub, 0), Watch(stub, 2)
    try:
        for watch in (bordering, apart):
            first = watch.next()
            assert isinstance(first, pb.Assignment) and first.topology_epoch == 1
        stub.Leave(pb.LeaveRequest(node_id=4, reason="draining"), timeout=TIMEOUT)
        join(stub, 4)
        changes = [bordering.next(), bordering.next()]
        assert [(a.topology_epoch, neighbor_ids(a)) for a in changes
                if isinstance(a, pb.Assignment)] == [(2, [1, 3]), (3, [1, 4])]
        assert bordering.items.empty() and apart.items.empty()  # woken together: none coming
        assert stub.Heartbeat(pb.HeartbeatRequest(node_id=2), timeout=TIMEOUT).topology_epoch == 3
    finally:
        bordering.close()
        apart.close()


def test_a_stopping_server_ends_watches_with_unavailable(server: RunningServer,
                                                         stub: bootstrap_pb2_grpc.BootstrapStub
                                                         ) -> None:
    for i in range(3):
        join(stub, i)
    watch = Watch(stub, 2)
    assert isinstance(watch.next(), pb.Assignment)
    server.stop(grace=TIMEOUT)
    end = watch.next()
    assert isinstance(end, grpc.RpcError)
    assert end.code() == grpc.StatusCode.UNAVAILABLE
    watch.close()


def test_returns_resumes_and_reports_reach_list_peers_and_the_status_table(
        stub: bootstrap_pb2_grpc.BootstrapStub) -> None:
    for i in range(3):
        join(stub, i)
    stub.Join(pb.JoinRequest(node_id=1, address="127.0.0.1:7001", num_samples=100, resumed=True,
                             checkpoint_round=12), timeout=TIMEOUT)
    # Reports of ids outside the run, or of itself, are skipped: the heartbeat still succeeds.
    beat = stub.Heartbeat(pb.HeartbeatRequest(node_id=0, round=13,
                                              unreachable_neighbors=[2, 0, 99, 2**32 - 1]),
                          timeout=TIMEOUT)
    assert beat.topology_epoch == 1
    stub.Heartbeat(pb.HeartbeatRequest(node_id=1, round=13, unreachable_neighbors=[2]),
                   timeout=TIMEOUT)
    stub.Leave(pb.LeaveRequest(node_id=2, reason="draining"), timeout=TIMEOUT)
    join(stub, 2)
    listing = stub.ListPeers(pb.ListPeersRequest(), timeout=TIMEOUT)
    assert [(p.returns, p.resumes, p.unreachable_reports) for p in listing.peers] == [
        (0, 0, 0), (0, 1, 0), (1, 0, 2)]
    assert listing.topology_epoch == 3

    lines = format_peers(listing).splitlines()
    assert lines[0].startswith("bootstrap: 3 of 3 peers (0 dead, 0 left), topology epoch 3")
    assert lines[1].split() == ["id", "address", "state", "samples", "round", "loss", "seen",
                                "returns", "resumes", "unreachable"]
    rows = {int(line.split()[0]): line.split() for line in lines[2:5]}
    assert [(r[2], r[-3:]) for r in rows.values()] == [
        ("ACTIVE", ["0", "0", "0"]), ("ACTIVE", ["0", "1", "0"]), ("ACTIVE", ["1", "0", "2"])]
    assert lines[5].strip().startswith("dead: lease expired;") and len(lines) == 6


def test_the_status_table_marks_expired_peers_dead(state: Path, cluster: Cluster) -> None:
    running = cluster.bootstrap(SETTINGS, state=str(state), lease_seconds=0.2)
    stub = cluster.bootstrap_stub(running.address)
    for i in range(3):
        join(stub, i)
    # The reaper expires all three within a lease; wait on the epoch it bumps.
    assert isinstance(running, BootstrapServer)
    running.registry.wait_for_change(1, timeout=TIMEOUT)
    listing = stub.ListPeers(pb.ListPeersRequest(), timeout=TIMEOUT)
    assert {p.state for p in listing.peers} == {"EXPIRED"}
    lines = format_peers(listing).splitlines()
    assert "(3 dead, 0 left)" in lines[0]
    assert [line.split()[2] for line in lines[2:5]] == ["dead"] * 3


# ---- bad requests, exact codes ----


def test_bad_requests_get_their_exact_status(stub: bootstrap_pb2_grpc.BootstrapStub) -> None:
    join(stub, 0)
    cases: list[tuple[Callable[[], Any], grpc.StatusCode, str]] = [
        (lambda: join(stub, 3), grpc.StatusCode.INVALID_ARGUMENT, "0..2"),
        (lambda: stub.Join(pb.JoinRequest(node_id=1, address=""), timeout=TIMEOUT),
         grpc.StatusCode.INVALID_ARGUMENT, "empty address"),
        (lambda: join(stub, 0, "10.9.9.9:1"), grpc.StatusCode.ALREADY_EXISTS,
         "held by a live peer at 127.0.0.1:7000"),
        (lambda: stub.Heartbeat(pb.HeartbeatRequest(node_id=1), timeout=TIMEOUT),
         grpc.StatusCode.NOT_FOUND, "never joined"),
        (lambda: stub.GetAssignment(pb.GetAssignmentRequest(node_id=2), timeout=TIMEOUT),
         grpc.StatusCode.NOT_FOUND, "never joined"),
        (lambda: stub.Leave(pb.LeaveRequest(node_id=1), timeout=TIMEOUT),
         grpc.StatusCode.NOT_FOUND, "never joined"),
        (lambda: stub.Heartbeat(pb.HeartbeatRequest(node_id=9), timeout=TIMEOUT),
         grpc.StatusCode.INVALID_ARGUMENT, "0..2"),
        (lambda: next(stub.WatchAssignment(pb.GetAssignmentRequest(node_id=7), timeout=TIMEOUT)),
         grpc.StatusCode.INVALID_ARGUMENT, "0..2"),
        (lambda: next(stub.WatchAssignment(pb.GetAssignmentRequest(node_id=1), timeout=TIMEOUT)),
         grpc.StatusCode.NOT_FOUND, "never joined"),
    ]
    for call, code, fragment in cases:
        err = rpc_error(call)
        assert (err.code(), fragment in err.details()) == (code, True), err.details()


def test_an_address_as_long_as_a_message_is_refused(stub: bootstrap_pb2_grpc.BootstrapStub
                                                     ) -> None:
    """Found while fuzzing (test_fuzz_rpc.py): a Join whose address was just under the message
    limit was kept, and from then on every ListPeers, and the GetAssignment of each of the
    peer's neighbors, was over the limit (RESOURCE_EXHAUSTED): one peer could leave its
    neighbors without an assignment and everyone without `crossgrad status`."""
    join(stub, 0)
    join(stub, 1)
    err = rpc_error(lambda: join(stub, 2, "x" * (DEFAULT_MAX_MESSAGE_BYTES - 64)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "8388544 characters long ('xxx" in err.details(), err.details()
    assert join(stub, 2, "h" * 253 + ":65535").ready  # the longest host:port there is
    listing = stub.ListPeers(pb.ListPeersRequest(), timeout=TIMEOUT)
    assert [p.address for p in listing.peers][2] == "h" * 253 + ":65535"
    for i in range(3):
        assert stub.GetAssignment(pb.GetAssignmentRequest(node_id=i), timeout=TIMEOUT).neighbors


# ---- restart ----


def test_a_restarted_bootstrap_keeps_the_run(state: Path, cluster: Cluster) -> None:
    first = cluster.bootstrap(SETTINGS, state=str(state), lease_seconds=30.0)
    stub = cluster.bootstrap_stub(first.address)
    for i in range(3):
        join(stub, i)
    stub.Leave(pb.LeaveRequest(node_id=1, reason="draining"), timeout=TIMEOUT)
    before = stub.GetAssignment(pb.GetAssignmentRequest(node_id=0), timeout=TIMEOUT)
    first.stop(grace=0)

    with pytest.raises(ConfigError, match="another run"):
        cluster.bootstrap(dataclasses.replace(SETTINGS, seed=8), state=str(state))

    second = cluster.bootstrap(SETTINGS, state=str(state), lease_seconds=30.0)
    stub = cluster.bootstrap_stub(second.address)
    after = stub.GetAssignment(pb.GetAssignmentRequest(node_id=0), timeout=TIMEOUT)
    listing = stub.ListPeers(pb.ListPeersRequest(), timeout=TIMEOUT)
    assert join(stub, 2).ready  # a restarted peer at the same address: idempotent
    second.stop(grace=0)
    assert after == before and after.topology_epoch == 2
    assert [p.state for p in listing.peers] == ["ACTIVE", "LEFT", "ACTIVE"]


class _BadSettingsBootstrap(bootstrap_pb2_grpc.BootstrapServicer):
    """A bootstrap (real gRPC server) whose Join answer carries settings a peer cannot run."""

    def __init__(self, settings: pb.RunSettings) -> None:
        self.settings = settings
        self.joins = 0

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        self.joins += 1
        return pb.JoinResponse(ready=False, joined=1, expected=3, settings=self.settings)

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveResponse:
        return pb.LeaveResponse()


@pytest.mark.parametrize(("field", "value", "named"), [
    ("compressor", "zstd", "zstd"),
    ("algorithm", "fedavg", "fedavg"),
    ("rounds", 0, "rounds"),
    ("topology", "hypercube", "hypercube"),
])
def test_a_peer_refuses_run_settings_it_cannot_run_before_loading_data(
        field: str, value: object, named: str, tmp_path: Path, cluster: Cluster) -> None:
    good = RunConfig(nodes=3, topology="ring", algorithm="cga", dataset="digits", rounds=5)
    settings = settings_to_proto(good)
    setattr(settings, field, value)
    fake = _BadSettingsBootstrap(settings)
    server = cluster.serve([bootstrap_service(fake)])
    runtime = cluster.runtime(0, serve=False, bootstrap=server.address, out=tmp_path,
                              join_timeout=5.0)
    with pytest.raises(ConfigError) as info:
        runtime.start()
    message = str(info.value)
    assert message.startswith(f"the run settings from the bootstrap at {server.address} "
                              "cannot run here: ")
    assert named in message
    assert fake.joins == 1  # refused at the first answer: no second Join, no data loaded


# ---- on grpc.aio ----


class Logged(logging.Handler):
    """Keeps the records of `logger` and sets `seen` at the first. (Read them here, not from
    caplog: its handler, on the root logger, gets a record after this one does.)"""

    def __init__(self, logger: str) -> None:
        super().__init__()
        self.logger = logger
        self.seen = threading.Event()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == self.logger:
            self.records.append(record)
            self.seen.set()


def boot(cluster: Cluster, tmp_path: Path, **kwargs: object) -> BootstrapServer:
    server = cluster.bootstrap(SETTINGS, state=str(tmp_path / "bootstrap.sqlite"), **kwargs)
    assert isinstance(server, BootstrapServer)
    return server


def test_the_rate_limit_refuses_counts_and_logs_on_the_aio_server(
        cluster: Cluster, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = boot(cluster, tmp_path, limits=CallerLimits(streams=8, rate=0.5, burst=2))
    stub = cluster.bootstrap_stub(server.address)
    request = pb.ListPeersRequest()
    logged = Logged("crossgrad.guard")
    logging.getLogger("crossgrad.guard").addHandler(logged)
    with caplog.at_level(logging.WARNING, logger="crossgrad.guard"):
        stub.ListPeers(request, timeout=TIMEOUT)
        stub.ListPeers(request, timeout=TIMEOUT)
        err = rpc_error(lambda: stub.ListPeers(request, timeout=TIMEOUT))
        # grpc.aio sends the status as the call is aborted, before the gate's accounting has
        # seen it end: the count and the log line (in that order) follow within the loop's
        # next steps.
        try:
            assert logged.seen.wait(TIMEOUT), "no log line for the refusal"
        finally:
            logging.getLogger("crossgrad.guard").removeHandler(logged)
    assert server.refusals.snapshot() == {"RESOURCE_EXHAUSTED": 1}
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert "over its 0.5 calls per second" in (err.details() or "")
    pushback = dict(err.trailing_metadata() or ()).get(RETRY_PUSHBACK_KEY)
    assert pushback is not None and int(pushback) > 0
    lines = [r.getMessage() for r in logged.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines
    assert f"server at 127.0.0.1:{server.port} refused /crossgrad.v1.Bootstrap/ListPeers" in (
        lines[0]) and "RESOURCE_EXHAUSTED" in lines[0]


def test_the_aio_server_authenticates_and_leaves_health_open(run_certs: Made,
                                                             tmp_path: Path) -> None:
    with Cluster(run_certs, token=True) as cluster:
        server = boot(cluster, tmp_path)
        stranger = load_security(SecurityFlags(ca=str(run_certs.ca)), Role.CLIENT,
                                 command="test", environ={})
        with make_channel(server.address, security=stranger,
                          server_name="bootstrap.crossgrad") as channel:
            stub = bootstrap_pb2_grpc.BootstrapStub(channel)
            err = rpc_error(lambda: stub.ListPeers(pb.ListPeersRequest(), timeout=TIMEOUT))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "missing or wrong token" in (err.details() or "")
            health = channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=TIMEOUT)
            assert health == b"\x08\x01"  # SERVING
        listed = cluster.bootstrap_stub(server.address).ListPeers(pb.ListPeersRequest(),
                                                                 timeout=TIMEOUT)
        assert dict(listed.refusals) == {"UNAUTHENTICATED": 1}


def test_streams_over_the_limit_are_unavailable(cluster: Cluster, tmp_path: Path) -> None:
    server = boot(cluster, tmp_path, limits=CallerLimits(streams=100))
    stub = cluster.bootstrap_stub(server.address)
    limit = STREAMS_PER_NODE * SETTINGS.nodes + SPARE_STREAMS
    join(stub, 0)
    watches = [Watch(stub, 0) for _ in range(limit)]  # before assembly: they all wait
    try:
        assert server.servicer.wait_watching(limit, TIMEOUT), f"{limit} watches"
        extra = Watch(stub, 0)
        end = extra.next()
        assert isinstance(end, grpc.RpcError) and end.code() == grpc.StatusCode.UNAVAILABLE
        assert f"already serves {limit} streams" in (end.details() or "")
    finally:
        for watch in watches:
            watch.close()
    assert server.servicer.wait_watching(0, TIMEOUT), "the watches' coroutines to end"


def test_a_stopping_server_ends_waiting_watches_with_unavailable(cluster: Cluster,
                                                                 tmp_path: Path) -> None:
    server = boot(cluster, tmp_path)
    stub = cluster.bootstrap_stub(server.address)
    join(stub, 0)
    waiting = Watch(stub, 0)  # before assembly: nothing sent yet
    assert server.servicer.wait_watching(1, TIMEOUT), "the watch"
    server.stop(grace=TIMEOUT)
    end = waiting.next()
    assert isinstance(end, grpc.RpcError) and end.code() == grpc.StatusCode.UNAVAILABLE
    assert "the bootstrap is stopping; watch again once it is back" in (end.details() or "")
    assert dict(end.trailing_metadata() or ()).get(ERROR_CLASS_KEY) == "Unavailable"
    assert server.wait_for_termination(timeout=0) is False
    server.stop(grace=0)  # again: nothing left to do
    waiting.close()


def test_a_client_that_goes_away_ends_its_watch(cluster: Cluster, tmp_path: Path) -> None:
    server = boot(cluster, tmp_path)
    stub = cluster.bootstrap_stub(server.address)
    for i in range(3):
        join(stub, i)
    watch = Watch(stub, 1)
    assert isinstance(watch.next(), pb.Assignment)
    assert server.servicer.watching == 1
    watch.close()
    assert server.servicer.wait_watching(0, TIMEOUT), "the watch's coroutine to end"


def test_an_epoch_bump_from_the_reaper_thread_reaches_an_open_watch(cluster: Cluster,
                                                                    tmp_path: Path) -> None:
    server = boot(cluster, tmp_path, lease_seconds=0.5)
    bumped_in: list[str] = []
    server.registry.on_epoch(lambda epoch: bumped_in.append(threading.current_thread().name))
    stub = cluster.bootstrap_stub(server.address)
    for i in range(3):
        join(stub, i)
    watch = Watch(stub, 0)
    try:
        first = watch.next()
        assert isinstance(first, pb.Assignment) and first.topology_epoch == 1
        # Nobody heartbeats and nothing else calls: only the reaper can expire the leases.
        second = watch.next()
        assert isinstance(second, pb.Assignment), second
        assert (second.topology_epoch, neighbor_ids(second)) == (2, [])  # all dead: alone
        assert bumped_in[-1] == "bootstrap-reaper"
        assert watch.items.empty()
    finally:
        watch.close()

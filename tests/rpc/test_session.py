"""A peer's bootstrap session and round loop against a real bootstrap on 127.0.0.1 (issue: faults).

- Join waits for a bootstrap that is not up yet, with backoff and jitter.
- The heartbeat thread hands every new topology epoch to the peer (a neighbor that left), from
  the heartbeat's answer, on the Heartbeats stream or (older bootstraps) a call each, or with
  GetAssignment from a bootstrap that does not send it.
- A node whose neighbors are far ahead catches up from their models (Node.catch_up).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import torch

import peer.session
from bootstrap.registry import AssignmentView
from bootstrap.servicer import BootstrapServicer
from crossgrad.cluster import free_port
from crossgrad.config import RunConfig
from crossgrad.errors import DeadlineExceeded
from crossgrad.rpc import RunningServer
from crossgrad.v1 import bootstrap_pb2 as pb
from peer.builder import assignments, load_run_data, make_node
from peer.loop import RoundLoop
from peer.metrics import Traffic
from peer.records import RunRecorder
from peer.session import BootstrapSession, Progress, backoff_delays

from harness import CPU, Cluster

SETTINGS = RunConfig(nodes=3, topology="ring", dataset="digits", partition="iid", rounds=40,
                     device="cpu")
LEASE = 5.0


@pytest.fixture
def bootstrap(cluster: Cluster) -> RunningServer:
    return cluster.bootstrap(SETTINGS, lease_seconds=LEASE)


def test_backoff_is_jittered_and_capped() -> None:
    delay = backoff_delays(base=0.25, cap=5.0, rng=random.Random(7))
    draws = [delay(attempt) for attempt in range(12) for _ in range(50)]
    assert all(0.0 <= d <= 5.0 for d in draws)
    assert max(delay(0) for _ in range(200)) <= 0.25  # the first retries come quickly
    assert len({round(d, 6) for d in draws}) > 500  # jittered: peers do not retry in step


def test_join_waits_for_a_bootstrap_that_comes_up_later(cluster: Cluster) -> None:
    port = free_port()
    session = BootstrapSession(f"127.0.0.1:{port}", 0, join_timeout=60.0)
    joined: list[RunConfig] = []
    thread = threading.Thread(target=lambda: joined.append(session.join("127.0.0.1:1", 0)))
    thread.start()
    try:
        assert not joined  # nothing to join yet: it keeps trying
        server = cluster.bootstrap(SETTINGS, lease_seconds=LEASE, bind=f"127.0.0.1:{port}")
        thread.join(timeout=30)
        assert joined and joined[0].nodes == 3 and session.joined
        server.stop(0)
    finally:
        session.close()
        thread.join(timeout=5)


@pytest.mark.parametrize("bootstrap_has", ["stream", "calls", "oldest"])
def test_heartbeats_hand_over_each_new_epoch(cluster: Cluster, monkeypatch: pytest.MonkeyPatch,
                                             bootstrap_has: str) -> None:
    """The answer to a heartbeat carries the new assignment, so no GetAssignment follows. The
    session heartbeats on the Heartbeats stream; a bootstrap without it ("calls": UNIMPLEMENTED)
    gets a unary Heartbeat each, and one older still, which sends no assignment in the answer
    ("oldest"), gets a GetAssignment after the answer that names a new epoch."""
    beats: list[str] = []  # how each heartbeat came: "stream" or "call"
    heartbeat, heartbeats = BootstrapServicer.Heartbeat, BootstrapServicer.Heartbeats

    async def counted_call(self: BootstrapServicer, request: pb.HeartbeatRequest,
                           context: grpc.aio.ServicerContext) -> pb.HeartbeatResponse:
        beats.append("call")
        answer = await heartbeat(self, request, context)
        if bootstrap_has == "oldest":
            answer.ClearField("assignment")
        return answer

    async def counted_stream(self: BootstrapServicer, requests: Any,
                             context: grpc.aio.ServicerContext) -> None:
        if bootstrap_has != "stream":
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")

        async def each() -> Any:
            async for request in requests:
                beats.append("stream")
                yield request
        await heartbeats(self, each(), context)
    monkeypatch.setattr(BootstrapServicer, "Heartbeat", counted_call)
    monkeypatch.setattr(BootstrapServicer, "Heartbeats", counted_stream)
    fetched: list[int] = []
    fetch = BootstrapSession._fetch_assignment

    def counted(self: BootstrapSession, on_assignment: Callable[[AssignmentView], None]) -> None:
        fetched.append(self.node_id)
        fetch(self, on_assignment)
    monkeypatch.setattr(BootstrapSession, "_fetch_assignment", counted)
    bootstrap = cluster.bootstrap(SETTINGS, lease_seconds=LEASE)
    sessions = [BootstrapSession(bootstrap.address, i, join_timeout=30.0) for i in range(3)]
    seen: dict[int, list[AssignmentView]] = {i: [] for i in range(3)}
    changed = threading.Event()

    def keep(i: int) -> Callable[[AssignmentView], None]:
        def on_assignment(view: AssignmentView) -> None:
            seen[i].append(view)
            if i == 0 and [n.node_id for n in view.neighbors] == [1]:
                changed.set()
        return on_assignment

    try:
        for i, session in enumerate(sessions):  # heartbeats from the join on, as a peer does
            session.join(f"127.0.0.1:{60000 + i}", 10)
            session.start(lambda i=i: Progress(round=0, loss=0.0, health="ok"), keep(i))
        first = [s.wait_assignment() for s in sessions]
        assert all([n.node_id for n in v.neighbors] == [j for j in range(3) if j != v.node_id]
                   for v in first)
        sessions[2].stop()
        sessions[2].leave("draining")  # node 2 drains: its neighbors get a new assignment
        assert changed.wait(timeout=30)
        view = seen[0][-1]
        assert view.epoch > first[0].epoch and view.self_weight == pytest.approx(0.5)
        assert (0 in fetched) == (bootstrap_has == "oldest")
        assert set(beats) == {"stream" if bootstrap_has == "stream" else "call"}
    finally:
        for session in sessions:
            session.close()


def test_a_heartbeat_a_stalled_bootstrap_does_not_answer_fails_in_time(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bootstrap holds the Heartbeats stream open and answers nothing (stalled): the
    heartbeat fails after CALL_TIMEOUT_S as DeadlineExceeded, as a unary call past its
    deadline does, and the next heartbeat opens a new stream."""
    async def silent(self: BootstrapServicer, requests: Any,
                     context: grpc.aio.ServicerContext) -> None:
        async for _ in requests:  # reads each heartbeat and never answers
            pass
    monkeypatch.setattr(BootstrapServicer, "Heartbeats", silent)
    monkeypatch.setattr(peer.session, "CALL_TIMEOUT_S", 0.5)
    bootstrap = cluster.bootstrap(SETTINGS, lease_seconds=LEASE)
    session = BootstrapSession(bootstrap.address, 0, join_timeout=30.0)
    try:
        session.join("127.0.0.1:60000", 10)
        for _ in range(2):
            with pytest.raises(DeadlineExceeded, match=r"no answer to a heartbeat within 0\.5 s"):
                session.heartbeat(Progress(round=0, loss=0.0, health="ok"), lambda view: None)
            assert session._beats is None  # given up: the next heartbeat opens another
    finally:
        session.close()


def test_refresh_soon_asks_for_a_new_epoch_before_the_next_beat(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A neighbor refused this node as not its neighbor: it asks the bootstrap at once, not a
    quarter lease later (here 15 s), so the two do not spend rounds on different epochs."""
    monkeypatch.setattr(peer.session, "HEARTBEAT_MAX_S", 60.0)
    boot = cluster.bootstrap(SETTINGS, lease_seconds=60.0)
    sessions = [BootstrapSession(boot.address, i, join_timeout=30.0) for i in range(3)]
    views: list[AssignmentView] = []
    changed = threading.Event()
    known = [1]  # the run's first epoch: only a newer one counts

    def on_assignment(view: AssignmentView) -> None:
        views.append(view)
        if view.epoch > known[0]:
            changed.set()

    try:
        for i, session in enumerate(sessions):
            session.join(f"127.0.0.1:{60000 + i}", 10)
            session.start(lambda: Progress(round=0, loss=0.0, health="ok"),
                          on_assignment if i == 0 else (lambda view: None))
        first = sessions[0].wait_assignment()
        known[0] = first.epoch
        sessions[2].stop()
        sessions[2].leave("draining")  # a new epoch; node 0's next beat is 15 s away
        assert not changed.wait(timeout=0.5)
        sessions[0].refresh_soon()
        assert changed.wait(timeout=10), "no heartbeat before the regular one"
        assert views[-1].epoch > first.epoch
        assert [n.node_id for n in views[-1].neighbors] == [1]
    finally:
        for session in sessions:
            session.close()


def test_a_node_far_behind_catches_up_from_its_neighbors_models(tmp_path: Path,
                                                                cluster: Cluster) -> None:
    cfg = RunConfig(nodes=2, topology="ring", dataset="digits", partition="iid", rounds=40,
                    device="cpu", algorithm="cga")
    data = load_run_data(cfg)
    _, assigned = assignments(cfg)
    ahead_rt, behind_rt = cluster.runtime(1), cluster.runtime(0)
    ahead = make_node(cfg, data, 1, assigned[1], CPU)
    behind = make_node(cfg, data, 0, assigned[0], CPU)
    ahead.round = 12  # as if it trained on while node 0 was away
    ahead_rt.attach(ahead, {0: "127.0.0.1:1"}, epoch=1)
    behind_rt.attach(behind, {1: ahead_rt.address}, epoch=1)
    ahead.publish()
    assert behind_rt.hood is not None
    loop = RoundLoop(behind, behind_rt.hood, cfg, RunRecorder(tmp_path, cfg), Traffic(),
                     timeout=5.0, test_set=(data.dataset.test_x, data.dataset.test_y))
    behind.algorithm.momentum_buffers(behind.params)  # some momentum to forget
    assert loop.catch_up_if_behind()
    assert behind.round == 12 and loop.catch_ups.count == 1
    for mine, theirs in zip(behind.params, ahead.model(12), strict=True):
        assert torch.equal(mine, theirs)  # the average of one neighbor's model
    assert behind.algorithm.state_dict()["momentum"] is None
    assert not loop.catch_up_if_behind()  # level now: nothing to do
    loop.recorder.close()
    events = (tmp_path / "metrics.jsonl").read_text()
    assert '"event": "catch_up"' in events and '"from_round": 0' in events


def test_a_heartbeat_in_flight_never_joins_a_leaving_node_again(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """stop() then leave(), as a peer shuts down, while the heartbeat thread beats without
    pause: a heartbeat that reached the bootstrap after the Leave would be answered NOT_FOUND
    and join the node again, and its neighbors would wait on a dead node for a lease."""
    monkeypatch.setattr(peer.session, "HEARTBEAT_MIN_S", 0.0)
    monkeypatch.setattr(peer.session, "HEARTBEAT_MAX_S", 0.0)
    boot = cluster.bootstrap(SETTINGS, lease_seconds=60.0)
    sessions = [BootstrapSession(boot.address, i, join_timeout=30.0) for i in range(3)]
    try:
        for i, session in enumerate(sessions):
            session.join(f"127.0.0.1:{60000 + i}", 10)
        sessions[0].wait_assignment()
        for attempt in range(8):
            leaving = BootstrapSession(boot.address, 2, join_timeout=30.0)
            if attempt:
                leaving.join("127.0.0.1:60002", 10)  # back after the last attempt's Leave
            else:
                leaving, sessions[2] = sessions[2], leaving
            leaving.start(lambda: Progress(round=0, loss=0.0, health="ok"), lambda view: None)
            threading.Event().wait(0.002 * attempt)  # the first heartbeat, or later ones
            leaving.stop()
            leaving.leave("draining")
            threading.Event().wait(0.2)
            view = sessions[0].stub.GetAssignment(pb.GetAssignmentRequest(node_id=0), timeout=5)
            assert [n.node_id for n in view.neighbors] == [1], f"attempt {attempt}"
            leaving.close()
    finally:
        for session in sessions:
            session.close()

"""The busy-bootstrap driver (bench/bootstrap_load.py) at CI scale, and its epoch check.

The driver's own code against a real bootstrap on 127.0.0.1:0 (the harness's, in this process):
50 simulated peers, each with its own connection, join, heartbeat (on a stream each, or a call
each) and keep a WatchAssignment stream open (or close it after the first assignment, as peers
do) while two peers leave and come back. An open stream must carry the first assignment and
then exactly the epochs that change its peer's assignment; a peer following heartbeats must get
every epoch 1..5 once; each assignment must be the ring repaired around the peers that had
left. Latencies are bounded
loosely, since CI machines are shared (docs/benchmarks.md, "Busy bootstrap", has the figures at
1,000 peers). The check itself is tested on doctored streams, so a pass means it looked.
Last, the command itself at 20 peers against `crossgrad bootstrap` in its own process,
pinned (--pin).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bootstrap.topology import build_topology
from crossgrad.config import RunConfig
from crossgrad.v1 import bootstrap_pb2 as pb

from harness import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is no package of the wheel
from bench.bootstrap_load import (
    Epochs,
    LoadConfig,
    check_epochs,
    drive,
    expected_table,
    receivers,
)

REPO = Path(__file__).resolve().parents[2]
PEERS = 50
CHURN = 2  # a Leave and a Join again each: epochs 1 (assembly) .. 1 + 2 x CHURN
LOOSE_P99_MS = 1000.0  # 20x the goal at 1,000 peers: only a stuck or polling bootstrap fails it


@pytest.mark.parametrize(("keep_watching", "heartbeat_stream"),
                         [(True, True), (False, True), (True, False)],
                         ids=["streams-open", "as-peers-do", "heartbeat-calls"])
def test_50_peers_see_their_epochs_once_with_the_right_neighbors(
        cluster: Cluster, tmp_path: Path, keep_watching: bool, heartbeat_stream: bool) -> None:
    """Streams open: each carries the epochs that change its assignment. As peers do: each
    peer gets every epoch's assignment in a heartbeat answer (4 Hz here, so a change reaches
    all in 0.25 s). Heartbeats on a Heartbeats stream each (as peers do), or a call each."""
    server = cluster.bootstrap(RunConfig(nodes=PEERS, topology="ring", partition="iid"),
                               tmp_path / "bootstrap.sqlite")
    config = LoadConfig(peers=PEERS, seconds=2.0, ramp=0.25, probe_hz=10.0, churn=CHURN,
                        heartbeat_hz=1.0 if keep_watching else 4.0,
                        keep_watching=keep_watching, heartbeat_stream=heartbeat_stream)
    report = asyncio.run(drive(server.address, config))

    assert report["epochs_ok"], report["problems"]
    assert report["epochs"] == 1 + 2 * CHURN
    rpcs = report["rpcs"]
    assert rpcs["Join"]["calls"] == PEERS + CHURN
    assert rpcs["Leave"]["calls"] == CHURN
    assert rpcs["epoch fan-out"]["calls"] == 2 * CHURN  # every change reached its peers
    assert rpcs["Heartbeat"]["calls"] >= PEERS  # each peer beat at least once in 2 s
    assert rpcs["GetAssignment"]["calls"] > 0 and rpcs["ListPeers"]["calls"] > 0
    for method, row in rpcs.items():
        assert row["failed"] == {}, (method, row)
        assert row["p99_ms"] < LOOSE_P99_MS, (method, row)
    assert report["stream_failures"] == {}


def ring_streams(nodes: int, live_at: dict[int, frozenset[int]], every_epoch: bool
                 ) -> tuple[Epochs, pb.ListPeersResponse, pb.RunSettings]:
    """What a correct bootstrap sends `nodes` ring peers over the epochs of `live_at`: every
    epoch to every peer, or only the epochs that change a peer's assignment."""
    settings = pb.RunSettings(nodes=nodes, topology="ring", seed=123)
    topology = build_topology("ring", nodes, 123)
    tables = {epoch: expected_table(topology, live) for epoch, live in live_at.items()}
    streams = Epochs(nodes)
    for epoch, (graph, weights) in sorted(tables.items()):
        for i in receivers(tables, epoch, every_epoch):
            streams.receive(i, pb.Assignment(
                node_id=i, topology_epoch=epoch, self_weight=float(weights[i, i]),
                settings=settings,
                neighbors=[pb.Neighbor(node_id=j, address=f"h{j}:1", weight=float(weights[i, j]))
                           for j in graph.neighbors(i)]))
    final = pb.ListPeersResponse(topology_epoch=max(live_at), peers=[
        pb.PeerInfo(node_id=i, address=f"h{i}:1", state="ACTIVE") for i in range(nodes)])
    return streams, final, settings


# Node 3 of a 4-ring leaves at epoch 2: 0 and 2 get a bypass edge, 3 is alone, and 1 keeps its
# neighbors and weights (every degree stays 2), so an open stream tells 1 nothing.
LIVE_AT = {1: frozenset(range(4)), 2: frozenset({0, 1, 2})}


@pytest.mark.parametrize("every_epoch", [True, False], ids=["every-epoch", "changes-only"])
@pytest.mark.parametrize("fault", ["none", "missed", "twice", "weight", "behind", "unchanged"])
def test_the_epoch_check_finds_a_missed_a_repeated_epoch_and_a_wrong_assignment(
        fault: str, every_epoch: bool) -> None:
    streams, final, settings = ring_streams(4, LIVE_AT, every_epoch)
    assert [len(seen) for seen in streams.seen] == ([2, 2, 2, 2] if every_epoch else [2, 1, 2, 2])
    if fault == "missed":
        del streams.seen[2][0]  # node 2 never got epoch 1
    elif fault == "twice":
        streams.seen[0].append(streams.seen[0][-1])
    elif fault == "weight":
        streams.seen[0][1].neighbors[0].weight += 1e-6
        streams.seen[0][1].self_weight -= 1e-6
    elif fault == "behind":
        final.topology_epoch = 3  # a change the driver did not make (an expired lease)
    elif fault == "unchanged":  # node 1 gets epoch 2 (right, but owed only to every_epoch)
        if every_epoch:
            del streams.seen[1][1]  # ... so there it is missing instead
        else:
            again = pb.Assignment()
            again.CopyFrom(streams.seen[1][0])
            again.topology_epoch = 2
            streams.seen[1].append(again)
    problems = check_epochs(streams, LIVE_AT, final, settings, every_epoch=every_epoch)
    assert (problems == []) == (fault == "none"), problems


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--pin needs 2 CPUs")
def test_the_command_against_a_bootstrap_process_pinned_to_a_cpu_of_its_own() -> None:
    """The command as documented: `crossgrad bootstrap` in a process of its own (its collector
    paced, as the CLI runs it), pinned to one CPU, the driver on the others."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bootstrap_load.py"), "--peers", "20",
         "--seconds", "1", "--ramp", "0.2", "--churn", "1", "--pin", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    first, *_, last = done.stdout.strip().splitlines()
    assert "bootstrap in its own process on CPU" in first, first
    report = json.loads(last)
    assert report["epochs_ok"] and report["epochs"] == 3, report["problems"]
    assert report["rpcs"]["Heartbeat"]["calls"] > 0 and report["server_cpu_percent"] > 0

"""The busy-bootstrap driver (bench/bootstrap_load.py) at CI scale, and its epoch check.

The driver's own code against a real bootstrap on 127.0.0.1:0 (the harness's, in this process):
50 simulated peers, each with its own connection, join, heartbeat and keep a WatchAssignment
stream open (or close it after the first assignment, as peers do) while two peers leave and
come back. Every stream must carry epochs
1..5 exactly once and, at each, the ring repaired around the peers that had left; latencies are
bounded loosely, since CI machines are shared (docs/benchmarks.md, "Busy bootstrap", has the
figures at 1,000 peers). The check itself is tested on doctored streams, so a pass means it
looked.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest

from bootstrap.topology import build_topology, metropolis_hastings_weights, repair
from crossgrad.config import RunConfig
from crossgrad.v1 import bootstrap_pb2 as pb

from harness import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is no package of the wheel
from bench.bootstrap_load import Epochs, LoadConfig, check_epochs, drive

PEERS = 50
CHURN = 2  # a Leave and a Join again each: epochs 1 (assembly) .. 1 + 2 x CHURN
LOOSE_P99_MS = 1000.0  # 20x the goal at 1,000 peers: only a stuck or polling bootstrap fails it


@pytest.mark.parametrize("keep_watching", [True, False], ids=["streams-open", "as-peers-do"])
def test_50_peers_see_every_epoch_once_with_the_right_neighbors(
        cluster: Cluster, tmp_path: Path, keep_watching: bool) -> None:
    """Streams open: each carries every epoch. As peers do: each peer learns of an epoch from
    a heartbeat answer and fetches it (4 Hz here, so a change reaches all in 0.25 s)."""
    server = cluster.bootstrap(RunConfig(nodes=PEERS, topology="ring", partition="iid"),
                               tmp_path / "bootstrap.sqlite")
    config = LoadConfig(peers=PEERS, seconds=2.0, ramp=0.25, probe_hz=10.0, churn=CHURN,
                        heartbeat_hz=1.0 if keep_watching else 4.0,
                        keep_watching=keep_watching)
    report = asyncio.run(drive(server.address, config))

    assert report["epochs_ok"], report["problems"]
    assert report["epochs"] == 1 + 2 * CHURN
    rpcs = report["rpcs"]
    assert rpcs["Join"]["calls"] == PEERS + CHURN
    assert rpcs["Leave"]["calls"] == CHURN
    assert rpcs["epoch fan-out"]["calls"] == 2 * CHURN  # every change reached all 50 streams
    assert rpcs["Heartbeat"]["calls"] >= PEERS  # each peer beat at least once in 2 s
    assert rpcs["GetAssignment"]["calls"] > 0 and rpcs["ListPeers"]["calls"] > 0
    for method, row in rpcs.items():
        assert row["failed"] == {}, (method, row)
        assert row["p99_ms"] < LOOSE_P99_MS, (method, row)
    assert report["stream_failures"] == {}


def ring_streams(nodes: int, epochs: int) -> tuple[Epochs, pb.ListPeersResponse,
                                                   pb.RunSettings]:
    """What a correct bootstrap sends `nodes` ring peers, all live, over `epochs` epochs."""
    settings = pb.RunSettings(nodes=nodes, topology="ring", seed=123)
    graph = repair(build_topology("ring", nodes, 123), np.ones(nodes, dtype=bool))
    weights = metropolis_hastings_weights(graph)
    streams = Epochs(nodes)
    for epoch in range(1, epochs + 1):
        for i in range(nodes):
            streams.receive(i, pb.Assignment(
                node_id=i, topology_epoch=epoch, self_weight=float(weights[i, i]),
                settings=settings,
                neighbors=[pb.Neighbor(node_id=j, address=f"h{j}:1", weight=float(weights[i, j]))
                           for j in graph.neighbors(i)]))
    final = pb.ListPeersResponse(topology_epoch=epochs, peers=[
        pb.PeerInfo(node_id=i, address=f"h{i}:1", state="ACTIVE") for i in range(nodes)])
    return streams, final, settings


@pytest.mark.parametrize("fault", ["none", "missed", "twice", "weight", "behind"])
def test_the_epoch_check_finds_a_missed_a_repeated_epoch_and_a_wrong_assignment(
        fault: str) -> None:
    streams, final, settings = ring_streams(4, 2)
    live_at = {1: frozenset(range(4)), 2: frozenset(range(4))}
    if fault == "missed":
        del streams.seen[2][0]  # node 2 never got epoch 1
    elif fault == "twice":
        streams.seen[1].append(streams.seen[1][-1])
    elif fault == "weight":
        streams.seen[3][1].neighbors[0].weight += 1e-6
        streams.seen[3][1].self_weight -= 1e-6
    elif fault == "behind":
        final.topology_epoch = 3  # a change the driver did not make (an expired lease)
    problems = check_epochs(streams, live_at, final, settings)
    assert (problems == []) == (fault == "none"), problems

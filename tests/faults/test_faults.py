"""Fault injection on real processes (docs/reliability.md): a bootstrap and 5 peers on loopback,
each a `crossgrad` CLI process, faults sent as real signals.

The reference for accuracy is the in-process simulator with the same settings: with no fault,
a networked run and a simulated run end with bit-identical models (tests/system), so the
simulator's accuracy is the unfaulted run's.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from pathlib import Path

import pytest

from crossgrad.cluster import LocalCluster, poll
from crossgrad.config import RunConfig
from crossgrad.demo import final_table
from peer import simulate

pytestmark = pytest.mark.slow

TIMEOUT = 5.0  # --timeout: the deadline of every neighbor call
LEASE = 3.0  # --lease-seconds
CONFIG = RunConfig(nodes=5, topology="ring", algorithm="cga", dataset="digits",
                   partition="modulo", rounds=300, batch_size=32, eval_every=25, seed=123,
                   device="cpu")


def rounds_of(out: Path, node: int) -> list[dict[str, object]]:
    path = out / f"node-{node}" / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in records if r["kind"] == "round"]


def summary_of(out: Path, node: int) -> dict[str, object]:
    return json.loads((out / f"node-{node}" / "summary.json").read_text())


# The kill test runs long enough that the outage (a lease, then a process start: 5-10 s, 70-150
# rounds here) is a small part of the run: while node 2 is away nobody trains on its classes.
KILL_CONFIG = dataclasses.replace(CONFIG, rounds=600, eval_every=50)


@pytest.fixture(scope="module")
def unfaulted(tmp_path_factory: pytest.TempPathFactory) -> float:
    """Mean final test accuracy of the kill test's run with no fault (the simulator: a
    networked run without faults ends bit-identical to it)."""
    result = simulate.run(KILL_CONFIG, tmp_path_factory.mktemp("unfaulted"))
    return result.final.mean


def started(config: RunConfig, out: Path) -> LocalCluster:
    """A bootstrap and every peer of `config` running under `out` (close it: a `with` block)."""
    cluster = LocalCluster(config, out, peer_args=["--timeout", str(TIMEOUT),
                                                   "--checkpoint-every", "10"])
    try:
        cluster.start_bootstrap(lease_seconds=LEASE)
        cluster.start_peers()
    except BaseException:
        cluster.close()
        raise
    return cluster


def test_a_killed_peer_is_left_out_and_comes_back_with_resume(tmp_path: Path,
                                                             unfaulted: float) -> None:
    out = tmp_path / "run"
    with started(KILL_CONFIG, out) as cluster:
        cluster.wait_round(2, 100, timeout=600)
        cluster.signal(2, signal.SIGKILL)
        # The bootstrap expires it after its lease; the live nodes keep going meanwhile.
        cluster.wait_state(2, "EXPIRED", timeout=60)
        table = cluster_table(cluster)
        assert "dead" in table.splitlines()[_row(table, 2)], table
        cluster.start_peer(2, resume=True)
        codes = cluster.wait_peers(timeout=900)
        assert codes == dict.fromkeys(range(5), 0), codes
        listed = {p.node_id: p for p in cluster.list_peers().peers}
    assert listed[2].resumes == 1 and listed[2].returns >= 1
    # No round of a live node waited longer than one deadline (plus its own computation).
    for i in (0, 1, 3, 4):
        slowest = max(float(r["seconds"]) for r in rounds_of(out, i))  # type: ignore[arg-type]
        assert slowest < TIMEOUT + 2.0, (i, slowest)
    summaries = [summary_of(out, i) for i in range(5)]
    assert all(s["round"] == KILL_CONFIG.rounds for s in summaries)
    assert summaries[2]["resumes"] == 1
    mean = sum(float(s["accuracy"]) for s in summaries) / 5  # type: ignore[arg-type]
    print(f"final mean accuracy {mean:.4f} with the fault, {unfaulted:.4f} without")
    assert abs(mean - unfaulted) <= 0.01, (mean, unfaulted)
    table = final_table(KILL_CONFIG, out, peers=listed)
    assert "resumed" in table.splitlines()[_row(table, 2)], table


def cluster_table(cluster: LocalCluster) -> str:
    from crossgrad.status import format_peers

    return format_peers(cluster.list_peers())


def _row(table: str, node: int) -> int:
    return next(i for i, line in enumerate(table.splitlines())
                if line.split()[:1] == [str(node)])


def test_a_bootstrap_killed_mid_run_and_restarted_keeps_the_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with started(CONFIG, out) as cluster:
        cluster.wait_round(0, 40, timeout=600)
        epoch = cluster.list_peers().topology_epoch
        cluster.signal("bootstrap", signal.SIGKILL)
        assert cluster.bootstrap is not None
        cluster.bootstrap.wait(timeout=30)
        down = time.monotonic()
        before = cluster.status(0)
        assert before is not None
        # Down for more than two leases, while the peers keep training.
        poll(lambda: True if time.monotonic() - down > 2.5 * LEASE else None, 60, "downtime")
        during = cluster.status(0)
        assert during is not None and during.round > before.round
        cluster.start_bootstrap(lease_seconds=LEASE)  # same port, same --state
        after = cluster.list_peers()
        assert after.topology_epoch == epoch
        assert {p.state for p in after.peers} == {"ACTIVE"}, after
        codes = cluster.wait_peers(timeout=900)
        assert codes == dict.fromkeys(range(5), 0), codes
        final = cluster.list_peers()
    assert all(p.returns == 0 for p in final.peers), final  # nobody was expired
    assert final.topology_epoch == epoch  # no reassignment until the peers finished
    for i in range(5):
        assert summary_of(out, i)["round"] == CONFIG.rounds
        assert summary_of(out, i)["missed_neighbor_answers"] == 0


def test_sigterm_checkpoints_leaves_and_resume_goes_on(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with started(CONFIG, out) as cluster:
        cluster.wait_round(3, 60, timeout=600)
        cluster.signal(3, signal.SIGTERM)
        assert cluster.peers[3].wait(timeout=120) == 0
        stopped = summary_of(out, 3)
        assert stopped["state"] == "DRAINING" and stopped["round"] < CONFIG.rounds
        saved = sorted((out / "node-3" / "checkpoints").glob("*.ckpt"))
        assert saved and f"round-{stopped['round']:09d}" in saved[-1].name
        states = {p.node_id: p.state for p in cluster.list_peers().peers}
        assert states[3] == "LEFT"
        cluster.start_peer(3, resume=True)
        codes = cluster.wait_peers(timeout=900)
        assert codes == dict.fromkeys(range(5), 0), codes
        listed = {p.node_id: p for p in cluster.list_peers().peers}
    resumed = summary_of(out, 3)
    assert resumed["round"] == CONFIG.rounds and resumed["resumes"] == 1
    # A draining neighbor answers at once while it drains; a call that lands after its server
    # stopped waits for it (it may be restarting) up to one deadline, once: never more.
    for i in (0, 1, 2, 4):
        slowest = max(float(r["seconds"]) for r in rounds_of(out, i))  # type: ignore[arg-type]
        assert slowest < TIMEOUT + 1.0, (i, slowest)
    assert listed[3].resumes == 1 and listed[3].returns == 1
    events = [json.loads(line) for line in
              (out / "node-3" / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "resume" and e["round"] == stopped["round"] for e in events)


# Long enough that node 2 is back (a lease, then a process start) well before the others finish.
REPLICA_CONFIG = dataclasses.replace(CONFIG, rounds=900, eval_every=100,
                                     model_compressor="sign", consensus_step=0.5)


def test_under_replicas_a_killed_peer_comes_back_and_every_copy_is_resynchronised(
        tmp_path: Path) -> None:
    """Model replicas with a fault: node 2 killed mid-run, its neighbors' copies of it go stale,
    the repaired ring links 1 and 3 (no copies of each other yet), node 2 resumes from its
    checkpoint and catches up. Every copy that missed an update is resynchronised from a dense
    replica (never guessed), and the run ends near the unfaulted one."""
    out = tmp_path / "run"
    unfaulted = simulate.run(REPLICA_CONFIG, tmp_path / "sim").final.mean
    with started(REPLICA_CONFIG, out) as cluster:
        cluster.wait_round(2, 60, timeout=600)
        cluster.signal(2, signal.SIGKILL)
        cluster.wait_state(2, "EXPIRED", timeout=60)
        cluster.start_peer(2, resume=True)
        codes = cluster.wait_peers(timeout=900)
        assert codes == dict.fromkeys(range(5), 0), codes
    summaries = [summary_of(out, i) for i in range(5)]
    assert all(s["round"] == REPLICA_CONFIG.rounds for s in summaries)
    assert summaries[2]["resumes"] == 1 and summaries[2]["catch_ups"] >= 1
    for i in (1, 2, 3):  # 1 and 3: copies of each other (new link) and of 2 (it came back)
        assert int(summaries[i]["resyncs"]) > 0, (i, summaries[i]["resyncs"])  # type: ignore[call-overload]
        assert summaries[i]["bytes_by_kind"]["replica"]["received"] > 0  # type: ignore[index]
    mean = sum(float(s["accuracy"]) for s in summaries) / 5  # type: ignore[arg-type]
    print(f"final mean accuracy {mean:.4f} with the fault, {unfaulted:.4f} without")
    assert abs(mean - unfaulted) <= 0.03, (mean, unfaulted)

"""The bootstrap's membership state machine: joins, assembly, leases, leaving, persistence.

No sockets and no sleeps: a fake clock drives the leases, and the one threaded test waits on the
registry's own condition with a timeout.
"""

from __future__ import annotations

import math
import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from bootstrap.registry import FINISHED, FLUSH_SECONDS, PeerState, Registry, changed_assignments
from bootstrap.topology import Topology, build_topology, metropolis_hastings_weights, repair
from crossgrad.config import RunConfig
from crossgrad.errors import (
    AlreadyExists,
    ConfigError,
    InvalidMessage,
    NotFound,
    NotReady,
    Unavailable,
)

LEASE = 10.0


class FakeClock:
    """Wall-clock seconds that move only when a test says so."""

    def __init__(self, t: float = 1_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def addr(i: int) -> str:
    return f"10.0.0.{i}:7000"


def make(settings: RunConfig, clock: FakeClock, db: Path | None = None) -> Registry:
    return Registry(settings, db, lease_seconds=LEASE, clock=clock)


def assembled(nodes: int = 5, topology: str = "ring",
              clock: FakeClock | None = None, db: Path | None = None) -> Registry:
    reg = make(RunConfig(nodes=nodes, topology=topology), clock or FakeClock(), db)
    for i in range(nodes):
        reg.join(i, addr(i), 100 + i)
    return reg


def weight_matrix(reg: Registry) -> np.ndarray:
    """The (n, n) mixing matrix the registry hands out, rebuilt from every node's assignment."""
    n = reg.settings.nodes
    addresses = {p.node_id: p.address for p in reg.peers()}
    w = np.zeros((n, n))
    for i in range(n):
        view = reg.assignment(i)
        w[i, i] = view.self_weight
        for j, address, weight in view.neighbors:
            assert address == addresses[j]
            w[i, j] = weight
    return w


def check_mixing(w: np.ndarray) -> None:
    np.testing.assert_allclose(w, w.T, atol=1e-12)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert (w >= 0).all()


# ---- joining and assembly ----


def test_assignment_waits_for_every_peer_and_says_how_many_joined() -> None:
    reg = make(RunConfig(nodes=5), FakeClock())
    for i in range(3):
        result = reg.join(i, addr(i), 10)
        assert (result.ready, result.joined, result.expected) == (False, i + 1, 5)
    with pytest.raises(NotReady, match="waiting for peers: 3 of 5 joined"):
        reg.assignment(0)
    assert reg.epoch == 0
    assert {p.state for p in reg.peers()} == {PeerState.JOINED}


def test_the_last_join_assembles_the_run_with_mh_weights_of_the_topology() -> None:
    reg = assembled(nodes=6, topology="regular:3")
    assert reg.epoch == 1
    assert {p.state for p in reg.peers()} == {PeerState.ACTIVE}
    topo = build_topology("regular:3", 6, RunConfig().seed)
    np.testing.assert_allclose(weight_matrix(reg), metropolis_hastings_weights(topo))
    view = reg.assignment(2)
    assert [j for j, _, _ in view.neighbors] == topo.neighbors(2)
    assert view.epoch == 1 and view.settings == reg.settings


def test_a_restarted_peer_rejoins_at_the_same_address_without_a_new_epoch() -> None:
    reg = assembled()
    before = reg.assignment(1)
    result = reg.join(1, addr(1), 500)
    assert result.ready and result.joined == 5 and reg.epoch == 1
    assert reg.assignment(1) == before
    assert reg.peers()[1].num_samples == 500


def test_a_live_id_at_another_address_is_refused_with_the_holder_named() -> None:
    reg = make(RunConfig(nodes=3), FakeClock())
    reg.join(0, addr(0), 1)
    with pytest.raises(AlreadyExists, match=r"node 0 is held by a live peer at 10\.0\.0\.0:7000"):
        reg.join(0, "elsewhere:1", 1)
    assert reg.peers()[0].address == addr(0)


@pytest.mark.parametrize(("node_id", "address", "samples", "message"), [
    (-1, "a:1", 1, r"node ids of this run are 0\.\.2 \(3 nodes\); got -1"),
    (3, "a:1", 1, r"got 3"),
    (0, "", 1, "empty address"),
    (0, "   ", 1, "empty address"),
    (0, "h" * 254 + ":65535", 1, r"260 characters long \('hhh"),
    (0, "a:1", -5, "num_samples"),
    (0, "a:1", 2**64, "num_samples"),
])
def test_bad_joins_are_invalid(node_id: int, address: str, samples: int, message: str) -> None:
    reg = make(RunConfig(nodes=3), FakeClock())
    with pytest.raises(InvalidMessage, match=message):
        reg.join(node_id, address, samples)
    assert reg.peers() == []


def test_ids_that_never_joined_are_not_found() -> None:
    reg = make(RunConfig(nodes=3), FakeClock())
    reg.join(0, addr(0), 1)
    for call in (lambda: reg.heartbeat(1, 0, 0.0, ""), lambda: reg.assignment(1),
                 lambda: reg.leave(1, "draining")):
        with pytest.raises(NotFound, match="node 1 never joined"):
            call()
    with pytest.raises(InvalidMessage):
        reg.heartbeat(7, 0, 0.0, "")


def test_leaving_before_assembly_frees_the_id_and_does_not_count() -> None:
    reg = make(RunConfig(nodes=2), FakeClock())
    reg.join(0, addr(0), 1)
    reg.leave(0, "changed my mind")
    assert reg.join(1, addr(1), 1).ready is False
    assert reg.join(0, "new:1", 1).ready is True
    assert reg.epoch == 1


def test_a_single_node_run_is_alone_with_weight_one() -> None:
    reg = make(RunConfig(nodes=1), FakeClock())
    assert reg.join(0, addr(0), 1).ready
    view = reg.assignment(0)
    assert view.neighbors == [] and view.self_weight == 1.0


# ---- leases, expiry and leaving ----


def test_a_silent_peer_expires_and_the_ring_closes_around_it() -> None:
    clock = FakeClock()
    reg = assembled(nodes=5, topology="ring", clock=clock)
    clock.t += LEASE - 1
    for i in (0, 1, 3, 4):
        reg.heartbeat(i, 7, 0.5, "ok")
    assert reg.expire() == []
    clock.t += 1.5  # node 2 silent for LEASE + 0.5 s; the others for 1.5 s
    assert reg.expire() == [2]
    assert reg.epoch == 2 and reg.peers()[2].state is PeerState.EXPIRED
    assert [j for j, _, _ in reg.assignment(1).neighbors] == [0, 3]  # 1 and 3 bypass 2
    assert [j for j, _, _ in reg.assignment(3).neighbors] == [1, 4]
    w = weight_matrix(reg)
    check_mixing(w)
    # MH on the ring of the four others: every degree is 2 again.
    assert w[1, 3] == pytest.approx(1 / 3) and w[1, 1] == pytest.approx(1 / 3)
    assert reg.assignment(2).neighbors == [] and reg.assignment(2).self_weight == 1.0
    assert reg.expire() == [] and reg.epoch == 2


def test_expiry_skips_its_scan_only_while_no_lease_can_have_run_out() -> None:
    """expire() scans the peers only once the earliest lease end has passed (a heartbeat only
    pushes a lease later), so staggered heartbeats must still expire each peer on time."""
    clock = FakeClock()
    reg = assembled(nodes=5, topology="ring", clock=clock)
    start = clock.t
    clock.t = start + 5
    reg.heartbeat(0, 1, 0.5, "ok")  # node 0's lease now ends at start + 15
    clock.t = start + 9
    assert reg.expire() == []  # the earliest end is start + 10: no scan before it
    reg.heartbeat(1, 1, 0.5, "ok")  # node 1's ends at start + 19
    clock.t = start + 10.5
    assert reg.expire() == [2, 3, 4]
    clock.t = start + 14.9
    assert reg.expire() == []
    clock.t = start + 15.1
    assert reg.expire() == [0]
    reg.heartbeat(0, 2, 0.5, "back")  # a revival: a lease that ends before node 1's
    clock.t = start + 19.05
    assert reg.expire() == [1]
    clock.t = start + 25.2
    assert reg.expire() == [0] and reg.epoch == 6  # assembly, 3 expiries, 1 revival


def test_a_call_after_close_is_unavailable_not_a_database_error(tmp_path: Path) -> None:
    """A call still running when the server's stop grace ran out meets a closed registry: the
    caller gets UNAVAILABLE (retry once the bootstrap is back), not INTERNAL."""
    reg = assembled(nodes=3, db=tmp_path / "bootstrap.sqlite")
    reg.close()
    with pytest.raises(Unavailable):
        reg.heartbeat(0, 1, 0.5, "ok")
    with pytest.raises(Unavailable):
        reg.leave(1, "draining")


def test_a_dead_cut_vertex_is_bypassed_and_a_return_restores_the_original(
        tmp_path: Path) -> None:
    graph = tmp_path / "path.txt"
    graph.write_text("0 1\n1 2\n2 3\n")  # a path: 1 and 2 are cut vertices
    clock = FakeClock()
    reg = make(RunConfig(nodes=4, topology=f"file:{graph}"), clock)
    for i in range(4):
        reg.join(i, addr(i), 1)
    original = weight_matrix(reg)
    clock.t += LEASE - 1
    for i in (0, 2, 3):
        reg.heartbeat(i, 3, 0.5, "")
    clock.t += 2
    assert reg.expire() == [1]
    assert [j for j, _, _ in reg.assignment(0).neighbors] == [2]
    check_mixing(weight_matrix(reg))
    assert reg.heartbeat(1, 3, 0.5, "back") == (3, LEASE)
    assert reg.peers()[1].returns == 1
    assert [j for j, _, _ in reg.assignment(0).neighbors] == [1]
    np.testing.assert_array_equal(weight_matrix(reg), original)


def test_a_heartbeat_revives_an_expired_peer() -> None:
    clock = FakeClock()
    reg = assembled(clock=clock)
    full = weight_matrix(reg)
    clock.t += LEASE + 1
    assert reg.expire() == [0, 1, 2, 3, 4] and reg.epoch == 2
    assert reg.heartbeat(3, 12, 0.25, "back") == (3, LEASE)
    assert reg.peers()[3].state is PeerState.ACTIVE and reg.peers()[3].round == 12
    for i in (0, 1, 2, 4):
        reg.heartbeat(i, 12, 0.25, "back")
    assert reg.epoch == 7
    np.testing.assert_array_equal(weight_matrix(reg), full)


def test_leases_start_at_assembly_not_at_join() -> None:
    clock = FakeClock()
    reg = make(RunConfig(nodes=2), clock)
    reg.join(0, addr(0), 1)
    clock.t += 10 * LEASE  # node 0 waits a long time for node 1, without heartbeats
    assert reg.expire() == []
    reg.join(1, addr(1), 1)
    clock.t += LEASE - 1
    assert reg.expire() == []


def test_leave_bumps_the_epoch_once_and_a_rejoin_restores_the_graph() -> None:
    reg = assembled(nodes=4, topology="full")
    full = weight_matrix(reg)
    reg.leave(2, "draining")
    assert reg.epoch == 2 and reg.peers()[2].state is PeerState.LEFT
    assert reg.peers()[2].health == "left: draining"
    reg.leave(2, "again")
    assert reg.epoch == 2
    w = weight_matrix(reg)
    check_mixing(w)
    assert all(j != 2 for i in (0, 1, 3) for j, _, _ in reg.assignment(i).neighbors)
    with pytest.raises(NotFound, match="left the run"):
        reg.heartbeat(2, 0, 0.0, "")
    assert reg.join(2, "moved:9", 1).ready
    assert reg.epoch == 3 and reg.peers()[2].state is PeerState.ACTIVE
    np.testing.assert_array_equal(weight_matrix(reg)[[0, 1, 3]], full[[0, 1, 3]])
    assert reg.assignment(0).neighbors[1].address == "moved:9"


def test_an_expired_id_may_be_taken_from_another_address() -> None:
    clock = FakeClock()
    reg = assembled(nodes=3, clock=clock)
    clock.t += LEASE + 1
    reg.expire()
    reg.join(1, "replacement:1", 1)
    assert reg.peers()[1].address == "replacement:1" and reg.epoch == 3


def test_heartbeat_validates_the_round() -> None:
    reg = assembled(nodes=2)
    with pytest.raises(InvalidMessage, match="round"):
        reg.heartbeat(0, -1, 0.0, "")


# ---- waiting for changes ----


def test_wait_for_change_returns_at_once_times_out_or_wakes_on_a_change() -> None:
    reg = assembled(nodes=3)
    assert reg.wait_for_change(0, timeout=5) == 1
    assert reg.wait_for_change(1, timeout=0.01) == 1
    seen: list[int] = []
    waiter = threading.Thread(target=lambda: seen.append(reg.wait_for_change(1, timeout=5)))
    waiter.start()
    reg.leave(0, "draining")
    waiter.join(timeout=5)
    assert seen == [2]


def test_listeners_hear_every_epoch_bump_and_nothing_else() -> None:
    clock = FakeClock()
    reg = make(RunConfig(nodes=3, topology="ring"), clock, None)
    heard: list[int] = []
    reg.on_epoch(heard.append)
    for i in range(3):
        reg.join(i, addr(i), 100)
    assert heard == [1]  # assembly
    reg.heartbeat(0, 1, 0.5, "")  # a renewed lease changes no epoch
    reg.leave(1, "draining")
    reg.join(1, addr(1), 100)
    clock.t += LEASE + 1
    reg.expire()  # all three at once: one bump
    assert heard == [1, 2, 3, 4] and reg.epoch == 4


def test_the_reaper_expires_leases_with_nobody_heartbeating() -> None:
    clock = FakeClock()
    reg = assembled(nodes=3, clock=clock)
    clock.t += LEASE + 1
    reg.start_reaper(interval=0.005)
    try:
        assert reg.wait_for_change(1, timeout=5) == 2
    finally:
        reg.stop_reaper()
    assert {p.state for p in reg.peers()} == {PeerState.EXPIRED}


# ---- persistence ----


def test_a_reopened_registry_resumes_peers_epoch_and_assignments(tmp_path: Path) -> None:
    db = tmp_path / "bootstrap.sqlite"
    clock = FakeClock()
    reg = assembled(nodes=5, topology="ring", clock=clock, db=db)
    reg.heartbeat(0, 3, float("nan"), "ok")
    reg.heartbeat(1, 4, 0.75, "slow neighbor 2")
    reg.leave(4, "draining")
    before = (reg.epoch, reg.peers(), [reg.assignment(i) for i in range(5)])
    reg.close()

    reopened = make(RunConfig(nodes=5, topology="ring"), clock, db)
    after = (reopened.epoch, reopened.peers(), [reopened.assignment(i) for i in range(5)])
    assert after[0] == before[0] and after[2] == before[2]
    assert [(p.node_id, p.address, p.state, p.round, p.health) for p in after[1]] == \
        [(p.node_id, p.address, p.state, p.round, p.health) for p in before[1]]
    assert math.isnan(after[1][0].loss) and after[1][1].loss == 0.75
    reopened.close()


def stored_rounds(db: Path) -> dict[int, int]:
    """Each peer's round as the state file holds it (another connection: what a crash leaves)."""
    with closing(sqlite3.connect(db)) as con:
        return dict(con.execute("SELECT node_id, round FROM peers").fetchall())


def test_heartbeats_are_written_within_flush_seconds_and_at_close(tmp_path: Path) -> None:
    db = tmp_path / "bootstrap.sqlite"
    clock = FakeClock()
    reg = assembled(nodes=3, clock=clock, db=db)
    reg.heartbeat(0, 7, 0.5, "ok")
    reg.heartbeat(1, 8, 0.5, "ok")
    assert stored_rounds(db) == {0: 0, 1: 0, 2: 0}  # in memory only, for now
    assert [p.round for p in reg.peers()] == [7, 8, 0]  # ... where every answer reads it
    clock.t += FLUSH_SECONDS
    reg.heartbeat(2, 9, 0.5, "ok")  # the first call after FLUSH_SECONDS writes them all
    assert stored_rounds(db) == {0: 7, 1: 8, 2: 9}
    reg.heartbeat(0, 10, 0.5, "ok")
    clock.t += FLUSH_SECONDS
    reg.expire()  # the reaper's call: nobody else calls
    assert stored_rounds(db) == {0: 10, 1: 8, 2: 9}
    reg.heartbeat(1, 11, 0.5, "ok")
    reg.leave(2, "draining")  # another commit takes the heartbeats along
    assert stored_rounds(db) == {0: 10, 1: 11, 2: 9}
    reg.heartbeat(0, 12, 0.5, "ok")
    reg.close()
    assert stored_rounds(db) == {0: 12, 1: 11, 2: 9}


def test_changed_assignments_names_the_rows_that_differ_and_the_neighbors_of_a_move() -> None:
    reg = assembled(nodes=6, topology="ring")
    before = reg.mixing()
    assert before is not None and before[1] == tuple(addr(i) for i in range(6))
    assert changed_assignments(before, before).tolist() == []
    reg.leave(3, "draining")  # 3 alone; 2 and 4 joined by a bypass; degrees stay 2
    after = reg.mixing()
    assert after is not None
    assert changed_assignments(before, after).tolist() == [2, 3, 4]
    moved = (after[0], tuple("10.9.9.9:1" if i == 0 else a for i, a in enumerate(after[1])))
    assert changed_assignments(after, moved).tolist() == [0, 1, 5]  # 0 and its neighbors
    assert make(RunConfig(nodes=2), FakeClock()).mixing() is None  # before assembly


def test_counters_survive_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "bootstrap.sqlite"
    clock = FakeClock()
    reg = assembled(nodes=3, clock=clock, db=db)
    reg.leave(2, "draining")
    reg.join(2, addr(2), 1, resumed=True, checkpoint_round=7)
    reg.heartbeat(0, 8, 0.5, "", unreachable=[1])
    reg.close()
    reopened = make(RunConfig(nodes=3), clock, db)
    assert counters(reopened) == [(0, 0, 0), (0, 0, 1), (1, 1, 0)]
    reopened.close()


# The peers table as the first bootstrap wrote it, before the counters existed.
FIRST_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE peers (
    node_id INTEGER PRIMARY KEY, address TEXT NOT NULL, num_samples INTEGER NOT NULL,
    state TEXT NOT NULL, round INTEGER NOT NULL, loss REAL, health TEXT NOT NULL, last_seen REAL
);
"""


def test_a_state_file_of_the_first_schema_opens_with_zero_counters(tmp_path: Path) -> None:
    new, old = tmp_path / "new.sqlite", tmp_path / "old.sqlite"
    clock = FakeClock()
    reg = assembled(nodes=3, clock=clock, db=new)
    reg.heartbeat(1, 9, 0.25, "ok")
    reg.leave(2, "draining")
    before = reg.peers()
    reg.close()
    # Write the same run in the first schema: its meta as is, the peers without the counters.
    with closing(sqlite3.connect(new)) as src, closing(sqlite3.connect(old)) as dst, dst:
        dst.executescript(FIRST_SCHEMA)
        dst.executemany("INSERT INTO meta VALUES (?, ?)", src.execute("SELECT * FROM meta"))
        dst.executemany("INSERT INTO peers VALUES (?, ?, ?, ?, ?, ?, ?, ?)", src.execute(
            "SELECT node_id, address, num_samples, state, round, loss, health, last_seen "
            "FROM peers"))
    reopened = make(RunConfig(nodes=3), clock, old)
    assert reopened.peers() == before and reopened.epoch == 2
    assert counters(reopened) == [(0, 0, 0)] * 3
    reopened.join(2, addr(2), 1, resumed=True, checkpoint_round=9)
    reopened.close()
    again = make(RunConfig(nodes=3), clock, old)
    assert counters(again)[2] == (1, 1, 0) and again.epoch == 3
    again.close()


def test_a_restarted_bootstrap_gives_every_peer_two_leases_to_come_back(tmp_path: Path) -> None:
    db = tmp_path / "bootstrap.sqlite"
    clock = FakeClock()
    assembled(nodes=3, clock=clock, db=db).close()
    clock.t += 5 * LEASE  # the bootstrap was down; nobody could heartbeat
    reg = make(RunConfig(nodes=3), clock, db)
    assert reg.expire() == []
    clock.t += 2 * LEASE - 1
    assert reg.expire() == []
    reg.heartbeat(0, 1, 0.1, "")
    clock.t += 2  # two leases and a second since the restart
    assert reg.expire() == [1, 2]
    reg.close()


def test_a_state_file_of_another_run_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "bootstrap.sqlite"
    assembled(nodes=3, db=db).close()
    with pytest.raises(ConfigError, match=r"another run.*nodes=3 there, 4 here.*new --state"):
        make(RunConfig(nodes=4), FakeClock(), db)
    # Each process's own settings do not make another run.
    make(RunConfig(nodes=3, device="cpu", data_dir="/elsewhere"), FakeClock(), db).close()


def test_a_file_that_is_not_a_database_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("this is not SQLite " * 100)
    with pytest.raises(ConfigError, match="--state"):
        make(RunConfig(nodes=2), FakeClock(), bad)


def test_the_topology_is_checked_when_the_registry_opens() -> None:
    with pytest.raises(ConfigError, match="torus"):
        make(RunConfig(nodes=7, topology="torus"), FakeClock())
    with pytest.raises(ConfigError, match="lease"):
        Registry(RunConfig(), None, lease_seconds=0)


def test_the_persisted_topology_is_used_not_rebuilt(tmp_path: Path) -> None:
    """A file: topology need not be readable on restart: the adjacency lives in the state."""
    graph = tmp_path / "graph.txt"
    graph.write_text("0 1\n1 2\n")
    db = tmp_path / "bootstrap.sqlite"
    settings = RunConfig(nodes=3, topology=f"file:{graph}")
    reg = make(settings, FakeClock(), db)
    for i in range(3):
        reg.join(i, addr(i), 1)
    reg.close()
    graph.unlink()
    reopened = make(settings, FakeClock(), db)
    assert [j for j, _, _ in reopened.assignment(1).neighbors] == [0, 2]
    reopened.close()


def test_a_full_graph_loses_its_dead_and_gains_nothing() -> None:
    reg = assembled(nodes=6, topology="full")
    reg.leave(0, "draining")
    reg.leave(5, "draining")
    live = np.ones((6, 6), dtype=bool) & ~np.eye(6, dtype=bool)
    live[[0, 5], :] = live[:, [0, 5]] = False
    expected = metropolis_hastings_weights(Topology(6, "full", live))
    np.testing.assert_allclose(weight_matrix(reg), expected)


def test_assignments_are_mh_on_the_repaired_graph() -> None:
    clock = FakeClock()
    reg = assembled(nodes=9, topology="torus", clock=clock)
    reg.leave(4, "draining")
    reg.leave(5, "draining")
    live = np.array([i not in (4, 5) for i in range(9)])
    expected = metropolis_hastings_weights(repair(build_topology("torus", 9, 0), live))
    np.testing.assert_allclose(weight_matrix(reg), expected)


# ---- counters: returns, resumes, unreachable reports ----


def counters(reg: Registry) -> list[tuple[int, int, int]]:
    return [(p.returns, p.resumes, p.unreachable_reports) for p in reg.peers()]


def test_returns_count_each_way_back_into_the_run() -> None:
    clock = FakeClock()
    reg = make(RunConfig(nodes=3), clock)
    reg.join(0, addr(0), 1)
    reg.leave(0, "changed my mind")
    reg.join(0, addr(0), 1)  # before assembly: never was in the run, so not a return
    reg.join(1, addr(1), 1)
    reg.join(2, addr(2), 1)
    reg.join(2, addr(2), 1)  # a restart while live: not a return either
    assert counters(reg) == [(0, 0, 0)] * 3
    clock.t += LEASE + 1
    assert reg.expire() == [0, 1, 2]
    reg.heartbeat(0, 5, 0.1, "")  # a heartbeat after expiry
    assert [p.state for p in reg.peers()] == [PeerState.ACTIVE, PeerState.EXPIRED,
                                              PeerState.EXPIRED]
    reg.join(1, "new:1", 1)  # an expired id rejoining from elsewhere
    reg.leave(2, "draining")
    reg.join(2, addr(2), 1)
    assert counters(reg) == [(1, 0, 0), (1, 0, 0), (1, 0, 0)]
    reg.leave(2, "again")
    reg.join(2, addr(2), 1)
    assert reg.peers()[2].returns == 2


def test_resumes_count_joins_from_a_checkpoint(caplog: pytest.LogCaptureFixture) -> None:
    reg = assembled(nodes=3)
    caplog.set_level("INFO", logger="bootstrap.registry")
    reg.join(1, addr(1), 100, resumed=True, checkpoint_round=40)
    reg.join(1, addr(1), 100, resumed=True, checkpoint_round=60)
    reg.join(1, addr(1), 100)
    assert counters(reg) == [(0, 0, 0), (0, 2, 0), (0, 0, 0)]
    assert reg.epoch == 1  # a restart at the same address changes no assignment
    assert "node 1 round 60: resumed from its checkpoint (resume 2)" in caplog.text
    with pytest.raises(InvalidMessage, match="checkpoint_round"):
        reg.join(1, addr(1), 100, resumed=True, checkpoint_round=-1)


def test_unreachable_reports_count_valid_ids_once_per_heartbeat(
        caplog: pytest.LogCaptureFixture) -> None:
    reg = assembled(nodes=4)
    reg.heartbeat(0, 3, 0.5, "", unreachable=[1, 3, 3])
    reg.heartbeat(2, 3, 0.5, "", unreachable=[1])
    reg.heartbeat(1, 3, 0.5, "")
    assert [p.unreachable_reports for p in reg.peers()] == [0, 2, 0, 1]
    assert reg.epoch == 1, "a report is not a death: only a lease decides"
    # Its own id, ids outside the run: logged and skipped; the heartbeat itself succeeds.
    caplog.set_level("WARNING", logger="bootstrap.registry")
    assert reg.heartbeat(0, 4, 0.5, "", unreachable=[0, 9, 2**32 - 1, 2]) == (1, LEASE)
    assert [p.unreachable_reports for p in reg.peers()] == [0, 2, 1, 1]
    assert reg.peers()[0].round == 4
    assert "ignored unreachable neighbor ids [0, 9, 4294967295]" in caplog.text
    # A list longer than the run is cut at the run's size.
    reg.heartbeat(1, 4, 0.5, "", unreachable=[5] * 4 + [0, 2, 3])
    assert [p.unreachable_reports for p in reg.peers()] == [0, 2, 1, 1]
    assert "only the first 4 are counted" in caplog.text


def test_reports_before_assembly_name_only_peers_that_joined() -> None:
    reg = make(RunConfig(nodes=3), FakeClock())
    reg.join(0, addr(0), 1)
    reg.join(1, addr(1), 1)
    reg.heartbeat(0, 0, 0.0, "", unreachable=[1, 2])
    assert [p.unreachable_reports for p in reg.peers()] == [0, 1]


def test_a_peer_that_finished_leaves_without_a_new_epoch(tmp_path: Path) -> None:
    """A finished peer's neighbors are done too; a new epoch would only change the weights of
    nodes still in their last rounds (and break networked == simulated)."""
    reg = Registry(RunConfig(nodes=3, topology="ring"), tmp_path / "s.sqlite")
    for i in range(3):
        reg.join(i, f"h:{i}", 1)
    epoch = reg.epoch
    reg.leave(0, FINISHED)
    assert reg.epoch == epoch and reg.peers()[0].state is PeerState.LEFT
    reg.leave(1, "draining")
    assert reg.epoch == epoch + 1
    reg.close()

"""Membership of a run: who joined, who is alive, who neighbors whom (docs/architecture.md,
"Bootstrap").

The bootstrap's state machine, with no transport in it: bootstrap/servicer.py turns RPCs into
calls here, and tests/unit/test_registry.py drives it with a fake clock. A peer's life:

    (none) --join--> JOINED --all `nodes` ids have joined: the run is assembled--> ACTIVE
    ACTIVE --leave--> LEFT          ACTIVE --no heartbeat for lease_seconds--> EXPIRED
    LEFT, EXPIRED --join--> ACTIVE  EXPIRED --heartbeat--> ACTIVE

The topology epoch is 0 until the run is assembled, 1 at assembly, and grows by one each time the
set of live peers changes afterwards; a peer that sees a higher epoch fetches its new assignment.

Assignments use the run's topology, built once from (topology, nodes, seed), repaired around the
dead (LEFT or EXPIRED) peers by bootstrap.topology.repair: the live peers' induced subgraph plus
bypass edges between the live neighbors of each dead cluster (a ring that loses a node stays a
ring), so the live peers stay connected. The Metropolis-Hastings weights are recomputed on that
graph with its degrees (not merely the dead neighbor's weight handed to the node), so the matrix
stays symmetric and doubly stochastic. The repaired graph is recomputed from the original one at
every epoch, so a peer that comes back gets its original edges and the bypasses go. A dead peer
is told it is alone.

Counters per peer, for ListPeers and `crossgrad status`: `returns` (LEFT or EXPIRED -> ACTIVE,
by a join or a heartbeat), `resumes` (joins from a checkpoint, JoinRequest.resumed) and
`unreachable_reports` (heartbeats of other peers naming it among the neighbors they missed).
Reports are recorded, never acted on: only a lease decides who is dead.

Leases run on the wall clock (time.time), because they are persisted and a monotonic clock means
nothing to the next process. They start at assembly (peers waiting for the others need not
heartbeat) and, after a restart, when the registry is reopened: peers could not heartbeat while
the bootstrap was down, so each gets RESTART_GRACE_LEASES (2) full leases to reach it again.

Persistence: SQLite, a row per peer and a key/value table of run metadata (settings, epoch,
assembled flag, topology adjacency; JSON), committed before each call returns. One lock. Columns
added since the first schema (COUNTERS) are added to an older file when it is opened, with 0.
The file is in WAL mode. Every change of membership or epoch is synced to disk before its call
returns (synchronous=FULL). A plain heartbeat (a renewed lease, a round, a loss) changes the
peer in memory only; the peers it changed are written together, not synced (synchronous=NORMAL),
at most FLUSH_SECONDS later (by the next heartbeat or expire() after that, the reaper's
included), with any other commit, and at close. A crash can take back the last second of
heartbeats, which costs nothing, since a reopened registry grants every lease afresh. Syncing
each heartbeat held the lock for 1-8 ms, which capped a bootstrap at some 130 heartbeats a
second, and a commit per heartbeat still took a sixth of a busy bootstrap's CPU
(docs/benchmarks.md, "Busy bootstrap").

Expiry is checked before every liveness answer, so it must not cost a scan of every peer each
time: the registry keeps the earliest moment a lease can run out (a heartbeat only pushes a
lease later) and scans only once that moment has passed, or after a change of membership.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

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

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0  # heartbeats are written at most this long after they arrive
LOCAL_FIELDS = ("data_dir", "device")  # each process's own business, not part of the run
MAX_UINT = 2**63 - 1  # SQLite integers are signed 64-bit; the proto's uint64 may exceed them
MAX_NOTE = 256  # characters of a health note or leave reason kept
# Characters of a peer's host:port: a DNS name has at most 253. A longer address is refused, not
# cut: it is every neighbor's way to the peer, and it travels in every Assignment and ListPeers
# answer, where one of ~8 MiB (a Join fits it under the message limit) would push each answer
# over the limit and leave the peer's neighbors and every `crossgrad status` without one.
MAX_ADDRESS = 253 + len(":65535")
FINISHED = "done"  # the Leave reason of a peer that ran every round
RESTART_GRACE_LEASES = 2  # leases a peer has to come back after the bootstrap restarted

# The first schema; COUNTERS are added to it (to an older file too) by _migrate.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS peers (
    node_id INTEGER PRIMARY KEY, address TEXT NOT NULL, num_samples INTEGER NOT NULL,
    state TEXT NOT NULL, round INTEGER NOT NULL, loss REAL, health TEXT NOT NULL, last_seen REAL
);
"""
COUNTERS = ("returns", "resumes", "unreachable_reports")  # PeerView fields, peers columns
PEER_COLUMNS = ("node_id", "address", "num_samples", "state", "round", "loss", "health",
                "last_seen", *COUNTERS)


class PeerState(str, Enum):
    JOINED = "JOINED"  # joined; the run is not assembled yet
    ACTIVE = "ACTIVE"  # in the run, lease alive
    LEFT = "LEFT"  # said goodbye (drained); may join again
    EXPIRED = "EXPIRED"  # lease ran out; a heartbeat or a join brings it back


@dataclass(frozen=True)
class PeerView:
    """One peer as the registry knows it (an immutable snapshot)."""

    node_id: int
    address: str  # host:port of its Peer service
    num_samples: int
    state: PeerState
    round: int  # last reported round
    loss: float  # last reported training loss (nan before any)
    health: str  # last health note, or "left: REASON"
    last_seen: float  # wall-clock time of the last join or heartbeat
    returns: int = 0  # LEFT or EXPIRED -> ACTIVE transitions (a rejoin, a late heartbeat)
    resumes: int = 0  # joins from a checkpoint (JoinRequest.resumed)
    unreachable_reports: int = 0  # times another peer's heartbeat named it unreachable

    @property
    def live(self) -> bool:
        return self.state in (PeerState.JOINED, PeerState.ACTIVE)


class Neighbor(NamedTuple):
    node_id: int
    address: str
    weight: float  # pi_il


@dataclass(frozen=True)
class AssignmentView:
    """A node's neighbors and mixing weights at one topology epoch."""

    node_id: int
    neighbors: list[Neighbor]
    self_weight: float  # pi_ii = 1 - sum of the neighbors' weights
    epoch: int
    settings: RunConfig


@dataclass(frozen=True)
class JoinResult:
    ready: bool  # the run is assembled: assignments exist
    joined: int  # live peers
    expected: int  # settings.nodes


def shared_settings(settings: RunConfig) -> dict[str, Any]:
    """The settings that define a run (what every node must agree on, and what RunSettings
    carries); data_dir and device are each process's own."""
    return {k: v for k, v in dataclasses.asdict(settings).items() if k not in LOCAL_FIELDS}


class Registry:
    """The bootstrap's membership state, persisted in SQLite at db_path (None: in memory)."""

    def __init__(self, settings: RunConfig, db_path: str | Path | None, *,
                 lease_seconds: float = 15.0, clock: Callable[[], float] = time.time) -> None:
        if not (lease_seconds > 0 and math.isfinite(lease_seconds)):
            raise ConfigError(f"--lease-seconds must be a positive number; got {lease_seconds}")
        self.settings = settings
        self.lease_seconds = float(lease_seconds)
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._closed = False
        self._expiry_due = 0.0  # no lease runs out before this; 0: scan at the next expire()
        self._reaper: tuple[threading.Thread, threading.Event] | None = None
        self._listeners: list[Callable[[int], None]] = []
        self._cache: tuple[int, Topology, np.ndarray] | None = None  # epoch, live graph, MH
        self._peers: dict[int, PeerView] = {}
        self._unsaved: set[int] = set()  # peers changed by heartbeats since the last commit
        self._saved_at = clock()  # when the last commit was made
        self._path = ":memory:" if db_path is None else str(db_path)
        try:
            self._db = sqlite3.connect(self._path, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")  # one sync per commit, not four
            self._db.executescript(_SCHEMA)
            _migrate(self._db)
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open the bootstrap state {self._path}: {exc}; "
                              f"pass a writable --state path") from None
        self._opened_at = clock()
        try:
            self._resume(meta) if "settings" in meta else self._start()
        except BaseException:
            self._db.close()  # another run's file, or a bad topology: release it
            raise

    def _start(self) -> None:
        """A new run: build the topology now, so a bad spec fails at start, not at assembly."""
        s = self.settings
        self._topology = build_topology(s.topology, s.nodes, s.seed)
        self._epoch, self._assembled, self._assembled_at = 0, False, 0.0
        graph = {"spec": self._topology.spec, "adjacency": self._topology.adjacency.tolist()}
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [
                ("settings", json.dumps(shared_settings(s), sort_keys=True)),
                ("topology", json.dumps(graph)),
                *_meta_rows(0, False, 0.0),
            ])

    def _resume(self, meta: dict[str, str]) -> None:
        """Reopen a run; settings that differ mean the file belongs to another run."""
        stored = json.loads(meta["settings"])
        given = shared_settings(self.settings)
        diff = [f"{k}={stored.get(k)!r} there, {given.get(k)!r} here"
                for k in sorted(set(stored) | set(given)) if stored.get(k) != given.get(k)]
        if diff:
            raise ConfigError(f"the bootstrap state {self._path} belongs to another run "
                              f"({'; '.join(diff)}); pass a new --state path to start a new "
                              f"run, or the same settings to resume that one")
        # Each peer gets RESTART_GRACE_LEASES leases to reach the bootstrap again: its retries
        # back off with jitter and its channel reconnects within a second or so.
        self._opened_at += (RESTART_GRACE_LEASES - 1) * self.lease_seconds
        graph = json.loads(meta["topology"])
        adj = np.array(graph["adjacency"], dtype=bool)  # (n, n)
        self._topology = Topology(len(adj), graph["spec"], adj)
        self._epoch, self._assembled = int(meta["epoch"]), meta["assembled"] == "1"
        self._assembled_at = float(meta["assembled_at"])
        rows = self._db.execute(f"SELECT {', '.join(PEER_COLUMNS)} FROM peers").fetchall()
        self._peers = {r[0]: PeerView(r[0], r[1], r[2], PeerState(r[3]), r[4],
                                      math.nan if r[5] is None else r[5], r[6], r[7], *r[8:])
                       for r in rows}
        log.info("bootstrap resumed %s: epoch %d, %d of %d peers live", self._path, self._epoch,
                 self._live_count(), self.settings.nodes)

    # ---- the state machine (public calls take the lock; _helpers expect it held) ----

    @property
    def epoch(self) -> int:
        with self._lock:
            return self._epoch

    def now(self) -> float:  # the registry's clock, for "last seen N s ago"
        return self._clock()

    def join(self, node_id: int, address: str, num_samples: int, resumed: bool = False,
             checkpoint_round: int = 0) -> JoinResult:
        """Register a peer, or re-register a restarted one; assembles the run with the last.
        `resumed`: the peer restarted from its checkpoint of `checkpoint_round` (counted)."""
        self._check_id(node_id, "Join")
        address = address.strip()
        if not address:
            raise InvalidMessage(f"Join needs the host:port at which neighbors reach node "
                                 f"{node_id}; got an empty address")
        if len(address) > MAX_ADDRESS:
            raise InvalidMessage(f"Join: the address of node {node_id} is {len(address)} "
                                 f"characters long ({address[:40]!r}...); a host:port has at "
                                 f"most {MAX_ADDRESS}")
        if not 0 <= num_samples <= MAX_UINT:
            raise InvalidMessage(f"num_samples must be in 0..{MAX_UINT}; got {num_samples}")
        if not 0 <= checkpoint_round <= MAX_UINT:
            raise InvalidMessage(f"checkpoint_round must be in 0..{MAX_UINT}; got "
                                 f"{checkpoint_round}")
        with self._lock:
            now = self._clock()
            old = self._peers.get(node_id)
            if old is not None and old.live and old.address != address:
                wait = (f", or wait {self.lease_seconds:g} s for its lease to expire"
                        if self._assembled else "")
                raise AlreadyExists(
                    f"node {node_id} is held by a live peer at {old.address} (last seen "
                    f"{now - old.last_seen:.1f} s ago), so {address} cannot take it; use "
                    f"another id, or Leave it first{wait}")
            revived = self._assembled and (old is None or not old.live)
            peer = PeerView(node_id, address, num_samples,
                            PeerState.ACTIVE if self._assembled else PeerState.JOINED,
                            old.round if old else 0, old.loss if old else math.nan, "", now,
                            returns=(old.returns if old else 0) + (revived and old is not None),
                            resumes=(old.resumes if old else 0) + bool(resumed),
                            unreachable_reports=old.unreachable_reports if old else 0)
            if not self._assembled and self._live_count(extra=peer) == self.settings.nodes:
                # The last expected peer: everyone becomes ACTIVE and epoch 1 begins.
                everyone = [replace(p, state=PeerState.ACTIVE)
                            for p in {**self._peers, node_id: peer}.values() if p.live]
                self._save(everyone, bump=True, assembled_at=now)
            else:
                self._save([peer], bump=revived)
            log.info("node %d joined from %s (%d of %d live, epoch %d)", node_id, address,
                     self._live_count(), self.settings.nodes, self._epoch)
            if resumed:
                log.info("node %d round %d: resumed from its checkpoint (resume %d)", node_id,
                         checkpoint_round, peer.resumes)
            return JoinResult(self._assembled, self._live_count(), self.settings.nodes)

    def heartbeat(self, node_id: int, round: int, loss: float, health: str,
                  unreachable: Iterable[int] = ()) -> tuple[int, float]:
        """Renew the lease and record progress; revives an EXPIRED peer. `unreachable`: the
        neighbors whose answers the peer missed since its last heartbeat, each counted once
        (ids that are not another peer of the run are logged and skipped). (epoch, lease)"""
        self._check_id(node_id, "Heartbeat")
        if not 0 <= round <= MAX_UINT:
            raise InvalidMessage(f"round must be in 0..{MAX_UINT}; got {round}")
        with self._lock:
            old = self._known(node_id)
            if old.state is PeerState.LEFT:
                raise NotFound(f"node {node_id} left the run ({old.health}); Join again to "
                               f"come back")
            revived = old.state is PeerState.EXPIRED
            peer = replace(old, state=PeerState.ACTIVE if revived else old.state, round=round,
                           loss=float(loss), health=health[:MAX_NOTE], last_seen=self._clock(),
                           returns=old.returns + revived)
            reported = [replace(p, unreachable_reports=min(p.unreachable_reports + 1, MAX_UINT))
                        for p in self._reported(node_id, round, unreachable)]
            if revived or reported:
                self._save([peer, *reported], bump=revived, durable=revived)
            else:  # written within FLUSH_SECONDS (the module's "Persistence")
                self._check_open()
                self._peers[node_id] = peer
                self._unsaved.add(node_id)
                self._flush(peer.last_seen)
            if revived:
                log.warning("node %d round %d: heartbeat after its lease expired; back in the "
                            "run at epoch %d", node_id, round, self._epoch)
            return self._epoch, self.lease_seconds

    def assignment(self, node_id: int) -> AssignmentView:
        """Neighbors and MH weights of node_id over the graph repaired around the dead peers,
        at the current epoch."""
        self._check_id(node_id, "GetAssignment")
        with self._lock:
            self._known(node_id)
            if not self._assembled:
                raise NotReady(f"waiting for peers: {self._live_count()} of "
                               f"{self.settings.nodes} joined; assignments exist once all have "
                               f"(WatchAssignment delivers it then)")
            graph, weights = self._live_graph()
            neighbors = [Neighbor(j, self._peers[j].address, float(weights[node_id, j]))
                         for j in graph.neighbors(node_id)]
            return AssignmentView(node_id, neighbors, float(weights[node_id, node_id]),
                                  self._epoch, self.settings)

    def mixing(self) -> Mixing | None:
        """Every node's assignment at once, for telling whose changed: the MH weights over the
        repaired graph (n, n; shared, read only: a new epoch makes a new array) and each node's
        address ("" before it joined). None before the run is assembled."""
        with self._lock:
            if not self._assembled:
                return None
            _, weights = self._live_graph()
            n = self._topology.n
            peers = self._peers
            return weights, tuple(peers[i].address if i in peers else "" for i in range(n))

    def leave(self, node_id: int, reason: str) -> None:
        """A peer leaves (drained, or done). Idempotent; bumps the epoch if it was live,
        except for a peer that finished its rounds (reason FINISHED): it left only once its
        neighbors were done too, and a new epoch would change the mixing weights of nodes still
        in their last rounds, so a run without faults would no longer equal the simulation."""
        self._check_id(node_id, "Leave")
        with self._lock:
            old = self._known(node_id)
            if old.state is PeerState.LEFT:
                return
            note = f"left: {reason or 'no reason given'}"[:MAX_NOTE]
            self._save([replace(old, state=PeerState.LEFT, health=note)],
                       bump=self._assembled and old.live and reason != FINISHED)
            log.info("node %d round %d %s (epoch %d)", node_id, old.round, note, self._epoch)

    def expire(self, now: float | None = None) -> list[int]:
        """Mark ACTIVE peers whose lease ran out EXPIRED (one epoch bump for all); their ids."""
        with self._lock:
            if not self._assembled:
                return []
            now = self._clock() if now is None else now
            self._flush(now)
            if now <= self._expiry_due:
                return []
            floor = max(self._assembled_at, self._opened_at)
            ends = {p.node_id: max(p.last_seen, floor) + self.lease_seconds
                    for p in self._peers.values() if p.state is PeerState.ACTIVE}
            dead = [replace(self._peers[i], state=PeerState.EXPIRED)
                    for i, end in ends.items() if end < now]
            self._expiry_due = min((end for end in ends.values() if end >= now),
                                   default=math.inf)
            if dead:
                self._save(dead, bump=True)
                for p in dead:
                    log.warning("node %d round %d: no heartbeat for %.1f s, lease expired "
                                "(epoch %d)", p.node_id, p.round, now - p.last_seen, self._epoch)
            return [p.node_id for p in dead]

    def peers(self) -> list[PeerView]:
        with self._lock:
            return [self._peers[i] for i in sorted(self._peers)]

    def wait_for_change(self, epoch: int, timeout: float | None) -> int:
        """Block until the epoch differs from `epoch` or timeout; the epoch (Unavailable once
        closed). For a thread; an event loop listens with on_epoch instead."""
        with self._changed:
            self._changed.wait_for(lambda: self._epoch != epoch or self._closed, timeout)
            if self._closed:
                raise Unavailable("the bootstrap is stopping; watch again once it is back")
            return self._epoch

    def on_epoch(self, listener: Callable[[int], None]) -> None:
        """Call `listener(epoch)` at every epoch bump, from whichever thread made it (a call's,
        the reaper's), with the registry's lock held: it must be quick and must not call back
        into the registry (the bootstrap's servicer hands it to its event loop)."""
        with self._lock:
            self._listeners.append(listener)

    # ---- the reaper: expiry without anybody heartbeating ----

    def start_reaper(self, interval: float | None = None) -> None:
        """A daemon thread calling expire() every `interval` s (default a quarter lease), so
        WatchAssignment subscribers learn of dead peers even when nobody heartbeats (its epoch
        bumps reach them through on_epoch)."""
        if self._reaper is not None:
            return
        stop = threading.Event()
        period = self.lease_seconds / 4 if interval is None else interval

        def reap() -> None:
            while not stop.wait(period):
                try:
                    self.expire()
                except sqlite3.Error:
                    log.exception("bootstrap reaper: could not expire leases")

        self._reaper = (threading.Thread(target=reap, name="bootstrap-reaper", daemon=True), stop)
        self._reaper[0].start()

    def stop_reaper(self) -> None:
        if self._reaper is not None:
            self._reaper[1].set()
            self._reaper[0].join()
            self._reaper = None

    def close(self) -> None:
        """Stop the reaper, wake every waiter, release the database."""
        self.stop_reaper()
        with self._changed:
            self._flush(self._clock(), due=False)
            self._closed = True
            self._changed.notify_all()
            self._db.close()

    # ---- helpers (lock held) ----

    def _check_id(self, node_id: int, call: str) -> None:
        n = self.settings.nodes
        if isinstance(node_id, bool) or not 0 <= node_id < n:
            raise InvalidMessage(f"{call}: node ids of this run are 0..{n - 1} "
                                 f"({n} nodes); got {node_id}")

    def _known(self, node_id: int) -> PeerView:
        peer = self._peers.get(node_id)
        if peer is None:
            raise NotFound(f"node {node_id} never joined this run; Join first")
        return peer

    def _reported(self, node_id: int, round: int, ids: Iterable[int]) -> list[PeerView]:
        """The peers named in node_id's unreachable list: known, not node_id, each once. The
        list is cut at the run's size: a longer one repeats ids or names none of the run."""
        n = self.settings.nodes
        ids = list(itertools.islice(ids, n + 1))
        if len(ids) > n:
            log.warning("node %d round %d: more unreachable neighbors reported than the run's "
                        "%d nodes; only the first %d are counted", node_id, round, n, n)
            ids = ids[:n]
        bad = [j for j in ids if j == node_id or j not in self._peers]
        if bad:
            log.warning("node %d round %d: ignored unreachable neighbor ids %s (expected ids "
                        "0..%d of peers that joined, other than its own)", node_id, round,
                        sorted(set(bad)), n - 1)
        return [self._peers[j] for j in sorted(set(ids) - set(bad))]

    def _live_count(self, extra: PeerView | None = None) -> int:
        peers = self._peers if extra is None else {**self._peers, extra.node_id: extra}
        return sum(p.live for p in peers.values())

    def _live_graph(self) -> tuple[Topology, np.ndarray]:
        """The topology repaired around the dead peers and its MH weights, cached per epoch
        (every change of the live set after assembly bumps the epoch)."""
        if self._cache is None or self._cache[0] != self._epoch:
            n = self._topology.n
            live = np.array([i in self._peers and self._peers[i].live for i in range(n)])  # (n,)
            graph = repair(self._topology, live)
            self._cache = (self._epoch, graph, metropolis_hastings_weights(graph))
        return self._cache[1], self._cache[2]

    def _check_open(self) -> None:
        if self._closed:  # a call still running when the server's grace ran out
            raise Unavailable("the bootstrap is stopping; call again once it is back")

    def _flush(self, now: float, *, due: bool = True) -> None:
        """Write the peers that heartbeats changed, if FLUSH_SECONDS have passed since the
        last write (any time if not `due`)."""
        if self._unsaved and not self._closed and (not due or
                                                   now - self._saved_at >= FLUSH_SECONDS):
            self._save([], bump=False, durable=False)

    def _save(self, changed: Iterable[PeerView], *, bump: bool,
              assembled_at: float | None = None, durable: bool = True) -> None:
        """Commit the changed peers and the run's metadata (epoch +1 if bump; assembled if
        assembled_at is given) in one transaction, then apply them in memory. `durable`: synced
        to disk before this returns (see the module's "Persistence"). The peers that heartbeats
        changed since the last commit are written with them."""
        self._check_open()
        changed = list(changed)
        ids = {p.node_id for p in changed}
        changed += [self._peers[i] for i in sorted(self._unsaved - ids)]
        epoch = self._epoch + 1 if bump else self._epoch
        assembled = self._assembled or assembled_at is not None
        since = self._assembled_at if assembled_at is None else assembled_at
        rows = [(p.node_id, p.address, p.num_samples, p.state.value, p.round,
                 None if math.isnan(p.loss) else p.loss, p.health, p.last_seen,
                 *(getattr(p, c) for c in COUNTERS)) for p in changed]
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        with self._db:
            self._db.executemany(f"INSERT OR REPLACE INTO peers ({', '.join(PEER_COLUMNS)}) "
                                 f"VALUES ({', '.join('?' * len(PEER_COLUMNS))})", rows)
            self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                 _meta_rows(epoch, assembled, since))
        self._peers.update({p.node_id: p for p in changed})
        self._unsaved.clear()
        self._saved_at = self._clock()
        self._epoch, self._assembled, self._assembled_at = epoch, assembled, since
        if bump or assembled_at is not None:  # a lease may have begun: scan at the next expire
            self._expiry_due = 0.0
        if bump:
            self._changed.notify_all()
            for listener in self._listeners:
                listener(epoch)


Mixing = tuple[np.ndarray, tuple[str, ...]]  # Registry.mixing: weights (n, n), addresses


def changed_assignments(before: Mixing, after: Mixing) -> np.ndarray:
    """The ids of the nodes whose assignment differs between two Registry.mixing tables: a
    neighbor, a weight (its own included) or a neighbor's address. Sorted."""
    (w0, addresses0), (w1, addresses1) = before, after
    changed = (w0 != w1).any(axis=1)  # (n,)
    moved = np.array([a != b for a, b in zip(addresses0, addresses1, strict=True)])  # (n,)
    if moved.any():
        changed |= (w1[:, moved] != 0).any(axis=1)  # a neighbor's (or its own) address
    return np.flatnonzero(changed)


def _migrate(db: sqlite3.Connection) -> None:
    """Add the COUNTERS columns to a peers table that lacks them (a file of an older bootstrap):
    ALTER TABLE ADD COLUMN with a default keeps every row, with zeros."""
    present = {row[1] for row in db.execute("PRAGMA table_info(peers)")}
    with db:
        for column in COUNTERS:
            if column not in present:
                db.execute(f"ALTER TABLE peers ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")


def _meta_rows(epoch: int, assembled: bool, assembled_at: float) -> list[tuple[str, str]]:
    return [("epoch", str(epoch)), ("assembled", "1" if assembled else "0"),
            ("assembled_at", repr(assembled_at))]

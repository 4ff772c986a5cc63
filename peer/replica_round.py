"""A node's part in model replicas (docs/algorithms.md, "Compressed models: replicas"): what it
serves (its update q^t and its replica by round), how it brings its copy of a neighbor's replica
to a round (the missing updates applied, else a resync from the dense replica: never a guess),
and the second half of a round (finish_round). The state itself is peer/replicas.py; peer/node.py
composes this into Node.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from crossgrad.errors import InvalidMessage, StaleRound
from peer.algorithms.base import Algorithm, Params
from peer.compression import Compressed
from peer.replicas import Replica, Replicas, UpdateSource
from peer.rounds import RoundRecord

log = logging.getLogger(__name__)


class ReplicaRound:
    """Node's replica methods; the attributes below are Node's (peer/node.py)."""

    id: int
    round: int
    params: Params
    algorithm: Algorithm
    replicas: Replicas | None
    resyncs: int
    _lock: threading.RLock
    _published: threading.Condition
    _stopped: bool
    _updates: dict[int, tuple[list[Compressed], int]]
    _gossip_weights: dict[int, float]

    def model_update(self, round_: int) -> tuple[list[Compressed], int]:
        """q_i^round under replicas and the digest of the replica it applies to, if still kept
        (StaleRound otherwise)."""
        with self._lock:
            if round_ not in self._updates:
                raise StaleRound(f"node {self.id} keeps the model updates of rounds "
                                 f"{sorted(self._updates)}, not round {round_}")
            return self._updates[round_]

    def wait_update(self, round_: int, timeout: float | None) -> bool:
        """Block until q_i^round is computed (or the node is past it), at most timeout s;
        False at once once the node stopped before it."""
        with self._published:
            self._published.wait_for(lambda: self.round > round_ or self._stopped, timeout)
            return self.round > round_

    def own_replica(self, round_: int) -> Replica:
        """x^_i at the start of round_, if still kept (StaleRound otherwise)."""
        replicas = self.replicas
        if replicas is None:
            raise StaleRound(f"node {self.id} keeps no model replicas (this run sends models "
                             "dense)")
        with self._lock:
            replica = replicas.own_at(round_)
            if replica is None:
                raise StaleRound(f"node {self.id} holds its replica of round "
                                 f"{replicas.current.round}, not of round {round_}")
            return replica

    def replica_copy(self, node_id: int, round_: int, source: UpdateSource,
                     digest: int = 0) -> Params | None:
        """This node's copy of `node_id`'s replica at the start of round_, brought there when
        it is not: the missing updates applied, or else resynchronised from the dense replica.
        `digest`: the replica's digest as its owner says (a request names it); a copy with
        another one is resynchronised. None when neither worked (the neighbor is left out).

        No lock is held while fetching: the neighbor may be waiting for this node's answer
        before it publishes what is fetched here."""
        replicas = self.replicas
        assert replicas is not None
        with self._lock:
            copy = replicas.copy_at(node_id, round_)
            latest = replicas.latest_copy(node_id)
        if copy is not None and digest in (0, copy.digest):
            return copy.params
        if copy is None and latest is not None and latest.round < round_:
            for r in range(latest.round, round_):
                update = source.model_updates(r, [node_id]).get(node_id)
                if update is None:
                    break
                with self._lock:
                    if replicas.copy_at(node_id, r + 1) is None:
                        try:
                            replicas.apply(update)
                        except InvalidMessage as exc:
                            log.warning("node %d: its copy of node %d's replica needs a resync: "
                                        "%s", self.id, node_id, exc)
                            break
            with self._lock:
                copy = replicas.copy_at(node_id, round_)
            if copy is not None and digest in (0, copy.digest):
                return copy.params
        return self._resync(node_id, round_, source)

    def _resync(self, node_id: int, round_: int, source: UpdateSource) -> Params | None:
        replica = source.replicas(round_, [node_id]).get(node_id)
        if replica is None:
            return None
        with self._lock:
            self.replicas.resync(node_id, replica)  # type: ignore[union-attr]
            self.resyncs += 1
        log.info("node %d: resynchronised its copy of node %d's replica at round %d",
                 self.id, node_id, round_)
        return replica.params

    def finish_round(self, source: UpdateSource, record: RoundRecord | None = None) -> list[int]:
        """The second half of a round under replicas (after every neighbor's run_round): apply
        the neighbors' q_l^t to their copies, then, but for NGC, gossip on the replicas:
        x_i^{t+1} = x_i^{t+1/2} + gamma_c sum_l pi_il (x^_l^{t+1} - x^_i^{t+1}).

        A neighbor whose update is missing, refused or not for this node's copy is
        resynchronised from its dense replica of round t+1 (never guessed); one that sends
        neither is left out of the gossip. Returns the neighbors left out. `record`: the
        round's record, whose time and phases gain this half's (fetching: transfer, or compute
        in the simulator; gossip: mix)."""
        replicas = self.replicas
        if replicas is None:
            return []
        started = time.perf_counter()
        t = self.round - 1
        taking_part = sorted(j for j in self._gossip_weights if j != self.id)
        with self._lock:
            needed = [j for j in taking_part if replicas.copy_at(j, t + 1) is None]
        updates = source.model_updates(t, needed) if needed else {}
        lost: list[int] = []
        for j in taking_part:
            with self._lock:
                if j in updates and replicas.copy_at(j, t + 1) is None:
                    try:
                        replicas.apply(updates[j])
                    except InvalidMessage as exc:
                        log.warning("node %d round %d: %s; resynchronising", self.id, t, exc)
                done = replicas.copy_at(j, t + 1) is not None
            if not done and self._resync(j, t + 1, source) is None:
                log.warning("node %d round %d: node %d sent neither its model update nor its "
                            "replica: left out of the gossip", self.id, t, j)
                lost.append(j)
        fetched = time.perf_counter()
        if not self.algorithm.gossips_first:
            weights = {j: w for j, w in self._gossip_weights.items() if j not in lost}
            with torch.no_grad(), self._lock:
                self.params = replicas.gossip(self.params, weights, t + 1)
        if record is not None:
            ended = time.perf_counter()
            # in process (the simulator: no wait_seconds) fetching is the neighbors' computing
            in_process = getattr(source, "wait_seconds", lambda: None)() is None
            fetch_phase = "compute" if in_process else "transfer"
            record.phases[fetch_phase] = record.phases.get(fetch_phase, 0.0) + fetched - started
            record.phases["mix"] = record.phases.get("mix", 0.0) + ended - fetched
            record.seconds += ended - started
        return lost

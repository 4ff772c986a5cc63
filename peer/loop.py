"""A deployed peer's round loop: between rounds it takes new assignments, catches up, records,
evaluates and checkpoints; inside a round it runs peer.node.Node.run_round over the network.

Each iteration, for round t (docs/architecture.md, "One round" and "Faults"):

    1. take the newest assignment the bootstrap announced (never inside a round): new
       neighbors, new weights, channels opened and closed
    2. catch up when the neighbors are ahead (at start, after a resume or an epoch change, or
       when a neighbor no longer keeps this node's round): jump to their round from their
       models (Node.catch_up says exactly what the caught-up state is)
    3. publish x_i^t, run the round (a neighbor that misses its deadline is left out of it and
       reported at the next heartbeat), record it, checkpoint every `checkpoint_every` rounds,
       evaluate every `eval_every` rounds

A node whose neighbors are all gone trains alone (state ALONE) and says so in its log.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch

from bootstrap.registry import AssignmentView
from crossgrad.config import RunConfig
from crossgrad.errors import ProtocolError
from peer.client import GrpcNeighborhood
from peer.metrics import RoundTimes, Traffic, kinds_json, pair_sum
from peer.node import Node, Params
from peer.records import RunRecorder
from peer.rounds import Assignment, RoundRecord
from peer.session import Progress

log = logging.getLogger(__name__)


class PeerState(str, Enum):
    """What a peer is doing (PeerStatus.state)."""

    STARTING = "STARTING"  # serving, joining, loading data: no node yet
    CATCHING_UP = "CATCHING_UP"  # fetching its neighbors' models to jump to their round
    TRAINING = "TRAINING"
    ALONE = "ALONE"  # training with no live neighbor
    DRAINING = "DRAINING"  # stopped before the last round (SIGTERM), finishing up
    DONE = "DONE"  # every round run; serving its last model until the neighbors are done


def assignment_of(view: AssignmentView) -> tuple[Assignment, dict[int, str]]:
    """The bootstrap's view as the node's Assignment, and the neighbors' addresses."""
    weights = {n.node_id: n.weight for n in view.neighbors}
    weights[view.node_id] = view.self_weight
    assignment = Assignment(neighbors=tuple(n.node_id for n in view.neighbors),
                            weights=weights, epoch=view.epoch)
    return assignment, {n.node_id: n.address for n in view.neighbors}


@dataclass
class CatchUps:
    """How often the node jumped to its neighbors' round, and to which round last."""

    count: int = 0
    last_round: int = 0


class RoundLoop:
    """Drives one node's rounds (see the module docstring)."""

    def __init__(self, node: Node, hood: GrpcNeighborhood, settings: RunConfig,
                 recorder: RunRecorder, traffic: Traffic, *, timeout: float,
                 test_set: tuple[torch.Tensor, torch.Tensor],
                 checkpoint: Callable[[str], None] | None = None,
                 checkpoint_every: int = 0) -> None:
        self.node = node
        self.hood = hood
        self.settings = settings
        self.recorder = recorder
        self.traffic = traffic
        self.timeout = timeout
        self.test_x, self.test_y = test_set
        self.checkpoint = checkpoint  # checkpoint(reason) saves the node's state
        self.checkpoint_every = checkpoint_every
        self.state = PeerState.TRAINING
        self.last_loss = math.nan
        self.last_accuracy = math.nan
        self.evaluated_round = 0  # the round of last_accuracy (PeerStatus.evaluated_round)
        self.catch_ups = CatchUps()
        self.times = RoundTimes()  # read by the metrics endpoint (peer/exporter.py)
        self.last_record: RoundRecord | None = None  # the last round's breakdown (GetStatus)
        hood.prefetch_until = settings.rounds - 1  # the next round's models, fetched early
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._pending: AssignmentView | None = None
        self._missed: set[int] = set()  # neighbors missed since the last heartbeat
        self._check_round = True  # look at the neighbors' rounds before the next round

    # ---- called from other threads -------------------------------------------------------
    def offer(self, view: AssignmentView) -> None:
        """A new assignment from the bootstrap (session thread): taken before the next round.

        Its neighbors may call this node at once (they may start the epoch's round first), so
        they are accepted as neighbors and reachable from now on."""
        assignment, addresses = assignment_of(view)
        with self._lock:
            self._pending = view
        self.node.upcoming = frozenset(assignment.neighbors)
        self.hood.update({**self.hood.addresses(), **addresses})

    def progress(self) -> Progress:
        """What the next heartbeat reports (session thread)."""
        with self._lock:
            missed, self._missed = tuple(sorted(self._missed)), set()
        health = "ok" if self.state is not PeerState.ALONE else "alone: no live neighbor"
        return Progress(round=self.node.round, loss=self.last_loss, health=health,
                        unreachable=missed)

    # ---- between rounds ------------------------------------------------------------------
    def _take_assignment(self) -> None:
        with self._lock:
            view, self._pending = self._pending, None
        if view is None or view.epoch == self.node.assignment.epoch:
            return
        assignment, addresses = assignment_of(view)
        dropped = self.node.set_assignment(assignment)
        self.hood.update(addresses)
        self.hood.forget(dropped)
        self.recorder.event("assignment", self.node.round, epoch=view.epoch,
                            neighbors=list(assignment.neighbors), dropped=dropped)
        log.info("node %d round %d: topology epoch %d, neighbors %s (weights %s)",
                 self.node.id, self.node.round, view.epoch, list(assignment.neighbors),
                 {j: round(w, 4) for j, w in assignment.weights.items()})
        self._check_round = True

    def _neighbor_rounds(self) -> dict[int, int]:
        rounds = {}
        for j in self.node.assignment.neighbors:
            try:
                rounds[j] = int(self.hood.status(j, timeout=min(5.0, self.timeout)).round)
            except ProtocolError:
                continue  # unreachable: the round itself will find out
        return rounds

    def catch_up_if_behind(self) -> bool:
        """Jump to the neighbors' round when they are more than one round ahead (they no longer
        answer for this node's round); True if the node did."""
        self._check_round = False
        rounds = self._neighbor_rounds()
        target = max(rounds.values(), default=-1)
        if target <= self.node.round + 1:
            return False
        previous, self.state = self.state, PeerState.CATCHING_UP
        sources = sorted(j for j, r in rounds.items() if r >= target)
        models: dict[int, Params] = self.hood.models(target, sources)
        if not models:
            log.warning("node %d: neighbors are at round %d, but none sent its model; "
                        "going on from round %d", self.node.id, target, self.node.round)
            self.state = previous
            return False
        log.warning("node %d: catching up from round %d to round %d with the models of "
                    "nodes %s", self.node.id, self.node.round, target, sorted(models))
        self.recorder.event("catch_up", target, from_round=self.node.round,
                            sources=sorted(models))
        self.node.catch_up(target, models)
        self.catch_ups.count += 1
        self.catch_ups.last_round = target
        self.state = PeerState.TRAINING
        return True

    def _note_round(self, record: RoundRecord) -> None:
        with self._lock:
            self._missed.update(record.missing)
        alone = not record.answered and self.settings.nodes > 1  # a run of one is not alone
        if alone and self.state is not PeerState.ALONE:
            why = ("it has no neighbors in this assignment" if not self.node.assignment.neighbors
                   else f"none of nodes {list(self.node.assignment.neighbors)} answered")
            log.warning("node %d round %d: training alone: %s", self.node.id, record.round, why)
            self.recorder.event("alone", record.round, reason=why)
            self.state = PeerState.ALONE
        elif not alone and self.state is PeerState.ALONE:
            log.warning("node %d round %d: neighbors %s answered again; no longer alone",
                        self.node.id, record.round, record.answered)
            self.recorder.event("not_alone", record.round, answered=record.answered)
            self.state = PeerState.TRAINING
        if self.hood.behind(record.round):
            self._check_round = True  # a neighbor no longer keeps this round: it is ahead

    # ---- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        """Rounds until the last one or until stop_event; the state is DONE or DRAINING after."""
        node, cfg = self.node, self.settings
        while node.round < cfg.rounds and not self.stop_event.is_set():
            self._take_assignment()
            if self._check_round:
                self.catch_up_if_behind()
                if node.round >= cfg.rounds:
                    break
            served = node.served_seconds
            node.publish()
            record = node.run_round(self.hood)
            node.finish_round(self.hood, record)  # under replicas: updates applied, gossip
            self._checkpoint(record)
            record.served_seconds = node.served_seconds - served
            self.last_loss = record.loss
            self.last_record = record
            self.times.observe(record.seconds, record.phases)
            self._note_round(record)
            per_kind = self.traffic.per_kind()
            self.recorder.round(record, bytes=pair_sum(per_kind.values()),
                                bytes_by_kind=kinds_json(per_kind), epoch=node.assignment.epoch)
            if node.round % cfg.eval_every == 0 or node.round == cfg.rounds:
                self.evaluate(record)
        if node.round >= cfg.rounds:
            node.publish()  # the final model, for anyone who asks (status tools, the demo)
            self.state = PeerState.DONE
        else:  # stopped: its next round will not come, and neighbors must not wait for it
            self.state = PeerState.DRAINING
            node.stop_publishing()

    def _checkpoint(self, record: RoundRecord) -> None:
        """Every checkpoint_every rounds, save the node's state; its time is the round's
        `checkpoint` phase (and part of the round's seconds)."""
        if self.checkpoint is None or not self.checkpoint_every or \
                self.node.round % self.checkpoint_every:
            return
        started = time.perf_counter()
        self.checkpoint("periodic")
        seconds = time.perf_counter() - started
        record.phases["checkpoint"] = record.phases.get("checkpoint", 0.0) + seconds
        record.seconds += seconds

    def evaluate(self, record: RoundRecord | None = None) -> None:
        loss, acc = self.node.trainer.evaluate(self.node.params, self.test_x, self.test_y)
        self.last_accuracy, self.evaluated_round = acc, self.node.round
        self.recorder.evaluation(self.node.round, loss=loss, accuracy=acc)
        log.info("node %d round %d/%d: loss %.4f, test accuracy %.4f", self.node.id,
                 self.node.round, self.settings.rounds,
                 record.loss if record is not None else math.nan, acc)

    def wait_for_neighbors(self) -> None:
        """Keep serving until every neighbor has finished too (or stops answering), at most
        one deadline: they may still need this node's last model and cross-gradients."""
        if self.state is PeerState.DRAINING:
            return  # it stops before its neighbors: they go on without it
        deadline = time.monotonic() + self.timeout
        pending = set(self.node.assignment.neighbors)
        while pending and time.monotonic() < deadline and not self.stop_event.is_set():
            for j in sorted(pending):
                try:
                    status = self.hood.status(j, timeout=5.0)
                except ProtocolError:
                    pending.discard(j)  # gone: nothing more it can ask of us
                    continue
                if status.round >= self.settings.rounds or status.state in (
                        PeerState.DONE.value, PeerState.DRAINING.value):
                    pending.discard(j)
            self.stop_event.wait(0.1)

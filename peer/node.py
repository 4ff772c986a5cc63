"""The node: one round (docs/architecture.md, "One round") over a Neighborhood.

A Node owns x_i, its algorithm state and its Trainer. It does not know how neighbors are reached:
the simulator gives it an in-memory Neighborhood (peer/simulate.py), a deployment a gRPC one.
Both must return exactly the tensors the other node computed, so a networked run and a simulated
run with the same seed end with bit-identical models.

Round t at node i (synchronous, pull-based):
  1. publish x_i^t (kept for `keep_rounds` rounds: neighbors fetch it by round number)
  2. fetch x_j^t from every neighbor
  3. self-gradient at algorithm.self_grad_point(...) on B_i^t; NGC's model-variant gradients of the
     fetched models on B_i^t when the algorithm uses them
  4. fetch g_ij = grad F_j(x_i^t; B_j^t) from every neighbor when the algorithm uses them
  5. algorithm.step -> x_i^{t+1}
A neighbor that does not answer is left out of the round: its weight goes to the node itself.
Serving side: `model(t)` and `cross_gradient(requester, t, x_requester)` answer neighbors; a
cross-gradient is computed once per (requester, round) and cached.

Overlap (a deployed peer; docs/benchmarks.md, "Overlap"): as each neighbor's model arrives (in
step 2, or prefetched by the neighborhood as soon as the neighbor published it), its
cross-gradient is computed on a worker (prepare_cross_gradient), exactly as on its request; the
round driver lets those finish before its own gradient (the neighbors wait for them), and a
networked neighborhood asks for step 4's cross-gradients before step 3, so that they cross the
wire while the node computes. What is computed, and in which order per link, is unchanged.

With model replicas (peer/replicas.py) step 2 reads the node's copies of the neighbors' replicas
instead of fetching models (a copy that is missing is resynchronised from the neighbor's dense
replica first), a cross-gradient is taken at the server's copy of the requester's replica, step 5
is the local step without mixing, and the round has a second half, finish_round: publish q_i^t
(model_update(t)), apply the neighbors' q_l^t to their copies, then gossip on the replicas.
Those parts live in peer/replica_round.py (and EF21 / CLAG's in peer/three_point_round.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from concurrent import futures
from typing import Any

import torch

from crossgrad.errors import InvalidMessage, StaleRound
from crossgrad.seeding import derive_seed
from peer.algorithms.base import Algorithm, Params, StepInputs
from peer.compression import Compressed, ErrorFeedback
from peer.compression.threepoint import ThreePoint
from peer.replica_round import ReplicaRound
from peer.replicas import Replicas, UpdateSource
from peer.rounds import (
    PLAUSIBLE_RATIO,
    Assignment,
    EstimateSource,
    Neighborhood,
    RoundPhases,
    RoundRecord,
    ThreePointMessage,
    check_finite_tensor,
    effective_weights,
    max_abs,
)
from peer.three_point_round import ThreePointRound
from peer.training.checkpoint import (
    CheckpointError,
    check_residuals,
    check_tensor,
    check_tensors,
    to_device,
)
from peer.training.trainer import Trainer, generator_state, restore_generator

log = logging.getLogger(__name__)


class Node(ReplicaRound, ThreePointRound):
    """One participant: state, the round driver over a Neighborhood, and what it serves."""

    def __init__(self, node_id: int, trainer: Trainer, algorithm: Algorithm,
                 assignment: Assignment, params: Params, keep_rounds: int = 4,
                 feedback: ErrorFeedback | None = None,
                 threepoint: ThreePoint | None = None,
                 replicas: Replicas | None = None) -> None:
        self.id = node_id
        self.trainer = trainer
        self.algorithm = algorithm
        self.assignment = assignment
        self.params: Params = [p.detach().clone().to(trainer.device) for p in params]
        self.round = 0
        self.keep_rounds = keep_rounds
        self._snapshots: dict[int, Params] = {}
        self._cross: dict[tuple[int, int], Params] = {}
        # Sender-side compression of served cross-gradients, error feedback per (link, tensor)
        # (docs/algorithms.md, "compcga and compngc"); None sends them dense. The records are what
        # goes on the wire; _cross holds their decompressed form, which NGC's model-variant term
        # also uses.
        self.feedback = feedback
        self._cross_records: dict[tuple[int, int], list[Compressed]] = {}
        # EF21 / CLAG instead (--feedback ef21|clag:Z, peer/compression/threepoint.py): _cross
        # holds the sender's estimate h, _cross_deltas what goes to the requester (records,
        # None for a skipped tensor, and their decoded deltas), and the receiver's estimates
        # live in `threepoint` too.
        self.threepoint = threepoint
        self._cross_deltas: dict[tuple[int, int], ThreePointMessage] = {}
        # Per round served: [tensors skipped, tensors sent] (a round's requests may come after
        # this node's own round ended, so they are counted by the round they serve).
        self._round_counts: dict[int, list[int]] = {}
        self._neighbor_models: dict[tuple[int, int], Params] = {}
        self._lock = threading.RLock()
        self._published = threading.Condition(self._lock)
        self.upcoming: frozenset[int] = frozenset()  # neighbors of an announced next epoch
        self._stopped = False  # stop_publishing() was called
        # Model replicas (docs/algorithms.md, "Compressed models: replicas"); None: dense models.
        self.replicas = replicas
        # q_i^t by round, what neighbors fetch, with the digest of the replica it applies to
        self._updates: dict[int, tuple[list[Compressed], int]] = {}
        self._gossip_weights: dict[int, float] = {}  # pi_il of the last round's participants
        self.resyncs = 0  # neighbors' replicas and estimates resynchronised from dense state
        # Overlap (docs/metrics.md, "Where a round's time goes"). Every gradient this node
        # computes goes through _gradient_lock, one at a time, so that its time is measured
        # once: a neighbor's cross-gradient (served) or the round driver's own (compute).
        self._gradient_lock = threading.Lock()
        self._times_lock = threading.Lock()  # the three below; never held while waiting
        self._driver: int | None = None  # the thread running run_round (its ident)
        self._served = 0.0  # seconds computing cross-gradients off the round driver, in all
        self._blocked = 0.0  # of this round, the driver's wait for _gradient_lock
        # Cross-gradients being computed, by (requester, round): a server thread asking for
        # one that the precompute worker is computing waits for it instead of computing twice.
        self._computing: dict[tuple[int, int], futures.Future[Params]] = {}
        # One worker computes each neighbor's cross-gradient as soon as its model arrives
        # (prepare_cross_gradient), so that it is ready when the neighbor asks.
        self._worker = futures.ThreadPoolExecutor(max_workers=1,
                                                  thread_name_prefix=f"cross-{node_id}")
        self._prepared: dict[tuple[int, int], futures.Future[None]] = {}  # the worker's jobs

    @property
    def names(self) -> list[str]:
        """Parameter names in wire order."""
        return self.trainer.names

    def is_neighbor(self, node_id: int) -> bool:
        """A neighbor in the current assignment, or in the next one already announced (its
        nodes may start the new epoch's round a little before this node does)."""
        return node_id in self.assignment.neighbors or node_id in self.upcoming

    def set_assignment(self, assignment: Assignment) -> list[int]:
        """Take a new assignment between rounds (never inside one); the neighbors dropped.

        What the node kept for a dropped neighbor goes: its cached models and cross-gradients,
        and the error-feedback residuals of its link (what was owed to a model that has moved
        on; a returning neighbor starts a fresh link).
        """
        with self._lock:
            dropped = sorted(set(self.assignment.neighbors) - set(assignment.neighbors))
            self.assignment = assignment
            self.upcoming = frozenset()
            for cache in (self._cross, self._neighbor_models, self._cross_records,
                          self._cross_deltas):
                for key in [k for k in cache if k[0] in dropped]:
                    del cache[key]
            if self.replicas is not None:
                self.replicas.forget(dropped)
        for state in (self.feedback, self.threepoint):
            if state is not None:
                for j in dropped:
                    state.reset(j)
        return dropped

    def catch_up(self, round_: int, models: Mapping[int, Params]) -> None:
        """Jump to `round_`, the round the neighbors are at, from their models of that round.

        x_i becomes the plain average of `models` (the node's own model is many rounds old and
        is left out); the momentum buffers and the algorithm's memory of past rounds restart
        from zero, as at round 0, because they describe a trajectory the node is no longer on.
        The error-feedback residuals of the links are kept (they are owed to the neighbors).
        Snapshots and caches of earlier rounds are dropped; the caller publishes round_ next.
        """
        ordered = [models[j] for j in sorted(models)]
        with torch.no_grad():
            params = [torch.stack([m[k].to(p.device, p.dtype) for m in ordered]).mean(dim=0)
                      for k, p in enumerate(self.params)]
        with self._lock:
            self.params = params
            self.round = round_
            self.algorithm.reset_memory()
            self._snapshots.clear()
            self._updates.clear()
            if self.replicas is not None:  # neighbors hold copies of another round: resync
                self.replicas.relabel(round_)
            for cache in (self._cross, self._neighbor_models, self._cross_records,
                          self._cross_deltas):
                for key in [k for k in cache if k[1] < round_]:
                    del cache[key]

    # ---- serving side -------------------------------------------------------------------
    def publish(self) -> None:
        """Step 1: make x_i^t available to neighbors under round t."""
        with self._lock:
            self._snapshots[self.round] = [p.clone() for p in self.params]
            for old in [r for r in self._snapshots if r <= self.round - self.keep_rounds]:
                del self._snapshots[old]
            for old in [r for r in self._updates if r <= self.round - self.keep_rounds]:
                del self._updates[old]
            stale = self.round - self.keep_rounds
            for old in [r for r in self._round_counts if r <= stale]:
                del self._round_counts[old]
            for cache in (self._cross, self._neighbor_models, self._cross_records,
                          self._cross_deltas):
                for key in [k for k in cache if k[1] <= stale]:
                    del cache[key]
            self._published.notify_all()

    def latest_published(self) -> int:
        """The newest round whose model is published (-1 before the first)."""
        with self._lock:
            return max(self._snapshots, default=-1)

    def wait_published(self, round_: int, timeout: float | None) -> bool:
        """Block until round_ is published (or was: then True at once), at most timeout s;
        False at once for a round this node will never publish (it stopped: stop_publishing)."""
        with self._published:
            self._published.wait_for(
                lambda: self.latest_published() >= round_ or self._stopped, timeout)
            return self.latest_published() >= round_

    def stop_publishing(self) -> None:
        """No round after the last published one will come (the node drains): neighbors
        waiting for one get their answer now instead of at their deadline."""
        with self._published:
            self._stopped = True
            self._published.notify_all()

    def remember_model(self, node_id: int, round_: int, params: Params) -> None:
        """Keep a neighbor's fetched model: serving its cross-gradient needs it again."""
        with self._lock:
            self._neighbor_models[(node_id, round_)] = params

    def neighbor_model(self, node_id: int, round_: int) -> Params | None:
        with self._lock:
            return self._neighbor_models.get((node_id, round_))

    def model(self, round_: int) -> Params:
        """x_i^round, if still kept."""
        with self._lock:
            if round_ not in self._snapshots:
                held = sorted(self._snapshots)
                raise StaleRound(f"node {self.id} keeps the models of rounds {held}, "
                                 f"not round {round_}")
            return self._snapshots[round_]

    def cross_gradient(self, requester: int, round_: int, requester_params: Params) -> Params:
        """grad F_i(x_requester^round; B_i^round): the requester's model on this node's data.

        Computed once per (requester, round), whoever asks first (a server thread, the
        precompute worker, NGC's round driver); the others wait for that computation. The
        gradient runs outside the node's lock, so that models are served meanwhile."""
        key = (requester, round_)
        with self._lock:
            done = self._cross.get(key)
            if done is not None:
                return done
            pending = self._computing.get(key)
            owner = pending is None
            if pending is None:
                pending = self._computing[key] = futures.Future()
        if not owner:
            return pending.result()
        try:
            _, grads = self._gradient(requester_params, round_, f"cross:{requester}")
            with self._lock:
                if self.threepoint is not None:
                    grads = self._send_three_point(requester, round_, grads)
                elif self.feedback is not None:
                    records = [
                        self.feedback.compress(requester, k, g, seed=derive_seed(
                            self.trainer.seed, self.id, round_, "compress", requester, k))
                        for k, g in enumerate(grads)]
                    self._cross_records[key] = records
                    grads = [self.feedback.compressor.decompress(r).to(g.dtype)
                             for r, g in zip(records, grads, strict=True)]
                self._cross[key] = grads
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        else:
            pending.set_result(grads)
            return grads
        finally:
            with self._lock:
                self._computing.pop(key, None)

    def prepare_cross_gradient(self, requester: int, round_: int, params: Params) -> None:
        """x_requester^round has arrived for this node's round or the next (prefetched): compute
        the requester's cross-gradient now, on the worker, exactly as cross_gradient would on
        its request (same batch, seed and compression: they depend on the round, not on this
        node's state), so that it is ready when asked. Only where the neighbor will ask (the
        algorithm gathers cross-gradients) and a model was fetched (not under replicas)."""
        if self.replicas is not None or not self.algorithm.uses_received:
            return
        if requester not in self.assignment.neighbors or round_ not in (self.round,
                                                                         self.round + 1):
            return
        key = (requester, round_)
        with self._lock:
            if key in self._cross or key in self._computing or key in self._prepared:
                return
            for old in [k for k in self._prepared if k[1] < self.round]:
                del self._prepared[old]
            self._prepared[key] = self._worker.submit(self._precompute, requester, round_,
                                                      params)

    def _prepared_jobs(self, round_: int) -> list[futures.Future[None]]:
        """The worker's cross-gradients of round_ (done or not)."""
        with self._lock:
            return [job for key, job in self._prepared.items() if key[1] == round_]

    def _precompute(self, requester: int, round_: int, params: Params) -> None:
        try:
            self.cross_gradient(requester, round_, params)
        except Exception as exc:  # the neighbor's request computes it again, and says why
            log.warning("node %d round %d: precomputing node %d's cross-gradient failed: %s",
                        self.id, round_, requester, exc)

    def _gradient(self, params: Params, round_: int, purpose: str) -> tuple[float, Params]:
        """trainer.gradient, one at a time, timed: off the round driver as served seconds; on
        it, the wait for a served one to end as blocked (RoundPhases: wait, not compute)."""
        asked = began = time.perf_counter()
        if not self._gradient_lock.acquire(blocking=False):  # another gradient under way
            self._gradient_lock.acquire()
            began = time.perf_counter()
        try:
            result = self.trainer.gradient(params, round_, purpose)
            ended = time.perf_counter()
        finally:
            self._gradient_lock.release()
        with self._times_lock:
            if threading.get_ident() == self._driver:
                self._blocked += began - asked
            else:
                self._served += ended - began
        return result

    @property
    def served_seconds(self) -> float:
        """Seconds spent computing cross-gradients for neighbors off the round driver, in all
        (RoundRecord.served_seconds is its increase over a round)."""
        with self._times_lock:
            return self._served

    def close(self) -> None:
        """Stop the precompute worker (a computation under way finishes)."""
        self._worker.shutdown(wait=False, cancel_futures=True)

    def cross_gradient_records(self, requester: int, round_: int) -> list[Compressed] | None:
        """The compressed form of a computed cross-gradient (None when sent dense)."""
        with self._lock:
            return self._cross_records.get((requester, round_))

    def has_cross_gradient(self, requester: int, round_: int) -> bool:
        with self._lock:
            return (requester, round_) in self._cross

    def cached_cross_gradient(self, requester: int, round_: int) -> Params | None:
        with self._lock:
            return self._cross.get((requester, round_))

    # ---- round driver -------------------------------------------------------------------
    def _drop_implausible(self, t: int, nbr_params: dict[int, Params]) -> None:
        """Leave out of the round (remove from nbr_params) any neighbor model with a tensor
        whose largest |value| exceeds PLAUSIBLE_RATIO times this node's own (at least 1).

        Such a model passed every check on the wire (finite values), but mixing it in would
        make this node's model huge and its next gradients NaN: a peer's message must never
        end or wreck this node's run. Honest neighbors are never near the bound: they start
        from the same model and are pulled together every round.
        """
        if not nbr_params:
            return
        own = [max_abs(x) for x in self.params]
        for j in sorted(nbr_params):
            for name, x, mine in zip(self.names, nbr_params[j], own, strict=True):
                largest = max_abs(x)
                if not largest <= PLAUSIBLE_RATIO * max(1.0, mine):  # NaN fails too
                    log.warning("node %d round %d: node %d's model is left out of the round: "
                                "tensor %r holds values up to %.3g, where this node's largest "
                                "is %.3g (the bound: %g x max(1, that))", self.id, t, j, name,
                                largest, mine, PLAUSIBLE_RATIO)
                    del nbr_params[j]
                    break

    def _local_cross_gradients(self, t: int, nbr_params: dict[int, Params]) -> dict[int, Params]:
        """NGC's model-variant term: each neighbor's model's gradient on this node's batch.

        A neighbor's model passed every check on the wire (finite values) and can still give a
        NaN or Inf gradient here (finite but huge weights). Such a neighbor is left out of the
        round, as one that did not answer (removed from nbr_params): a peer's model must never
        end this node's run nor reach its state.
        """
        local: dict[int, Params] = {}
        for j in sorted(nbr_params):
            try:
                grads = self.cross_gradient(j, t, nbr_params[j])
                for g in grads:
                    check_finite_tensor(
                        g, f"the gradient of node {j}'s model on node {self.id}'s data")
            except InvalidMessage as exc:
                log.warning("node %d round %d: node %d's model is left out of the round: %s",
                            self.id, t, j, exc)
                del nbr_params[j]
                with self._lock:
                    self._cross.pop((j, t), None)
                    self._cross_records.pop((j, t), None)
                    self._cross_deltas.pop((j, t), None)
                continue
            local[j] = grads
        return local

    def run_round(self, neighborhood: Neighborhood) -> RoundRecord:
        """Steps 2-5 of round self.round (publish() must have been called for it)."""
        # The clock only reads time: what is computed, and in which order, is the same with
        # or without it (simulated and networked runs stay bit-identical).
        clock = time.perf_counter
        started = mark = clock()
        phases = RoundPhases()
        with self._times_lock:
            self._driver, self._blocked = threading.get_ident(), 0.0
        t = self.round
        algo = self.algorithm
        neighbors = list(self.assignment.neighbors)
        nbr_params: dict[int, Params] = {}
        replicas = self.replicas
        if replicas is not None:  # the copies of the neighbors' replicas: nothing to fetch
            source: UpdateSource = neighborhood  # type: ignore[assignment]
            for j in neighbors:
                copy = self.replica_copy(j, t, source)
                if copy is not None:
                    nbr_params[j] = copy
            phases.called(neighborhood, clock() - mark)
            mark = clock()
        elif neighbors:
            nbr_params = neighborhood.models(t, neighbors)
            phases.called(neighborhood, clock() - mark)
            mark = clock()
        self._drop_implausible(t, nbr_params)
        early = None  # asked now, answered while this node computes (a networked neighborhood)
        ask_early = getattr(neighborhood, "start_cross_gradients", None)
        if ask_early is not None and algo.uses_received and not algo.uses_local and \
                self.threepoint is None and nbr_params:
            early = ask_early(t, sorted(nbr_params))
        # The neighbors' cross-gradients before this node's own gradient: they wait for theirs,
        # while only this node waits for its own, so every node gets its answers sooner.
        jobs = self._prepared_jobs(t)
        if jobs:
            phases.compute += clock() - mark
            mark = clock()
            futures.wait(jobs)
            phases.wait += clock() - mark  # the node computed its neighbors' cross-gradients
            mark = clock()
        local = self._local_cross_gradients(t, nbr_params) if algo.uses_local else {}
        weights = effective_weights(self.id, self.assignment, sorted(nbr_params))
        own = None if replicas is None else self.own_replica(t).params
        point = algo.self_grad_point(self.id, self.params, nbr_params, weights, own)
        loss, self_grad = self._gradient(point, t, "self")
        with self._times_lock:
            blocked = min(self._blocked, clock() - mark)
        phases.compute += clock() - mark - blocked
        phases.wait += blocked  # this node's gradient engine served a neighbor meanwhile
        received: dict[int, Params] = {}
        if early is not None:
            mark = clock()
            received = early.result()
            elapsed = clock() - mark
            waited = min(max(neighborhood.last_ready() - mark, 0.0),  # type: ignore[attr-defined]
                         elapsed)
            phases.wait += waited
            phases.transfer += elapsed - waited
        elif algo.uses_received and nbr_params:
            mark = clock()
            if self.threepoint is not None:
                source3: EstimateSource = neighborhood  # type: ignore[assignment]
                updates = source3.estimate_updates(t, sorted(nbr_params))
                phases.called(neighborhood, clock() - mark)
                received = self._receive_three_point(t, updates, source3)
            else:
                received = neighborhood.cross_gradients(t, sorted(nbr_params))
                phases.called(neighborhood, clock() - mark)
        before = dict(algo.stats)
        mark = clock()
        update: tuple[list[Compressed], int] = ([], 0)
        with torch.no_grad():
            new_params = algo.step(StepInputs(
                node=self.id, params=self.params, neighbor_params=nbr_params, weights=weights,
                self_grad=self_grad, lr=self.trainer.lr(t), received=received, local=local,
                round=t, seed=self.trainer.seed, own_replica=own))
            if replicas is not None:  # q_i^t, published for finish_round (peer/replicas.py)
                update = replicas.encode(new_params, self.trainer.seed, t)
        with self._lock:
            if replicas is not None:
                self._updates[t] = update
                self._gossip_weights = weights
            self.params = new_params
            self.round = t + 1
            self._published.notify_all()  # GetModelUpdate of round t waits for this
        stats = {k: v - before.get(k, 0) for k, v in algo.stats.items()}
        phases.stepped(clock() - mark, stats.get("qp_seconds", 0.0))
        return RoundRecord(node=self.id, round=t, loss=loss, lr=self.trainer.lr(t),
                           answered=sorted(nbr_params),
                           missing=sorted(set(neighbors) - set(nbr_params)),
                           seconds=clock() - started, stats=stats, phases=phases.as_dict())

    # ---- checkpoints (peer/training/checkpoint.py) --------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the next rounds depend on, as CPU copies: x_i, the round, the algorithm's
        memory and counters, the sender-side error-feedback residuals, the torch CPU RNG state.

        The batches and every seeded draw derive from (seed, node, round, purpose), so with
        this a node built from the same config continues bit for bit. Taken under the lock, so
        it is consistent with a concurrent server thread; call it between rounds (the round
        driver updates the algorithm's memory outside the lock).
        """
        with self._lock:
            state: dict[str, Any] = {
                "names": list(self.names),
                "params": list(self.params),  # copied below, as is every tensor
                "round": self.round,
                "algorithm": self.algorithm.state_dict(),
                "stats": {str(k): v for k, v in self.algorithm.stats.items()},
                "feedback": None if self.feedback is None else self.feedback.state_dict(),
                "threepoint": None if self.threepoint is None else self.threepoint.state_dict(),
                "replicas": None if self.replicas is None else self.replicas.state_dict(),
                "torch_rng": generator_state(),
            }
            return to_device(state, torch.device("cpu"))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state_dict(), all or nothing: every tensor is checked against this node's
        model first (CheckpointError naming the tensor; nothing changes), then moved to the
        node's device. Cached snapshots and cross-gradients are dropped: they belong to the
        rounds before."""
        self._check_state(state)
        device = self.trainer.device
        with self._lock:
            self.params = to_device(list(state["params"]), device)
            self.round = int(state["round"])
            self.algorithm.load_state_dict(to_device(state["algorithm"], device))
            self.algorithm.stats = {str(k): v for k, v in state["stats"].items()}
            if self.feedback is not None:
                self.feedback.load_state_dict(to_device(state["feedback"], device))
            if self.threepoint is not None:
                self.threepoint.load_state_dict(to_device(state["threepoint"], device))
            if self.replicas is not None:
                self.replicas.load_state_dict(to_device(state["replicas"], device))
            restore_generator(state["torch_rng"].clone())
            for cache in (self._snapshots, self._cross, self._cross_records,
                          self._neighbor_models, self._cross_deltas, self._updates):
                cache.clear()

    def _check_state(self, state: Mapping[str, Any]) -> None:
        """CheckpointError (one line, naming the part) unless `state` fits this node."""
        if not isinstance(state, Mapping):
            raise CheckpointError(f"node state: expected a table, found {type(state).__name__}")
        missing = [k for k in ("names", "params", "round", "algorithm", "stats", "feedback",
                               "torch_rng") if k not in state]
        if missing:
            raise CheckpointError(f"node state: missing {missing} (written by another version?)")
        names = state["names"]
        if not isinstance(names, list) or names != self.names:
            shown = names[:4] if isinstance(names, list) else names
            raise CheckpointError(f"node state: parameters {shown!r}..., this model's "
                                  f"{self.names[:4]}... (a checkpoint of another model?)")
        like = [p.detach().cpu() for p in self.params]
        check_tensors("params", state["params"], like)
        if not isinstance(state["round"], int) or state["round"] < 0:
            raise CheckpointError(f"node state: round {state['round']!r}, expected an integer "
                                  ">= 0")
        if not isinstance(state["algorithm"], Mapping):
            raise CheckpointError("node state: the algorithm's state is not a table")
        self.algorithm.check_state(state["algorithm"], like)
        if not isinstance(state["stats"], Mapping) or not all(
                isinstance(v, (int, float)) for v in state["stats"].values()):
            raise CheckpointError("node state: stats, expected a table of numbers")
        threepoint = state.get("threepoint")  # absent in checkpoints of older versions
        if (threepoint is None) != (self.threepoint is None):
            mine = "ef" if self.threepoint is None else self.threepoint.rule.kind
            raise CheckpointError(f"node state: this node runs --feedback {mine}, the state "
                                  "says otherwise (another --feedback?)")
        if threepoint is not None:
            if not isinstance(threepoint, Mapping):
                raise CheckpointError("node state: the three-point estimates are not a table")
            for side in ("sent", "last", "received"):
                check_residuals(f"three-point estimates ({side})", threepoint.get(side, {}),
                                like)
        if (state["feedback"] is None) != (self.feedback is None):
            have = "no" if self.feedback is None else "sender"
            raise CheckpointError(f"node state: this node compresses with {have} error "
                                  "feedback, the state says otherwise (another --compressor?)")
        if state["feedback"] is not None:
            check_residuals("sender error-feedback memory", state["feedback"], like)
        if (state.get("replicas") is None) != (self.replicas is None):
            have = "no" if self.replicas is None else "model"
            raise CheckpointError(f"node state: this node keeps {have} replicas, the state says "
                                  "otherwise (another --model-compressor or --consensus-step?)")
        if self.replicas is not None:
            self.replicas.check_state(state["replicas"], like)
        check_tensor("torch_rng", state["torch_rng"], generator_state())

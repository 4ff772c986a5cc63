"""A node's part in EF21 / CLAG for cross-gradients (docs/algorithms.md, "Three-point
compressors for cross-gradients"): the sender's message per requester and round (records, skips,
the digest of the estimates it builds on), the dense estimates a requester resynchronises from,
and the receiver's side (apply, or resync when the digests disagree). The estimates themselves
are peer/compression/threepoint.py; peer/node.py composes this into Node.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

from crossgrad.errors import StaleRound
from crossgrad.seeding import derive_seed
from peer.algorithms.base import Params
from peer.compression import Compressed
from peer.compression.digests import chain
from peer.compression.threepoint import ThreePoint
from peer.replicas import Replica, Update
from peer.rounds import EstimateSource, ThreePointMessage
from peer.training.trainer import Trainer

log = logging.getLogger(__name__)


class ThreePointRound:
    """Node's EF21 / CLAG methods; the attributes below are Node's (peer/node.py)."""

    id: int
    params: Params
    trainer: Trainer
    threepoint: ThreePoint | None
    resyncs: int
    _lock: threading.RLock
    _cross: dict[tuple[int, int], Params]
    _cross_deltas: dict[tuple[int, int], ThreePointMessage]
    _round_counts: dict[int, list[int]]

    def _send_three_point(self, requester: int, round_: int, grads: Params) -> Params:
        """EF21 / CLAG at the sender: the message to the requester is kept in _cross_deltas;
        returns the sender's estimates h (what NGC's model-variant term uses). Under the lock."""
        assert self.threepoint is not None
        records: list[Compressed | None] = []
        deltas: Params = []
        estimates: Params = []
        for k, g in enumerate(grads):
            seed = derive_seed(self.trainer.seed, self.id, round_, "compress", requester, k)
            record, delta, h = self.threepoint.send(requester, k, g, seed=seed)
            self._round_counts.setdefault(round_, [0, 0])[record is not None] += 1
            records.append(record)
            deltas.append(delta)
            estimates.append(h)
        base = self.threepoint.digest("sent", requester)
        message = ThreePointMessage(records, deltas, base, 0)
        digest = chain(base, round_, message.crcs, message.skipped)
        self.threepoint.set_digest("sent", requester, digest)
        self._cross_deltas[(requester, round_)] = dataclasses.replace(message, digest=digest)
        return estimates

    def three_point_message(self, requester: int, round_: int) -> ThreePointMessage | None:
        """Under EF21 / CLAG, the message of a computed cross-gradient (None otherwise)."""
        with self._lock:
            return self._cross_deltas.get((requester, round_))

    def three_point_estimates(self, requester: int, round_: int) -> Replica:
        """Under EF21 / CLAG, the dense estimates sent to `requester` after round_'s message,
        with their digest (a resync: GetEstimate); StaleRound when not kept."""
        with self._lock:
            message = self._cross_deltas.get((requester, round_))
            estimates = self._cross.get((requester, round_))
        if message is None or estimates is None:
            raise StaleRound(f"node {self.id} holds no cross-gradient estimates for node "
                             f"{requester} of round {round_}")
        return Replica(estimates, round_, message.digest)

    def cross_counts(self, round_: int) -> dict[str, int]:
        """Under EF21 / CLAG, the cross-gradient tensors this node skipped and sent for round_
        (all requests of that round served so far); {} otherwise."""
        if self.threepoint is None:
            return {}
        with self._lock:
            skipped, sent = self._round_counts.get(round_, (0, 0))
        return {"cross_skips": skipped, "cross_sent": sent}

    def _receive_three_point(self, t: int, updates: dict[int, Update],
                             source: EstimateSource) -> dict[int, Params]:
        """EF21 / CLAG at the receiver: h_j <- h_j + delta per tensor when the message builds on
        this node's estimates (same digest), else a resync from j's dense estimates; the
        estimates are the cross-gradients the algorithm uses. A neighbor whose message does not
        fit the model, or that sends neither, is left out of the round with its estimates
        untouched."""
        tp = self.threepoint
        assert tp is not None
        out: dict[int, Params] = {}
        for j in sorted(updates):
            update = updates[j]
            fits = len(update.deltas) == len(self.params) and all(
                d.shape == p.shape and d.dtype == p.dtype
                for d, p in zip(update.deltas, self.params, strict=False))
            if not fits:
                log.warning("node %d round %d: node %d's cross-gradient update does not fit "
                            "the model; left out of the round", self.id, t, j)
                continue
            if tp.digest("received", j) == update.base:
                out[j] = [tp.receive(j, k, d) for k, d in enumerate(update.deltas)]
                tp.set_digest("received", j, update.digest)
                continue
            log.warning("node %d round %d: node %d's cross-gradient message builds on other "
                        "estimates than this node's (a message was missed); resynchronising",
                        self.id, t, j)
            dense = source.estimates(t, [j]).get(j)
            if dense is None or dense.digest != update.digest:
                log.warning("node %d round %d: node %d sent no usable estimates; left out of "
                            "the round", self.id, t, j)
                continue
            tp.resync(j, list(dense.params), dense.digest)
            with self._lock:
                self.resyncs += 1
            out[j] = list(dense.params)
        return out

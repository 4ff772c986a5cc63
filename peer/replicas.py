"""Model replicas: CHOCO-style gossip on compressed model updates (Koloskova, Stich, Jaggi,
ICML 2019, algorithm 2, CHOCO-SGD; ICLR 2020). docs/algorithms.md, "Compressed models: replicas".

Node i keeps a replica x^_i of its own model and a copy of each neighbor's replica x^_l; all start
at the shared initial model x^0. Invariant: at the start of every round, each neighbor's copy of
x^_i equals i's own x^_i bit for bit, because every holder applies the same decoded update with
the same float operation (x^ <- x^ + decode(q)). Per round t, after the algorithm's local step
(x_i^{t+1/2}, no mixing):

    q_i = Q(x_i^{t+1/2} - x^_i^t)                  one message for every neighbor (encode once)
    x^_i <- x^_i + decode(q_i)   at i and at every neighbor of i
    x_i^{t+1} = x_i^{t+1/2} + gamma_c sum_{l in N(i)} pi_il (x^_l^{t+1} - x^_i^{t+1})

NGC and CompNGC gossip at the start of the round instead (on the replicas: NGC.self_grad_point
with own_replica) and skip the last line. Q is any registered compressor, used without error
feedback: what Q drops stays in x_i - x^_i and is sent in a later round. With Q = none and
gamma_c = 1 this is adapt-then-combine (up to the rounding of x^ + (x - x^)).

Versions. Every replica is the replica at the start of some round, with a digest: a hash chained
over the updates applied since x^0 (their round and their payloads' CRC-32Cs, which the wire
carries anyway). An update names the digest of the replica it applies to (StreamHeader.
base_digest); a copy with another digest, or at another round, is never updated: it is
resynchronised from the owner's dense replica, digest included (GetReplica). So a neighbor that
missed an update (a fault, a restart, a catch-up) is repaired, never guessed, and is bit-identical
again afterwards. State only here: the round driver (peer/node.py) fetches updates and replicas.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import google_crc32c
import torch

from crossgrad.errors import InvalidMessage
from crossgrad.seeding import derive_seed
from peer.algorithms.base import Params
from peer.compression import Compressed, Compressor
from peer.compression.digests import INITIAL_DIGEST, chain
from peer.training.checkpoint import CheckpointError, check_tensors


@dataclass(frozen=True)
class Replica:
    """A replica at the start of `round`, with its digest."""

    params: Params
    round: int
    digest: int


@dataclass(frozen=True)
class Update:
    """An update of state both ends hold, decoded: a model update q_sender^round, or under
    EF21 / CLAG a cross-gradient message (deltas of the estimates; zeros for skipped tensors).
    It applies to the state of digest `base` only."""

    sender: int
    round: int
    base: int
    deltas: Params
    crcs: tuple[int, ...]
    skipped: tuple[bool, ...] = ()

    @property
    def digest(self) -> int:
        """The digest of the state once this update is applied."""
        return chain(self.base, self.round, self.crcs, self.skipped)


class ReplicaMismatch(InvalidMessage):
    """An update that does not apply to this node's copy (another round or digest): resync."""


class UpdateSource(Protocol):
    """Where a node's neighbors' updates and dense replicas come from (a Neighborhood)."""

    def model_updates(self, round_: int, neighbors: Sequence[int]) -> dict[int, Update]:
        """q_l^round, decoded and validated, for each neighbor l that sent it."""
        ...

    def replicas(self, round_: int, neighbors: Sequence[int]) -> dict[int, Replica]:
        """x^_l at the start of round_, dense, for each neighbor l that sent it."""
        ...


class Replicas:
    """x^_i and the copies of the neighbors' replicas, with the compressor Q and gamma_c.

    The node's own replica is kept for the last `keep` rounds (neighbors resynchronise from it
    by round), and so is each copy (a neighbor's cross-gradient request of round t reads the
    copy of round t, which the round driver may already have moved on)."""

    def __init__(self, node_id: int, compressor: Compressor, consensus_step: float,
                 initial: Params, neighbors: Sequence[int], keep: int = 4) -> None:
        if not 0.0 < consensus_step <= 1.0:
            raise ValueError(f"consensus step {consensus_step}, expected a value in (0, 1]")
        self.node_id = node_id
        self.compressor = compressor
        self.consensus_step = float(consensus_step)
        self.keep = keep
        start = Replica([p.detach().clone() for p in initial], 0, INITIAL_DIGEST)  # x^ = x^0
        self._own: dict[int, Replica] = {0: start}
        self._copies: dict[int, dict[int, Replica]] = {l: {0: start} for l in neighbors}

    # ---- reading --------------------------------------------------------------------------
    @property
    def current(self) -> Replica:
        """x^_i now: at the start of the round after the last update encoded."""
        return self._own[max(self._own)]

    @property
    def own(self) -> Params:
        return self.current.params

    def own_at(self, round_: int) -> Replica | None:
        return self._own.get(round_)

    def copy_at(self, node: int, round_: int) -> Replica | None:
        """This node's copy of `node`'s replica at the start of round_ (None without one)."""
        return self._copies.get(node, {}).get(round_)

    def latest_copy(self, node: int) -> Replica | None:
        versions = self._copies.get(node)
        return versions[max(versions)] if versions else None

    def neighbor_models(self, neighbors: Sequence[int], round_: int) -> dict[int, Params]:
        """The copies x^_l of round_ that this node holds: what the algorithm reads as x_l."""
        out = {}
        for l in neighbors:
            copy = self.copy_at(l, round_)
            if copy is not None:
                out[l] = copy.params
        return out

    # ---- changing -------------------------------------------------------------------------
    def encode(self, params: Params, seed: int,
               round_: int) -> tuple[list[Compressed], int]:
        """q_i = Q(params - x^_i) per tensor, then x^_i <- x^_i + decode(q_i); the records and
        the digest of the replica they apply to (x^_i at the start of round_)."""
        base = self.current
        if base.round != round_:
            raise ValueError(f"node {self.node_id}: its replica is of round {base.round}, the "
                             f"update of round {round_} must apply to it")
        records: list[Compressed] = []
        updated: Params = []
        for k, (x, own) in enumerate(zip(params, base.params, strict=True)):
            record = self.compressor.compress(
                x - own, seed=derive_seed(seed, self.node_id, round_, "model-update", k))
            records.append(record)
            updated.append(own + self._decode(record, own, f"own update, tensor {k}"))
        crcs = tuple(google_crc32c.value(r.payload) for r in records)
        self._add(self._own, Replica(updated, round_ + 1, chain(base.digest, round_, crcs)))
        return records, base.digest

    def decode_update(self, sender: int, round_: int, base: int,
                      records: Sequence[Compressed], like: Params) -> Update:
        """Records as an Update (the simulator's path; a networked node decodes on the
        wire): InvalidMessage when a record does not decode to a tensor shaped as `like`."""
        if len(records) != len(like):
            raise InvalidMessage(f"model update of node {sender}: {len(records)} tensors, "
                                 f"expected {len(like)}")
        deltas = [self._decode(r, x, f"model update of node {sender}, tensor {k}")
                  for k, (r, x) in enumerate(zip(records, like, strict=True))]
        return Update(sender, round_, base, deltas,
                           tuple(google_crc32c.value(r.payload) for r in records))

    def apply(self, update: Update) -> None:
        """x^_sender <- x^_sender + decode(q_sender) on the copy of update.round, all or nothing.
        ReplicaMismatch (nothing changes) when the copy is missing or not the update's base."""
        sender = update.sender
        copy = self.latest_copy(sender)
        if copy is None or copy.round != update.round or copy.digest != update.base:
            held = "none" if copy is None else f"round {copy.round}, digest {copy.digest:016x}"
            raise ReplicaMismatch(f"the model update of node {sender} for round {update.round} "
                                  f"applies to the replica of digest {update.base:016x}; this "
                                  f"node's copy: {held}")
        if len(update.deltas) != len(copy.params) or any(
                d.shape != x.shape or d.dtype != x.dtype
                for d, x in zip(update.deltas, copy.params, strict=True)):
            raise InvalidMessage(f"model update of node {sender}: the tensors do not fit the "
                                 "model")
        params = [x + d for x, d in zip(copy.params, update.deltas, strict=True)]
        self._add(self._copies[sender], Replica(params, update.round + 1, update.digest))

    def resync(self, sender: int, replica: Replica) -> None:
        """Replace the copy of `sender`'s replica by its dense replica (fetched by round)."""
        self._copies[sender] = {replica.round: replica}

    def relabel(self, round_: int) -> None:
        """After a catch-up to round_: x^_i stays, as the replica of round_ under a new digest
        (no neighbor holds it: each resynchronises), and every copy is dropped (resynchronised
        when next needed)."""
        own = self.current
        self._own = {round_: Replica(own.params, round_, chain(own.digest, round_, (), (True,)))}
        self._copies.clear()

    def _add(self, versions: dict[int, Replica], replica: Replica) -> None:
        versions[replica.round] = replica
        for old in [r for r in versions if r <= replica.round - self.keep]:
            del versions[old]

    def _decode(self, record: Compressed, like: torch.Tensor, what: str) -> torch.Tensor:
        delta = self.compressor.decompress(record, device=like.device)
        if delta.numel() != like.numel() or delta.dtype != like.dtype:
            raise InvalidMessage(f"{what}: {delta.numel()} {delta.dtype} values, expected "
                                 f"{like.numel()} {like.dtype}")
        return delta.reshape(like.shape)

    def gossip(self, params: Params, weights: Mapping[int, float], round_: int) -> Params:
        """x_i + gamma_c sum_{l in N(i)} pi_il (x^_l - x^_i), on the replicas of round_ (the
        copies there), neighbors in id order; `weights` holds pi_il of the neighbors taking
        part (and pi_ii, unused here)."""
        own = self.own_at(round_)
        assert own is not None, f"node {self.node_id} holds no replica of round {round_}"
        copies = {l: self.copy_at(l, round_) for l in weights if l != self.node_id}
        out: Params = []
        for k, x in enumerate(params):
            acc = torch.zeros_like(x)
            for l in sorted(copies):
                copy = copies[l]
                assert copy is not None, f"no copy of node {l}'s replica of round {round_}"
                acc = acc + weights[l] * (copy.params[k] - own.params[k])
            out.append(x + self.consensus_step * acc)
        return out

    def forget(self, neighbors: Sequence[int]) -> None:
        """Drop the copies of neighbors that left (a returning one needs a resync)."""
        for l in neighbors:
            self._copies.pop(l, None)

    # ---- checkpoints --------------------------------------------------------------------
    @staticmethod
    def _saved(replica: Replica) -> dict[str, Any]:
        return {"params": [p.clone() for p in replica.params], "round": replica.round,
                "digest": replica.digest}

    def state_dict(self) -> dict[str, Any]:
        """The current replica and the latest copy of each neighbor's, with rounds and
        digests (older versions are not kept: a neighbor asking for one resynchronises)."""
        copies = {str(l): self._saved(c) for l in self._copies
                  if (c := self.latest_copy(l)) is not None}
        return {"own": self._saved(self.current), "copies": copies}

    def check_state(self, state: object, like: Sequence[torch.Tensor]) -> None:
        """CheckpointError naming the part unless `state` fits a model shaped as `like`."""
        if not isinstance(state, Mapping) or not isinstance(state.get("copies"), Mapping):
            raise CheckpointError("replicas: expected a table with 'own' and 'copies' (a "
                                  "checkpoint of a run without --model-compressor?)")
        parts = {"replica x^_i": state.get("own"),
                 **{f"replica copy of node {l}": c for l, c in state["copies"].items()}}
        for l in state["copies"]:
            if not str(l).isdigit():
                raise CheckpointError(f"replicas: copy key {l!r}, expected a node id")
        for what, saved in parts.items():
            if not isinstance(saved, Mapping) or not all(
                    isinstance(saved.get(k), int) and saved.get(k) >= 0  # type: ignore[operator]
                    for k in ("round", "digest")):
                raise CheckpointError(f"{what}: expected params, round and digest (a checkpoint "
                                      "of an older version?)")
            check_tensors(what, saved.get("params"), like)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        def replica(saved: Mapping[str, Any]) -> Replica:
            return Replica([p.detach().clone() for p in saved["params"]], int(saved["round"]),
                           int(saved["digest"]))

        own = replica(state["own"])
        self._own = {own.round: own}
        self._copies = {int(l): {(r := replica(c)).round: r}
                        for l, c in state["copies"].items()}

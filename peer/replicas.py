"""Model replicas: CHOCO-style gossip on compressed model updates (Koloskova, Stich, Jaggi,
ICML 2019, algorithm 1; ICLR 2020). docs/algorithms.md, "Compressed models: replicas".

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

State only (no network here): the round driver (peer/node.py) fetches the neighbors' updates
and hands them to `apply`. A neighbor without a copy (it joined later, or missed an update) is
left out of the round: its copy cannot be guessed, only resynchronised from the dense replica.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from crossgrad.errors import InvalidMessage
from crossgrad.seeding import derive_seed
from peer.algorithms.base import Params
from peer.compression import Compressed, Compressor
from peer.training.checkpoint import CheckpointError, check_tensors


class UpdateSource(Protocol):
    """Where a node's neighbors' model updates come from (the simulator's neighborhood)."""

    def model_updates(self, round_: int, neighbors: Sequence[int]) -> dict[int, list[Compressed]]:
        """q_l^round, as records, for each neighbor l that published it."""
        ...


class Replicas:
    """x^_i and the copies of the neighbors' replicas, with the compressor Q and gamma_c."""

    def __init__(self, node_id: int, compressor: Compressor, consensus_step: float,
                 initial: Params, neighbors: Sequence[int]) -> None:
        if not 0.0 < consensus_step <= 1.0:
            raise ValueError(f"consensus step {consensus_step}, expected a value in (0, 1]")
        self.node_id = node_id
        self.compressor = compressor
        self.consensus_step = float(consensus_step)
        self.own: Params = [p.detach().clone() for p in initial]  # x^_i = x^0
        self.copies: dict[int, Params] = {l: [p.detach().clone() for p in initial]
                                          for l in neighbors}  # x^_l = x^0: a shared start

    def neighbor_models(self, neighbors: Sequence[int]) -> dict[int, Params]:
        """The copies x^_l of the neighbors that have one: what the algorithm reads as x_l."""
        return {l: self.copies[l] for l in neighbors if l in self.copies}

    def copy_of(self, node: int) -> Params | None:
        """This node's copy of `node`'s replica (None without one)."""
        return self.copies.get(node)

    def encode(self, params: Params, seed: int, round_: int) -> list[Compressed]:
        """q_i = Q(params - x^_i), per tensor; then x^_i <- x^_i + decode(q_i)."""
        records: list[Compressed] = []
        updated: Params = []
        for k, (x, own) in enumerate(zip(params, self.own, strict=True)):
            record = self.compressor.compress(
                x - own, seed=derive_seed(seed, self.node_id, round_, "model-update", k))
            records.append(record)
            updated.append(own + self._decode(record, own, f"own update, tensor {k}"))
        self.own = updated
        return records

    def apply(self, sender: int, records: Sequence[Compressed]) -> None:
        """x^_sender <- x^_sender + decode(q_sender): all or nothing (InvalidMessage, and the
        copy unchanged, when a record does not decode to the copy's tensors)."""
        copy = self.copies.get(sender)
        if copy is None:
            raise InvalidMessage(f"node {self.node_id} holds no replica of node {sender}")
        if len(records) != len(copy):
            raise InvalidMessage(f"model update of node {sender}: {len(records)} tensors, "
                                 f"expected {len(copy)}")
        deltas = [self._decode(r, x, f"model update of node {sender}, tensor {k}")
                  for k, (r, x) in enumerate(zip(records, copy, strict=True))]
        self.copies[sender] = [x + d for x, d in zip(copy, deltas, strict=True)]

    def _decode(self, record: Compressed, like: torch.Tensor, what: str) -> torch.Tensor:
        delta = self.compressor.decompress(record, device=like.device)
        if delta.numel() != like.numel() or delta.dtype != like.dtype:
            raise InvalidMessage(f"{what}: {delta.numel()} {delta.dtype} values, expected "
                                 f"{like.numel()} {like.dtype}")
        return delta.reshape(like.shape)

    def gossip(self, params: Params, weights: Mapping[int, float]) -> Params:
        """x_i + gamma_c sum_{l in N(i)} pi_il (x^_l - x^_i), neighbors in id order; `weights`
        holds pi_il of the neighbors taking part (and pi_ii, unused here)."""
        out: Params = []
        for k, (x, own) in enumerate(zip(params, self.own, strict=True)):
            acc = torch.zeros_like(x)
            for l in sorted(w for w in weights if w != self.node_id):
                acc = acc + weights[l] * (self.copies[l][k] - own)
            out.append(x + self.consensus_step * acc)
        return out

    def forget(self, neighbors: Sequence[int]) -> None:
        """Drop the copies of neighbors that left (a returning one needs a resync)."""
        for l in neighbors:
            self.copies.pop(l, None)

    # ---- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"own": [p.clone() for p in self.own],
                "copies": {str(l): [p.clone() for p in c] for l, c in self.copies.items()}}

    def check_state(self, state: object, like: Sequence[torch.Tensor]) -> None:
        """CheckpointError naming the part unless `state` fits a model shaped as `like`."""
        if not isinstance(state, Mapping) or not isinstance(state.get("copies"), Mapping):
            raise CheckpointError("replicas: expected a table with 'own' and 'copies' (a "
                                  "checkpoint of a run without --model-compressor?)")
        check_tensors("replica x^_i", state.get("own"), like)
        for l, copy in state["copies"].items():
            if not str(l).isdigit():
                raise CheckpointError(f"replicas: copy key {l!r}, expected a node id")
            check_tensors(f"replica copy of node {l}", copy, like)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.own = [p.detach().clone() for p in state["own"]]
        self.copies = {int(l): [p.detach().clone() for p in c]
                       for l, c in state["copies"].items()}

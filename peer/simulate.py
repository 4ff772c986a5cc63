"""The in-process simulator: every node of a run in one process, an in-memory Neighborhood.

It runs the same Node code as a deployment; only the Neighborhood differs. Each round every node
publishes x_i^t first, then every node runs its round; a node's cross-gradient for a neighbor is
computed on demand (and cached) exactly as a networked node computes it when asked.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from crossgrad.config import RunConfig
from crossgrad.display import PeerRow, Snapshot
from peer.builder import assignments, load_run_data, make_node, resolve_device
from peer.messages import (
    cross_gradient_raw,
    estimate_raw,
    model_raw,
    model_update_raw,
    replica_raw,
    stream_bytes,
)
from peer.metrics import Traffic, average, consensus_distance, digest, kinds_json, pair_sum
from peer.node import Node, Params
from peer.records import RunRecorder
from peer.replicas import Replica, Update
from peer.rounds import RoundRecord
from peer.training.allocator import keep_freed_memory
from peer.training.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointStore,
    file_name,
    make_checkpoint,
    run_identity,
)
from peer.training.partitions import summarize
from peer.wire import encode_raw

log = logging.getLogger(__name__)


def wire_bytes(node: Node, kind: str, requester: int, round_: int, tensors: Params) -> int:
    """What the message would take on the wire: the exact streams a networked node sends
    (peer/messages.py)."""
    if kind == "model_update":
        return stream_bytes(model_update_raw(node, round_))
    if kind == "replica":
        return stream_bytes(replica_raw(node, round_))
    if kind == "estimate":
        return stream_bytes(estimate_raw(node, requester, round_))
    if kind == "cross_gradient":
        return stream_bytes(cross_gradient_raw(node, requester, round_, tensors))
    return stream_bytes(model_raw(node, round_, tensors))


def dense_wire_bytes(names: Sequence[str], tensors: Params, sender: int, round_: int) -> int:
    """The bytes of one dense message (a model or a cross-gradient) as a peer streams it."""
    return stream_bytes(encode_raw(names, tensors, sender_id=sender, round_=round_))


class InMemoryNeighborhood:
    """The Neighborhood of one node when every node lives in this process.

    With `traffic`, every message is also encoded as a networked node would send it and its
    bytes are counted (receiver side), so simulated runs report honest bytes on the wire.
    `peers`: every node's neighborhood (a server resynchronising its copy of a requester's
    replica fetches through its own); `drop`: (kind, receiver, sender, round) of messages that
    never arrive, kind "model_update" or "cross_gradient" (a fault, injected: a cross-gradient
    is computed, so the sender's state moves on, and lost; the receiver resynchronises as a
    networked node does).
    """

    def __init__(self, me: int, nodes: dict[int, Node], traffic: Traffic | None = None,
                 peers: Mapping[int, InMemoryNeighborhood] | None = None,
                 drop: frozenset[tuple[str, int, int, int]] = frozenset()) -> None:
        self.me = me
        self.nodes = nodes
        self.traffic = traffic
        self.peers = peers if peers is not None else {}
        self.drop = drop

    def models(self, round_: int, neighbors: Sequence[int]) -> dict[int, Params]:
        out = {j: self.nodes[j].model(round_) for j in neighbors}
        for j, x in out.items():
            self._count(j, "model", round_, x)
        return out

    def _serve(self, server: Node, round_: int) -> Params | None:
        """server's cross-gradient for this node, computed as a networked server computes it:
        at this node's model, or under replicas at the server's copy of this node's replica
        (no model travels), resynchronised first when it is not this node's."""
        me = self.nodes[self.me]
        mine = (me.model(round_) if server.replicas is None else server.replica_copy(
            self.me, round_, self.peers[server.id], digest=me.own_replica(round_).digest))
        return None if mine is None else server.cross_gradient(self.me, round_, mine)

    def cross_gradients(self, round_: int, neighbors: Sequence[int]) -> dict[int, Params]:
        out: dict[int, Params] = {}
        for j in neighbors:
            grads = self._serve(self.nodes[j], round_)
            if grads is not None and ("cross_gradient", self.me, j, round_) not in self.drop:
                out[j] = grads
                self._count(j, "cross_gradient", round_, grads)
        return out

    def estimate_updates(self, round_: int, neighbors: Sequence[int]) -> dict[int, Update]:
        """Under EF21 / CLAG: each neighbor's message for this node's estimates."""
        out: dict[int, Update] = {}
        for j in neighbors:
            grads = self._serve(self.nodes[j], round_)
            message = self.nodes[j].three_point_message(self.me, round_)
            if grads is None or message is None or \
                    ("cross_gradient", self.me, j, round_) in self.drop:
                continue
            out[j] = Update(j, round_, message.base, [d.clone() for d in message.deltas],
                            message.crcs, message.skipped)
            self._count(j, "cross_gradient", round_, grads)
        return out

    def estimates(self, round_: int, neighbors: Sequence[int]) -> dict[int, Replica]:
        out: dict[int, Replica] = {}
        for j in neighbors:
            dense = self.nodes[j].three_point_estimates(self.me, round_)
            out[j] = Replica([p.clone() for p in dense.params], dense.round, dense.digest)
            self._count(j, "estimate", round_, [])
        return out

    def _count(self, sender: int, kind: str, round_: int, tensors: Params) -> None:
        if self.traffic is not None:
            self.traffic.add_received(sender, kind, wire_bytes(self.nodes[sender], kind,
                                                               self.me, round_, tensors))

    def model_updates(self, round_: int, neighbors: Sequence[int]) -> dict[int, Update]:
        me = self.nodes[self.me]
        assert me.replicas is not None
        out = {}
        for j in neighbors:
            if ("model_update", self.me, j, round_) in self.drop:
                continue
            records, base = self.nodes[j].model_update(round_)
            out[j] = me.replicas.decode_update(j, round_, base, records, me.params)
            self._count(j, "model_update", round_, [])
        return out

    def replicas(self, round_: int, neighbors: Sequence[int]) -> dict[int, Replica]:
        out = {}
        for j in neighbors:
            replica = self.nodes[j].own_replica(round_)
            out[j] = Replica([p.clone() for p in replica.params], replica.round, replica.digest)
            self._count(j, "replica", round_, [])
        return out

    def wait_seconds(self) -> float | None:
        """None: the calls' time was the neighbors' computing, here (peer/node.py, RoundPhases)."""
        return None


def simulate_round(ordered: Sequence[Node],
                   hoods: Mapping[int, InMemoryNeighborhood]) -> list[RoundRecord]:
    """One round of every node: publish, run_round, and under replicas finish_round once every
    node has published its model update (the second half needs the neighbors' q^t)."""
    for node in ordered:
        node.publish()
    records = [node.run_round(hoods[node.id]) for node in ordered]
    for node, record in zip(ordered, records, strict=True):
        node.finish_round(hoods[node.id], record)
    return records


@dataclass(frozen=True)
class Evaluation:
    """Test-set accuracy of every node's model, of the average model, and the consensus distance."""

    round: int
    accuracy: dict[int, float]
    loss: dict[int, float]
    average_accuracy: float
    consensus: float

    @property
    def mean(self) -> float:
        return sum(self.accuracy.values()) / len(self.accuracy)

    @property
    def min(self) -> float:
        return min(self.accuracy.values())


def evaluate(nodes: Sequence[Node], test_x: torch.Tensor, test_y: torch.Tensor,
             round_: int) -> Evaluation:
    models = [n.params for n in nodes]
    acc, loss = {}, {}
    for n in nodes:
        loss[n.id], acc[n.id] = n.trainer.evaluate(n.params, test_x, test_y)
    _, avg_acc = nodes[0].trainer.evaluate(average(models), test_x, test_y)
    return Evaluation(round=round_, accuracy=acc, loss=loss, average_accuracy=avg_acc,
                      consensus=consensus_distance(models))


def record_evaluation(recorder: RunRecorder, ev: Evaluation, rounds: int, loss: float,
                      seconds: float) -> str:
    """Write an evaluation to metrics.jsonl; the progress line that says it."""
    fields = {k: v for k, v in dataclasses.asdict(ev).items() if k != "round"}
    recorder.evaluation(ev.round, **fields, mean=ev.mean, min=ev.min)
    return (f"round {ev.round:>5}/{rounds}  train loss {loss:.4f}  "
            f"test acc mean {ev.mean:.4f} min {ev.min:.4f}  "
            f"avg-model {ev.average_accuracy:.4f}  consensus {ev.consensus:.4f}  "
            f"[{seconds:.1f} s]")


def snapshot(records: Sequence[RoundRecord], rounds: int, ev: Evaluation | None,
             traffic: dict[int, Traffic]) -> Snapshot:
    """Every node's row after a round, for crossgrad.display. Bytes where they are counted:
    each node counts what it receives, so what a node sent is what the others received from
    it."""
    received = {i: t.totals()[1] for i, t in traffic.items()}
    sent = dict.fromkeys(traffic, 0)
    for t in traffic.values():
        for j, (_, got) in t.per_peer().items():
            sent[j] = sent.get(j, 0) + got
    rows = tuple(PeerRow(node=r.node, round=r.round + 1, loss=r.loss,
                         accuracy=ev.accuracy[r.node] if ev else float("nan"),
                         evaluated=ev.round if ev else 0, sent=sent.get(r.node),
                         received=received.get(r.node),
                         state="done" if r.round + 1 >= rounds else "training")
                 for r in records)
    return Snapshot(rows=rows, rounds=rounds, nodes=len(rows))


@dataclass
class SimulationResult:
    config: RunConfig
    out_dir: Path
    final: Evaluation
    models: dict[int, Params]
    qp_fallbacks: dict[int, int]
    seconds: float
    traffic: dict[int, Traffic] = dataclasses.field(default_factory=dict)  # with count_bytes


def bytes_fields(traffic: Traffic | None) -> dict[str, object]:
    """The bytes a deployed peer adds to its round records (peer/loop.py), when counted: so
    that a plot reads bytes on the wire from either run directory. Only received bytes are
    counted in process (sent is 0); every byte sent is some node's received byte."""
    if traffic is None:
        return {}
    per_kind = traffic.per_kind()
    return {"bytes": pair_sum(per_kind.values()), "bytes_by_kind": kinds_json(per_kind)}


def _skips(nodes: Sequence[Node]) -> dict[str, object]:
    """Under EF21 / CLAG, the cross-gradient tensors each node skipped and sent in the run."""
    resyncs: dict[str, object] = ({"resyncs": {n.id: n.resyncs for n in nodes}}
               if any(n.replicas is not None or n.threepoint is not None for n in nodes) else {})
    counted = [n for n in nodes if n.threepoint is not None]
    if not counted:
        return resyncs
    return {**resyncs,
            "cross_skips": {n.id: n.threepoint.skips for n in counted if n.threepoint},
            "cross_sent": {n.id: n.threepoint.sent for n in counted if n.threepoint}}


def default_out_dir(config: RunConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return Path("runs") / f"{stamp}-{config.algorithm}-{config.dataset}"


def resume(nodes: dict[int, Node], directory: Path, config: RunConfig) -> int:
    """Load every node's latest usable checkpoint of this run from `directory`; the round they
    continue from. The simulator runs every node in lockstep, so when one node's newest
    checkpoint did not verify and it fell back to an older one, every node resumes from that
    older round (keep=2 holds it)."""
    run_id = run_identity(config)
    stores = {i: CheckpointStore(directory, i) for i in nodes}
    rounds: dict[int, int] = {}
    for i, node in nodes.items():
        def load(checkpoint: Checkpoint, node: Node = node) -> None:
            node.load_state_dict(checkpoint.state)  # checks every tensor; all or nothing

        found = stores[i].latest(run_id, accept=load)
        if found is None:
            raise CheckpointError(f"no usable checkpoint of node {i} for this run in "
                                  f"{directory}; start without resuming, or point at the "
                                  "checkpoints of a run with these settings")
        rounds[i] = found.round
    start = min(rounds.values())
    for i in (i for i, r in rounds.items() if r > start):
        older = [p for p in stores[i].paths() if p.name == file_name(i, start)]
        if not older:
            raise CheckpointError(f"node {i} has no checkpoint of round {start}, from which "
                                  f"node {min(rounds, key=rounds.__getitem__)} resumes; the "
                                  "simulator resumes every node from one round")
        nodes[i].load_state_dict(stores[i].read(older[0]).state)
    return start


def run(config: RunConfig, out_dir: Path | None = None,
        progress: Callable[[str], None] | None = None,
        watch: Callable[[Snapshot], None] | None = None,
        count_bytes: bool = False, checkpoint_every: int = 0,
        resume_from: Path | None = None,
        drop: frozenset[tuple[str, int, int, int]] = frozenset()) -> SimulationResult:
    """Simulate the whole run; write config.json, metrics.jsonl, summary.json and models.pt.

    checkpoint_every: every that many rounds, each node's state goes to out_dir/checkpoints
    (0: never). resume_from: a directory of such checkpoints; every node loads its latest and
    the run continues from that round to config.rounds, bit for bit as if never stopped.
    `progress` gets a line per evaluation; `watch` every node's row after each round
    (crossgrad.display; bytes only with count_bytes). drop: messages withheld, a fault
    injected for tests (InMemoryNeighborhood).
    """
    say = progress or (lambda line: None)
    started = time.perf_counter()
    keep_freed_memory()  # every pass reuses the last one's buffers (peer/training/allocator.py)
    device = resolve_device(config.device)
    data = load_run_data(config)
    say(f"data set {config.dataset}, partition {config.partition}, {config.nodes} nodes:")
    say(summarize(data.dataset.train_y.numpy(), data.parts, data.dataset.num_classes))
    _, assigned = assignments(config)
    nodes = {i: make_node(config, data, i, assigned[i], device) for i in range(config.nodes)}
    traffic = {i: Traffic() for i in nodes} if count_bytes else {}
    hoods: dict[int, InMemoryNeighborhood] = {}
    hoods.update({i: InMemoryNeighborhood(i, nodes, traffic.get(i), hoods, drop)
                  for i in nodes})
    out = out_dir or default_out_dir(config)
    recorder = RunRecorder(out, config)
    log.info("effective configuration: %s", json.dumps(dataclasses.asdict(config)))
    test_x, test_y = data.dataset.test_x, data.dataset.test_y
    ordered = [nodes[i] for i in sorted(nodes)]
    start = 0 if resume_from is None else resume(nodes, Path(resume_from), config)
    if start:
        say(f"resumed every node from round {start} ({resume_from})")
    stores = {i: CheckpointStore(out / "checkpoints", i) for i in nodes}
    ev: Evaluation | None = None
    try:
        for t in range(start, config.rounds):
            records = simulate_round(ordered, hoods)
            for rec in records:  # every request of round t is served by now
                recorder.round(rec, **bytes_fields(traffic.get(rec.node)),
                               **nodes[rec.node].cross_counts(t))
            if checkpoint_every and (t + 1) % checkpoint_every == 0:
                for node in ordered:
                    stores[node.id].save(make_checkpoint(config, node.id, node.assignment.epoch,
                                                         node.state_dict()))
            if (t + 1) % config.eval_every == 0 or t + 1 == config.rounds:
                ev = evaluate(ordered, test_x, test_y, t + 1)
                say(record_evaluation(recorder, ev, config.rounds,
                                      sum(r.loss for r in records) / len(records),
                                      time.perf_counter() - started))
            if watch is not None:
                watch(snapshot(records, config.rounds, ev, traffic))
    finally:
        recorder.close()
    final = ev or evaluate(ordered, test_x, test_y, config.rounds)  # resumed at the end
    fallbacks = {n.id: int(n.algorithm.stats.get("qp_fallbacks", 0)) for n in ordered}
    models = {n.id: [p.detach().cpu() for p in n.params] for n in ordered}
    received = {i: t.snapshot()["received"] for i, t in traffic.items()}
    summary = {"final": dataclasses.asdict(final), "mean": final.mean, "min": final.min,
               "bytes_received": received,
               "qp_fallbacks": fallbacks, "digests": {i: digest(m) for i, m in models.items()},
               **_skips(ordered),
               "seconds": time.perf_counter() - started}
    recorder.finish(summary, {i: m for i, m in models.items()}, "models.pt")
    return SimulationResult(config=config, out_dir=out, final=final, models=models,
                            qp_fallbacks=fallbacks, seconds=time.perf_counter() - started,
                            traffic=traffic)


def table(result: SimulationResult) -> str:
    """The final table: per-node accuracy and QP fallbacks, then mean, min, average model."""
    ev = result.final
    lines = [f"{'node':>6}  {'test acc':>8}  {'test loss':>9}  {'QP fallbacks':>12}"]
    for i in sorted(ev.accuracy):
        lines.append(f"{i:>6}  {ev.accuracy[i]:>8.4f}  {ev.loss[i]:>9.4f}  "
                     f"{result.qp_fallbacks[i]:>12}")
    lines += [
        f"{'mean':>6}  {ev.mean:>8.4f}",
        f"{'min':>6}  {ev.min:>8.4f}",
        f"average model accuracy  {ev.average_accuracy:.4f}",
        f"consensus distance      {ev.consensus:.4f}",
        f"rounds {result.config.rounds}, {result.seconds:.1f} s; run directory {result.out_dir}",
    ]
    return "\n".join(lines)

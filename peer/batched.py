"""The batched simulator engine: every node's round as a few tensor operations over a node axis.

`crossgrad simulate --engine batched`. The per-node engine (peer/simulate.py) runs each Node's
round in turn, one forward and backward per gradient; at 64 or 256 nodes of a small model that is
thousands of tiny passes a round, and their fixed costs (Python, autograd, thread wake-ups) are
the round. Here every node's parameters are stacked, (N, *shape) per tensor, and a round is:

  1. the mini-batches B_i^t of every node (the same Trainer.batch draws as the per-node engine)
  2. every gradient of the round in one vmapped call (peer/training/stacked.py): the
     self-gradients g_ii and, for cga, the cross-gradients g_il = grad F_l(x_i^t; B_l^t)
  3. cga: every node's QP per tensor (docs/algorithms.md, "cga", steps 1-4) with the Gram
     matrices of all nodes computed at once; the duals are solved per node by
     peer/algorithms/qp.solve_duals, with the fallback of project_many
  4. Nesterov momentum and mixing over a padded neighbor table, all nodes at once

Same data, partitions, topology, initial models, batches and learning rates as the per-node
engine; the results are not bit-identical to it (vmapped kernels sum in another order) but
agree within float32 round-off growing over the rounds (tests/unit/test_batched.py states the
tolerance). It runs dpsgd and cga with dense tensors; anything else is refused with the reason.
Every neighbor always answers in a simulation, so the per-node engine's "left out of the
round" paths (deadlines, implausible models) have nothing to do here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from crossgrad.config import RunConfig, uses_replicas
from crossgrad.display import Snapshot
from crossgrad.errors import ConfigError, SolverError
from peer.algorithms.cga import DivergedError
from peer.algorithms.qp import QPOptions, solve_duals
from peer.builder import RunData, assignments, load_run_data, make_node, resolve_device
from peer.metrics import Traffic, average, consensus_distance, digest
from peer.records import RunRecorder
from peer.rounds import Assignment, RoundRecord
from peer.simulate import (
    Evaluation,
    SimulationResult,
    bytes_fields,
    default_out_dir,
    dense_wire_bytes,
    record_evaluation,
    snapshot,
)
from peer.training.allocator import keep_freed_memory
from peer.training.partitions import summarize
from peer.training.stacked import Params, StackedModel, stack
from peer.training.trainer import Trainer

log = logging.getLogger(__name__)

ENGINES = ("nodes", "batched")
SUPPORTED = ("dpsgd", "cga")


def refuse_unsupported(config: RunConfig) -> RunConfig:
    """ConfigError unless the batched engine runs `config` (dpsgd or cga, dense tensors)."""
    if config.algorithm not in SUPPORTED:
        raise ConfigError(f"--engine batched runs {' and '.join(SUPPORTED)}, not "
                          f"{config.algorithm}; use --engine nodes (the default) for it")
    if config.compressor not in ("", "none"):
        raise ConfigError(f"--engine batched sends dense cross-gradients; --compressor "
                          f"{config.compressor} runs with --engine nodes")
    if uses_replicas(config):
        raise ConfigError("--engine batched mixes dense models; model replicas "
                          "(--model-compressor, --consensus-step) run with --engine nodes")
    return config


@dataclass(frozen=True)
class Plan:
    """The fixed shape of every round: gradient tasks, mixing table and QP rows.

    models, data: (T,) the tasks, model models[t] on node data[t]'s batch; tasks 0..N-1 are the
    self-gradients, then for cga one task per (i, l in sorted N(i)): g_il.
    peers, mix_weights: (N, S) node i mixes sum_s mix_weights[i, s] x_{peers[i, s]}; slot 0 is
    i itself, padding repeats i with weight 0.
    rows, row_weights: (N, R) the task of g_il and pi_il per neighbor slot (padding: task 0,
    weight 0, an all-zero QP row, which the QP drops as project_many does).
    """

    models: torch.Tensor
    data: torch.Tensor
    peers: torch.Tensor
    mix_weights: torch.Tensor
    rows: torch.Tensor
    row_weights: torch.Tensor
    neighbors: tuple[tuple[int, ...], ...]


def make_plan(assigned: Mapping[int, Assignment], cross: bool,
              device: torch.device) -> Plan:
    n = len(assigned)
    neighbors = tuple(tuple(sorted(assigned[i].neighbors)) for i in range(n))
    width = 1 + max((len(nb) for nb in neighbors), default=0)
    peers = torch.arange(n).unsqueeze(1).repeat(1, width)  # (N, S)
    mix_weights = torch.zeros(n, width, dtype=torch.float32)  # (N, S)
    rows = torch.zeros(n, max(1, width - 1), dtype=torch.long)  # (N, R)
    row_weights = torch.zeros(n, max(1, width - 1), dtype=torch.float32)  # (N, R)
    models, data = list(range(n)), list(range(n))
    for i, nb in enumerate(neighbors):
        weights = assigned[i].weights
        mix_weights[i, 0] = weights[i]
        for s, l in enumerate(nb):
            peers[i, 1 + s] = l
            mix_weights[i, 1 + s] = weights[l]
            if cross:
                rows[i, s] = len(models)
                row_weights[i, s] = weights[l]
                models.append(i)
                data.append(l)
    as_index = lambda v: torch.as_tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return Plan(models=as_index(models), data=as_index(data), peers=peers.to(device),
                mix_weights=mix_weights.to(device), rows=rows.to(device),
                row_weights=row_weights.to(device), neighbors=neighbors)


def _gather(t: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, S, d): t[index[i, s]] * weights[i, s], from t (M, d), index and weights (N, S)."""
    return t[index] * weights.unsqueeze(-1).to(t.dtype)


class StackedCGA:
    """CGA's projection for every node at once, with each node's QP memory and counters.

    For tensor k, node i's problem is project_many's: g = pi_ii g_ii[k], rows pi_il g_il[k] in
    sorted l, all-zero rows dropped. The Gram matrices M M^T and M g of every node are one
    batched float64 product; the duals of node i's tensors go to solve_duals together (one
    cvxopt call where they conflict), a failed one falls back to node i's previous duals of
    that tensor, or v = margin, and is counted.
    """

    def __init__(self, nodes: int, options: QPOptions) -> None:
        self.options = options
        self.previous_v: list[dict[int, np.ndarray]] = [{} for _ in range(nodes)]
        self.stats: list[dict[str, float]] = [{} for _ in range(nodes)]

    def project(self, own: Params, grads: Params, plan: Plan) -> Params:
        """own: [(N, *shape)] the weighted self-gradients; grads: [(T, *shape)] every task's."""
        n = int(own[0].shape[0])
        flat_own = [g.reshape(n, -1).double() for g in own]  # (N, d)
        rows = [_gather(g.reshape(g.shape[0], -1).double(), plan.rows, plan.row_weights)
                for g in grads]  # (N, R, d) per tensor
        grams = [(m @ m.transpose(1, 2)).cpu().numpy() for m in rows]  # (N, R, R)
        mgs = [(m @ g.unsqueeze(-1)).squeeze(-1).cpu().numpy()
               for m, g in zip(rows, flat_own, strict=True)]  # (N, R)
        duals = np.zeros((len(own), n, rows[0].shape[1]))  # (K, N, R); 0 for dropped rows
        for i in range(n):
            self._solve_node(i, [g[i] for g in grams], [q[i] for q in mgs], duals[:, i])
        out: Params = []
        for k, (g, m) in enumerate(zip(flat_own, rows, strict=True)):
            v = torch.as_tensor(duals[k], device=m.device)  # (N, R)
            projected = g + torch.einsum("nrd,nr->nd", m, v)  # (N, d)
            out.append(projected.reshape(own[k].shape).to(own[k].dtype))
        return out

    def _solve_node(self, i: int, grams: Sequence[np.ndarray], mgs: Sequence[np.ndarray],
                    duals: np.ndarray) -> None:
        """Fill duals[k, kept rows] for node i's tensors, as project_many and aggregate do."""
        if not all(np.all(np.isfinite(a)) for a in (*grams, *mgs)):
            raise DivergedError(f"node {i}: a gradient holds NaN or Inf; training diverged: "
                                "lower --lr")
        kept = [np.flatnonzero(np.diag(g) > 0) for g in grams]  # (t_k,) rows not all zero
        active = [k for k, rows in enumerate(kept) if rows.size]
        problems = [(grams[k][np.ix_(kept[k], kept[k])], mgs[k][kept[k]]) for k in active]
        stats = self.stats[i]
        started = time.perf_counter()
        for k, solution in zip(active, solve_duals(problems, self.options), strict=True):
            t = kept[k].size
            if isinstance(solution, SolverError):
                prev = self.previous_v[i].get(k)
                ok = prev is not None and prev.shape == (t,) and bool(np.all(np.isfinite(prev)))
                solution = prev.copy() if ok and prev is not None else np.full(
                    t, self.options.margin)
                stats["qp_fallbacks"] = stats.get("qp_fallbacks", 0) + 1
            self.previous_v[i][k] = solution
            stats["qp_calls"] = stats.get("qp_calls", 0) + 1
            duals[k, kept[k]] = solution
        stats["qp_seconds"] = stats.get("qp_seconds", 0.0) + time.perf_counter() - started


@dataclass(frozen=True)
class RoundResult:
    """What one batched round did: per node loss and learning rate, the phases' seconds."""

    losses: list[float]
    lrs: list[float]
    phases: dict[str, float]


class BatchedEngine:
    """Every node of a run as stacked tensors; `round()` runs round t of all of them."""

    def __init__(self, config: RunConfig, data: RunData, device: torch.device) -> None:
        refuse_unsupported(config)
        self.config = config
        _, self.assigned = assignments(config)
        # The per-node builder gives the same initial models, partitions and batch orders.
        nodes = [make_node(config, data, i, self.assigned[i], device)
                 for i in range(config.nodes)]
        self.trainers: list[Trainer] = [node.trainer for node in nodes]
        self.names = self.trainers[0].names
        self.params: Params = stack([node.params for node in nodes])  # (N, *shape) each
        self.momentum: Params = [torch.zeros_like(p) for p in self.params]
        self.mu = float(config.momentum)
        self.cga = (StackedCGA(config.nodes, QPOptions(margin=config.margin))
                    if config.algorithm == "cga" else None)
        self.plan = make_plan(self.assigned, cross=self.cga is not None, device=device)
        self.model = StackedModel(self.trainers[0].model, self.names)
        self.device = device
        self.round = 0
        self.last_grads: Params = []  # the last round's gradients per task (bytes on the wire)

    def batches(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every node's B_i^t, padded: x (N, b, C, H, W), y (N, b), mask (N, b)."""
        drawn = [trainer.batch(t) for trainer in self.trainers]
        b = max(int(y.shape[0]) for _, y in drawn)
        x = drawn[0][0].new_zeros((len(drawn), b, *drawn[0][0].shape[1:]))
        y = drawn[0][1].new_zeros((len(drawn), b))
        mask = torch.zeros(len(drawn), b, device=self.device)
        for i, (xi, yi) in enumerate(drawn):
            x[i, :xi.shape[0]], y[i, :yi.shape[0]], mask[i, :yi.shape[0]] = xi, yi, 1.0
        return x, y, mask

    def round_(self) -> RoundResult:
        """Round self.round of every node (steps 1-4 of the module docstring)."""
        clock = time.perf_counter
        t, plan, n = self.round, self.plan, self.config.nodes
        started = clock()
        x, y, mask = self.batches(t)
        losses, grads = self.model.gradients(self.params, plan.models, plan.data, x, y, mask)
        self.last_grads = grads
        self_grads = [g[:n] for g in grads]  # (N, *shape): tasks 0..N-1 are g_ii
        computed = clock()
        qp_seconds = 0.0
        with torch.no_grad():
            if self.cga is not None:
                w_self = plan.mix_weights[:, 0]  # (N,) pi_ii
                own = [g * w_self.view(-1, *[1] * (g.dim() - 1)) for g in self_grads]
                direction_in = self.cga.project(own, grads, plan)
                qp_seconds = clock() - computed  # the Gram matrices and the solves
            else:
                direction_in = self_grads
            lrs = [trainer.lr(t) for trainer in self.trainers]
            lr = torch.tensor(lrs, dtype=self.params[0].dtype, device=self.device)  # (N,)
            new: Params = []
            for k, (p, m, g) in enumerate(zip(self.params, self.momentum, direction_in,
                                              strict=True)):
                m.mul_(self.mu).add_(g)  # m_i <- mu m_i + g (Nesterov, as peer/algorithms)
                step = g + self.mu * m
                flat = p.reshape(n, -1)  # (N, d)
                mixed = _gather(flat, plan.peers, plan.mix_weights).sum(dim=1)  # (N, d)
                scale = lr.view(-1, *[1] * (p.dim() - 1))
                new.append(mixed.reshape(p.shape) - scale * step)
                self.momentum[k] = m
            self.params = new
        self.round = t + 1
        total = clock() - started
        phases = {"compute": computed - started, "wait": 0.0, "transfer": 0.0,
                  "qp": qp_seconds, "mix": max(0.0, total - (computed - started) - qp_seconds)}
        return RoundResult(losses=losses[:n].tolist(), lrs=lrs, phases=phases)

    def node_params(self, i: int) -> Params:
        return [p[i].detach().clone() for p in self.params]

    def node_stats(self, i: int) -> dict[str, float]:
        return {} if self.cga is None else self.cga.stats[i]


def _count_bytes(engine: BatchedEngine, traffic: Mapping[int, Traffic], t: int,
                 models: Params) -> None:
    """Receiver-side bytes of round t, each message encoded as a peer would stream it: x_j^t
    to every neighbor of j and, for cga, g_il from l to i (peer/simulate.py, wire_bytes)."""
    plan = engine.plan
    for j, nb in enumerate(plan.neighbors):
        sent = dense_wire_bytes(engine.names, [p[j] for p in models], j, t)
        for i in nb:
            traffic[i].add_received(j, "model", sent)
    if engine.cga is not None:
        for task in range(engine.config.nodes, int(plan.models.shape[0])):
            i, l = int(plan.models[task]), int(plan.data[task])
            grads = [g[task] for g in engine.last_grads]
            traffic[i].add_received(l, "cross_gradient",
                                    dense_wire_bytes(engine.names, grads, l, t))


def evaluate_all(engine: BatchedEngine, test_x: torch.Tensor, test_y: torch.Tensor,
                 round_: int) -> Evaluation:
    """peer/simulate.evaluate for stacked models: every node's in one vmapped pass."""
    loss, acc = engine.model.evaluate(engine.params, test_x.to(engine.device),
                                      test_y.to(engine.device))
    models = [engine.node_params(i) for i in range(engine.config.nodes)]
    _, avg_acc = engine.trainers[0].evaluate(average(models), test_x, test_y)
    return Evaluation(round=round_, accuracy=dict(enumerate(acc.tolist())),
                      loss=dict(enumerate(loss.tolist())), average_accuracy=avg_acc,
                      consensus=consensus_distance(models))


def run(config: RunConfig, out_dir: Path | None = None,
        progress: Callable[[str], None] | None = None,
        watch: Callable[[Snapshot], None] | None = None,
        count_bytes: bool = False) -> SimulationResult:
    """peer/simulate.run with the batched engine: the same run directory (config.json,
    metrics.jsonl, summary.json with "engine": "batched", models.pt).

    A round record's `seconds` (and its phases) is the node's share of the lockstep round, the
    round's time over N: summed over the nodes it is the round, as in the per-node engine.
    """
    refuse_unsupported(config)
    say = progress or (lambda line: None)
    started = time.perf_counter()
    keep_freed_memory()  # every pass reuses the last one's buffers (peer/training/allocator.py)
    device = resolve_device(config.device)
    data = load_run_data(config)
    say(f"data set {config.dataset}, partition {config.partition}, {config.nodes} nodes "
        "(batched engine):")
    say(summarize(data.dataset.train_y.numpy(), data.parts, data.dataset.num_classes))
    engine = BatchedEngine(config, data, device)
    traffic = {i: Traffic() for i in range(config.nodes)} if count_bytes else {}
    out = out_dir or default_out_dir(config)
    recorder = RunRecorder(out, config)
    log.info("effective configuration (batched engine): %s",
             json.dumps(dataclasses.asdict(config)))
    test_x, test_y = data.dataset.test_x, data.dataset.test_y
    n = config.nodes
    ev: Evaluation | None = None
    try:
        for t in range(config.rounds):
            models = engine.params
            result = engine.round_()
            if traffic:
                _count_bytes(engine, traffic, t, models)
            share = sum(result.phases.values()) / n
            records = [RoundRecord(node=i, round=t, loss=result.losses[i], lr=result.lrs[i],
                                   answered=list(engine.plan.neighbors[i]), missing=[],
                                   seconds=share, stats=dict(engine.node_stats(i)),
                                   phases={k: v / n for k, v in result.phases.items()})
                       for i in range(n)]
            for rec in records:
                recorder.round(rec, **bytes_fields(traffic.get(rec.node)))
            if (t + 1) % config.eval_every == 0 or t + 1 == config.rounds:
                ev = evaluate_all(engine, test_x, test_y, t + 1)
                say(record_evaluation(recorder, ev, config.rounds, sum(result.losses) / n,
                                      time.perf_counter() - started))
            if watch is not None:
                watch(snapshot(records, config.rounds, ev, traffic))
    finally:
        recorder.close()
    final = ev or evaluate_all(engine, test_x, test_y, config.rounds)
    fallbacks = {i: int(engine.node_stats(i).get("qp_fallbacks", 0)) for i in range(n)}
    models_out = {i: [p.cpu() for p in engine.node_params(i)] for i in range(n)}
    summary = {"final": dataclasses.asdict(final), "mean": final.mean, "min": final.min,
               "engine": "batched",
               "bytes_received": {i: t.snapshot()["received"] for i, t in traffic.items()},
               "qp_fallbacks": fallbacks,
               "digests": {i: digest(m) for i, m in models_out.items()},
               "seconds": time.perf_counter() - started}
    recorder.finish(summary, models_out, "models.pt")
    return SimulationResult(config=config, out_dir=out, final=final, models=models_out,
                            qp_fallbacks=fallbacks, seconds=time.perf_counter() - started,
                            traffic=traffic)

"""A deployed peer: a long-lived gRPC server, a bootstrap session and a round loop, composed.

    PeerRuntime          this module: composes the parts, answers GetStatus, starts and stops
    PeerServicer         peer/servicer.py: the Peer service (thin)
    BootstrapSession     peer/session.py: join, first assignment, heartbeats, new epochs, leave
    RoundLoop            peer/loop.py: the rounds, assignments between them, catch-up, records
    RunRecorder          peer/records.py: the run directory (the simulator writes it too)

Start-up: serve the Peer service (health NOT_SERVING), Join the bootstrap (which answers the
run's settings), load this node's partition, Join again with the sample count, wait for the
assignment (WatchAssignment), build the Node exactly as the simulator does, then SERVING and
heartbeats from the session's thread. After the last round the peer keeps serving until its
neighbors are done too (they may still need its last model and cross-gradients), writes its
results, Leaves and stops. SIGTERM (stop()) ends the loop after the current round, then does
the same.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bootstrap.registry import AssignmentView
from crossgrad.config import RunConfig
from crossgrad.errors import ConfigError, DataError, Unavailable
from crossgrad.exporter import MetricsEndpoint, metrics_host
from crossgrad.guard import CallerLimits
from crossgrad.rpc import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_MODEL_BYTES,
    RESERVED_UNARY_WORKERS,
    RunningServer,
    Service,
    make_server,
)
from crossgrad.security import Security
from crossgrad.v1 import peer_pb2
from peer.builder import (
    load_run_data,
    make_node,
    resolve_device,
    validate_config,
)
from peer.client import GrpcNeighborhood, check_model_fits
from peer.exporter import PeerCollector
from peer.loop import PeerState, RoundLoop, assignment_of
from peer.metrics import Pair, Traffic, digest, kind_totals, kinds_json, pair_sum
from peer.node import Node, Params
from peer.records import RunRecorder
from peer.servicer import PeerServicer, add_to_server
from peer.session import BootstrapSession, Progress, Stopped
from peer.training.allocator import keep_freed_memory
from peer.training.checkpoint import (
    DEFAULT_EVERY,
    Checkpoint,
    CheckpointStore,
    make_checkpoint,
    run_identity,
)

log = logging.getLogger(__name__)

# Streams the Peer server serves at once by default (GetModel, ComputeCrossGradient, a health
# Watch): 64 neighbors, each fetching this node's model and asking for its cross-gradient in
# the same round. Each stream holds a server thread and a piece (--chunk-bytes) of memory, not
# a copy of the model (peer/wire.py); threads start only when calls need them. One stream over
# the limit is refused UNAVAILABLE at once, and RESERVED_UNARY_WORKERS more threads are kept for
# unary calls whatever the streams do (crossgrad/rpc.py; docs/benchmarks.md, "Load").
DEFAULT_MAX_STREAMS = 128



# What one neighbor may take from this node per round, in models: a round needs two streams
# (its model, its cross-gradient) at most the model's size each; the rest is room for a retry
# and a catch-up fetch. FRAMING_ALLOWANCE covers the headers and chunk framing of one stream.
MODELS_PER_ROUND = 4
FRAMING_ALLOWANCE = 1 << 20


@dataclass(frozen=True)
class PeerOptions:
    """How this process runs (not what the run computes: that comes from the bootstrap)."""

    node_id: int
    bootstrap: str  # host:port of the bootstrap
    bind: str = "127.0.0.1:0"  # where to serve; port 0 picks a free port
    advertise: str = ""  # host:port neighbors use; default: the bound address
    data_dir: str | None = None
    device: str = "auto"
    out: Path = Path("runs/peer")
    timeout: float = 60.0  # deadline of every neighbor call (s)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    join_timeout: float = 300.0  # how long to wait for the run to assemble (s)
    checkpoint_dir: Path | None = None  # None: no checkpoints
    checkpoint_every: int = DEFAULT_EVERY  # rounds; 0: only when stopped
    resume: bool = False  # require a checkpoint of this run to start from
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES  # the largest stream accepted from a peer
    security: Security | None = None  # TLS material and token; None: plaintext (tests)
    limits: CallerLimits | None = None  # per caller; None: crossgrad.guard's defaults
    bytes_per_round: int = 0  # streamed to one neighbor per round; 0: MODELS_PER_ROUND models
    max_streams: int = DEFAULT_MAX_STREAMS  # streams served at once; one more: UNAVAILABLE
    # Prometheus metrics over HTTP on this port of the bind host (0: any free port; None: none)
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.chunk_bytes <= DEFAULT_MAX_MESSAGE_BYTES // 2:
            raise ConfigError(f"chunk size must be in 1..{DEFAULT_MAX_MESSAGE_BYTES // 2} bytes "
                              f"(half the message limit); got {self.chunk_bytes}")
        if not self.timeout > 0:
            raise ConfigError(f"--timeout must be positive; got {self.timeout}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"--checkpoint-every must be 0 (only on SIGTERM) or more; got "
                              f"{self.checkpoint_every}")
        if self.max_model_bytes < 1:
            raise ConfigError(f"--max-model-bytes must be positive; got {self.max_model_bytes}")
        if self.bytes_per_round < 0:
            raise ConfigError(f"--max-bytes-per-round must be 0 (automatic) or more; got "
                              f"{self.bytes_per_round}")
        if self.max_streams < 1:
            raise ConfigError(f"--max-streams must be positive (a peer serves two streams per "
                              f"neighbor in a round); got {self.max_streams}")
        if self.resume and self.checkpoint_dir is None:
            raise ConfigError("--resume needs a checkpoint directory (--checkpoint-dir)")


# How much lower than the server's threads the compute runs (nice levels, Linux).
COMPUTE_NICENESS = 10


def yield_to_serving(niceness: int = COMPUTE_NICENESS) -> bool:
    """Lower the scheduling priority of the calling thread (the round loop), and so of every
    thread it starts from now on (torch's intra-op pool, the neighbor-fetching pool), below the
    server's threads, which already run: a peer that trains on every core still answers health
    checks, GetStatus and its neighbors' calls at once (docs/benchmarks.md, "Liveness"). Linux
    only (per-thread nice); a no-op (False) elsewhere or when not permitted."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        return False
    return True


def kind_bytes(kinds: dict[str, Pair]) -> list[peer_pb2.KindBytes]:
    """{kind: (sent, received)} as KindBytes, in the dict's (sorted) order."""
    return [peer_pb2.KindBytes(kind=k, sent_bytes=s, received_bytes=r)
            for k, (s, r) in kinds.items()]


# Rounds beyond this are refused when the run's own count is not known (a node in a test).
MAX_ROUND = 2**32

__all__ = ["PeerOptions", "PeerRuntime", "PeerState", "Stopped"]


class PeerRuntime:
    """One running peer: the parts above, composed; the servicer reads it."""

    def __init__(self, options: PeerOptions) -> None:
        keep_freed_memory()
        self.options = options
        self.node_id = options.node_id
        self.timeout = options.timeout
        self.chunk_bytes = options.chunk_bytes
        self.bytes_per_round = options.bytes_per_round or MODELS_PER_ROUND * FRAMING_ALLOWANCE
        self.traffic = Traffic()
        self.address = ""
        self.server: RunningServer | None = None
        self.metrics: MetricsEndpoint | None = None  # /metrics (options.metrics_port)
        self.session: BootstrapSession | None = None
        self.settings: RunConfig | None = None
        self.node: Node | None = None
        self.hood: GrpcNeighborhood | None = None
        self.loop: RoundLoop | None = None
        self.recorder: RunRecorder | None = None
        self.test_set: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rejected: dict[str, int] = {}  # requests refused, by reason (count_rejected)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._pending: AssignmentView | None = None  # announced before the loop runs
        self.store: CheckpointStore | None = None
        self.resumes = 0  # restarts from a checkpoint in this run (this one included)
        self.resumed_from: Checkpoint | None = None

    @property
    def state(self) -> PeerState:
        if self.loop is not None:
            return self.loop.state
        return PeerState.STARTING if self.node is None else PeerState.TRAINING

    def last_round(self) -> int:
        """The last round a neighbor may ask for: the run's round count (a node publishes its
        final model under it), or MAX_ROUND before the settings are known."""
        return self.settings.rounds if self.settings is not None else MAX_ROUND

    def draining(self) -> bool:
        """Whether the peer stopped before its last round (SIGTERM)."""
        return self.state is PeerState.DRAINING

    def wait_ready(self, timeout: float) -> Node | None:
        """The node once built (neighbors may call before this peer has its assignment)."""
        self._ready.wait(timeout)
        return self.node

    # ---- used by the servicer ------------------------------------------------------------
    def count_rejected(self, reason: str) -> None:
        """A neighbor's request refused, for `reason` (a crossgrad_rejected_messages_total
        label: not_a_neighbor, past_last_round)."""
        with self._lock:
            self._rejected[reason] = self._rejected.get(reason, 0) + 1

    def rejected(self) -> dict[str, int]:
        """Messages refused, by reason: neighbors' requests (count_rejected) and neighbors'
        answers (peer/client.py, REJECTED_ANSWERS)."""
        hood = self.hood
        with self._lock:
            counts = dict(self._rejected)
        for reason, n in (dict(hood.misses.rejected_by) if hood is not None else {}).items():
            counts[reason] = counts.get(reason, 0) + n
        return counts

    def assignment_may_be_stale(self) -> None:
        """A neighbor refused this node as not its neighbor, or a node that is not one asked it
        for a model: one of the two has not heard of the newest epoch. Ask the bootstrap now."""
        if self.session is not None:
            self.session.refresh_soon()

    def neighborhood(self) -> GrpcNeighborhood:
        """How this node reaches its neighbors (Unavailable while it has none)."""
        if self.hood is None:
            raise Unavailable(f"node {self.node_id} is starting: it has no neighbors yet")
        return self.hood

    def fetch_model(self, peer: int, round_: int, timeout: float) -> Params:
        if self.hood is None:
            raise Unavailable(f"node {self.node_id} is starting: it has no neighbors yet")
        return self.hood.fetch_model(peer, round_, timeout)

    def status(self) -> peer_pb2.PeerStatus:
        node, hood, loop = self.node, self.hood, self.loop
        per_link = self.traffic.per_link()  # one view, so links, kinds and totals agree
        links = []
        for peer, kinds in per_link.items():
            link_sent, link_received = pair_sum(kinds.values())
            links.append(peer_pb2.LinkBytes(peer_id=peer, sent_bytes=link_sent,
                                            received_bytes=link_received,
                                            kinds=kind_bytes(kinds)))
        per_kind = kind_totals(per_link)
        sent, received = pair_sum(per_kind.values())
        status = peer_pb2.PeerStatus(
            node_id=self.node_id, address=self.address, state=self.state.value,
            total_rounds=self.settings.rounds if self.settings else 0,
            algorithm=self.settings.algorithm if self.settings else "",
            bytes_sent=sent, bytes_received=received, links=links, kinds=kind_bytes(per_kind),
            rejected_messages=sum(self.rejected().values()),
            missed_neighbor_answers=hood.misses.total if hood else 0,
            waiting_on=hood.waiting() if hood else [],
            refusals=self.server.refusals.snapshot() if self.server else {})
        if loop is not None:
            status.last_loss = loop.last_loss
            status.last_accuracy = loop.last_accuracy
            status.catch_ups = loop.catch_ups.count
            status.caught_up_to_round = loop.catch_ups.last_round
            status.evaluated_round = loop.evaluated_round
            record = loop.last_record
            if record is not None:
                status.last_round = record.round
                status.last_round_seconds = record.seconds
                status.last_round_phases.update(record.phases)
                status.last_round_served_seconds = record.served_seconds
        else:
            status.last_loss = status.last_accuracy = float("nan")
        status.resumes = self.resumes
        if self.resumed_from is not None:
            status.resumed_from_round = self.resumed_from.round
        if node is not None:
            status.round = node.round
            status.topology_epoch = node.assignment.epoch
            status.resyncs = node.resyncs
            if node.threepoint is not None:
                status.cross_skips = node.threepoint.skips
                status.cross_sent = node.threepoint.sent
            status.neighbor_ids.extend(node.assignment.neighbors)
            for j in node.assignment.neighbors:
                status.weights[j] = node.assignment.weights[j]
            status.self_weight = node.assignment.weights[node.id]
            status.qp_fallbacks = int(node.algorithm.stats.get("qp_fallbacks", 0))
        return status

    def stop(self) -> None:
        """Ask the loop to finish the current round and shut down cleanly (also interrupts
        joining and the wait for the run to assemble)."""
        self._stop.set()
        if self.loop is not None:
            self.loop.stop_event.set()
        if self.session is not None:
            self.session.stop()

    # ---- used by the bootstrap session (its thread) ---------------------------------------
    def progress(self) -> Progress:
        loop = self.loop
        if loop is None:
            return Progress(round=self.node.round if self.node else 0, loss=math.nan,
                            health=self.state.value.lower())  # no loss before the first round
        return loop.progress()

    def offer(self, view: AssignmentView) -> None:
        """A new assignment: to the loop, or kept for it until it runs."""
        with self._lock:
            loop = self.loop
            if loop is None:
                self._pending = view
                return
        loop.offer(view)

    # ---- start-up ------------------------------------------------------------------------
    def start(self) -> None:
        """Serve, join, build the node; health SERVING when this returns."""
        self.serve()
        yield_to_serving()
        self.session = session = BootstrapSession(self.options.bootstrap, self.node_id,
                                                  join_timeout=self.options.join_timeout,
                                                  security=self.options.security)
        if self._stop.is_set():
            session.stop()
        settings = session.join(self.address, 0)
        # Heartbeats from now on: loading data and building the model may take longer than a
        # lease, and the bootstrap must not take this node for dead meanwhile.
        session.start(self.progress, self.offer)
        try:  # what the bootstrap sent is a peer's message like any other: checked first
            settings = validate_config(dataclasses.replace(
                settings, data_dir=self.options.data_dir, device=self.options.device))
        except ConfigError as exc:
            raise ConfigError(f"the run settings from the bootstrap at {self.options.bootstrap} "
                              f"cannot run here: {exc}") from None
        self.settings = settings
        found = self._find_checkpoint(settings)
        data = load_run_data(settings)
        samples = len(data.parts[self.node_id])
        session.join(self.address, samples, resumed=found is not None,
                     checkpoint_round=found.round if found is not None else 0)
        log.info("node %d joined with %d samples; waiting for the assignment", self.node_id,
                 samples)
        view = session.wait_assignment()
        assignment, addresses = assignment_of(view)
        self.test_set = (data.dataset.test_x, data.dataset.test_y)
        node = make_node(settings, data, self.node_id, assignment,
                         resolve_device(settings.device))
        check_model_fits(node.names, node.params, self.options.max_model_bytes)
        if found is not None:
            try:
                node.load_state_dict(found.state)
            except DataError as exc:
                raise ConfigError(f"the checkpoint of round {found.round} does not fit this "
                                  f"node: {exc}") from None
            self.resumes = int(found.state.get("resumes", 0)) + 1
            self.resumed_from = found
            log.warning("node %d resumed from its checkpoint of round %d (topology epoch %d "
                        "then, %d now)", self.node_id, found.round, found.epoch, view.epoch)
        self.attach(node, addresses, view.epoch)
        log.info("node %d serving at %s; neighbors %s", self.node_id, self.address, addresses)

    def _find_checkpoint(self, settings: RunConfig) -> Checkpoint | None:
        """The latest usable checkpoint of this run in the checkpoint directory, if any; with
        --resume, a ConfigError when there is none."""
        directory = self.options.checkpoint_dir
        if directory is None:
            return None
        self.store = CheckpointStore(directory, self.node_id)
        found = self.store.latest(run_identity(settings))
        if found is None and self.options.resume:
            raise ConfigError(f"--resume: no usable checkpoint of this run for node "
                              f"{self.node_id} in {directory} (see the warnings above, if any); "
                              "start without --resume to begin from round 0")
        return found

    def checkpoint(self, reason: str) -> None:
        """Save the node's state (every K rounds, and when stopped). A failure to write (a
        full disk) is logged, never fatal: the run goes on, the previous checkpoints stay."""
        if self.store is None or self.node is None or self.settings is None:
            return
        state = self.node.state_dict()
        state["resumes"] = self.resumes
        try:
            path = self.store.save(make_checkpoint(self.settings, self.node_id,
                                                   self.node.assignment.epoch, state))
        except (DataError, OSError) as exc:
            log.error("node %d round %d: %s checkpoint not written: %s", self.node_id,
                      self.node.round, reason, exc)
            return
        log.info("node %d round %d: %s checkpoint %s", self.node_id, self.node.round, reason,
                 path)

    def serve(self) -> RunningServer:
        """Start the Peer server (health NOT_SERVING until attach()).

        The one place a peer's server limits are set: streams at once (`max_streams`; the pool
        also keeps RESERVED_UNARY_WORKERS threads for unary calls) and make_server's own.
        """
        servicer = PeerServicer(self)
        self.server = make_server(
            self.options.bind, [Service("crossgrad.v1.Peer",
                                        lambda s: add_to_server(servicer, s))],
            max_workers=self.options.max_streams + RESERVED_UNARY_WORKERS,
            security=self.options.security, limits=self.options.limits)
        self.address = self.options.advertise or self.server.address
        if self.options.metrics_port is not None:
            try:
                self.metrics = MetricsEndpoint(metrics_host(self.options.bind),
                                               self.options.metrics_port, [PeerCollector(self)])
            except BaseException:
                self.server.stop(0)
                raise
        return self.server

    def attach(self, node: Node, addresses: dict[int, str], epoch: int) -> None:
        """Make `node` the one served and driven; neighbors reached at `addresses`. SERVING."""
        node.assignment = dataclasses.replace(node.assignment, epoch=epoch)
        if not self.options.bytes_per_round:
            model = sum(p.numel() * p.element_size() for p in node.params)
            self.bytes_per_round = MODELS_PER_ROUND * (model + FRAMING_ALLOWANCE)
        self.hood = GrpcNeighborhood(node, addresses, timeout=self.timeout, traffic=self.traffic,
                                     max_model_bytes=self.options.max_model_bytes,
                                     security=self.options.security,
                                     on_not_a_neighbor=self.assignment_may_be_stale)
        self.node = node
        self._ready.set()
        if self.server is not None:
            self.server.set_serving()

    # ---- the run -------------------------------------------------------------------------
    def run(self) -> dict[str, object]:
        """The round loop; returns the summary written to OUT/summary.json."""
        assert self.node is not None and self.hood is not None and self.settings is not None
        node, cfg = self.node, self.settings
        self.recorder = recorder = RunRecorder(self.options.out, cfg)
        test_set = self.test_set if self.test_set is not None else (
            torch.empty(0), torch.empty(0, dtype=torch.long))
        loop = RoundLoop(node, self.hood, cfg, recorder, self.traffic,
                         timeout=self.timeout, test_set=test_set,
                         checkpoint=self.checkpoint if self.store is not None else None,
                         checkpoint_every=self.options.checkpoint_every)
        if self.resumed_from is not None:
            recorder.event("resume", self.resumed_from.round, epoch=self.resumed_from.epoch,
                           resumes=self.resumes)
        with self._lock:
            self.loop = loop
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            loop.offer(pending)
        if self._stop.is_set():
            loop.stop_event.set()
        started = time.perf_counter()
        try:
            loop.run()
            if loop.state is PeerState.DRAINING:
                self.checkpoint("stopped")  # resume goes on from here
            loop.wait_for_neighbors()
        finally:
            recorder.close()
        params = [p.detach().cpu() for p in node.params]
        per_kind = self.traffic.per_kind()
        sent, received = pair_sum(per_kind.values())
        summary: dict[str, object] = {
            "node": self.node_id, "round": node.round, "rounds": cfg.rounds,
            "state": loop.state.value,
            "accuracy": loop.last_accuracy, "loss": loop.last_loss, "digest": digest(params),
            "qp_fallbacks": int(node.algorithm.stats.get("qp_fallbacks", 0)),
            "bytes_sent": sent, "bytes_received": received, "traffic": self.traffic.snapshot(),
            "bytes_by_kind": kinds_json(per_kind),
            "missed_neighbor_answers": self.hood.misses.total,
            "catch_ups": loop.catch_ups.count, "resumes": self.resumes,
            "resyncs": node.resyncs,
            **({"cross_skips": node.threepoint.skips, "cross_sent": node.threepoint.sent}
               if node.threepoint is not None else {}),
            "resumed_from_round": self.resumed_from.round if self.resumed_from else None,
            "seconds": time.perf_counter() - started}
        recorder.finish(summary, params, "model.pt")
        return summary

    def shutdown(self, grace: float = 5.0) -> None:
        """Leave the bootstrap and stop serving (in-flight calls get `grace` seconds)."""
        if self.session is not None:
            self.session.stop()
            if self.session.joined:
                self.session.leave(self.state.value.lower())
            self.session.close()
        if self.server is not None:
            self.server.stop(grace)
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        if self.hood is not None:
            self.hood.close()
        if self.node is not None:
            self.node.close()

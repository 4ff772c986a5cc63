"""A deployed peer: a long-lived gRPC server plus the round loop, joined to a bootstrap.

Start-up: serve the Peer service (health NOT_SERVING), Join the bootstrap (which answers the
run's settings), load this node's partition, Join again with the sample count, wait for the
assignment (WatchAssignment), build the Node exactly as the simulator does, then SERVING.
Each round: publish, run_round over the GrpcNeighborhood, heartbeat, evaluate every
`eval_every` rounds. After the last round the peer keeps serving until its neighbors are done
too (they may still need its last model and cross-gradients), writes its results, Leaves and
stops. SIGTERM (stop()) ends the loop after the current round, then does the same.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from bootstrap.convert import assignment_from_proto, settings_from_proto
from crossgrad.config import RunConfig, validate
from crossgrad.errors import ConfigError, ProtocolError
from crossgrad.rpc import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    RunningServer,
    Service,
    from_rpc_error,
    make_channel,
    make_server,
)
from crossgrad.v1 import bootstrap_pb2, bootstrap_pb2_grpc, peer_pb2
from peer.builder import load_run_data, make_node, resolve_device
from peer.client import GrpcNeighborhood
from peer.metrics import (
    MetricsWriter,
    Pair,
    Traffic,
    digest,
    kind_totals,
    kinds_json,
    pair_sum,
)
from peer.node import Assignment, Node, Params
from peer.servicer import PeerServicer, add_to_server

log = logging.getLogger(__name__)


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

    def __post_init__(self) -> None:
        if not 0 < self.chunk_bytes <= DEFAULT_MAX_MESSAGE_BYTES // 2:
            raise ConfigError(f"chunk size must be in 1..{DEFAULT_MAX_MESSAGE_BYTES // 2} bytes "
                              f"(half the message limit); got {self.chunk_bytes}")
        if not self.timeout > 0:
            raise ConfigError(f"--timeout must be positive; got {self.timeout}")


def keep_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Ask glibc to serve allocations up to `limit_bytes` from its heap and to keep freed memory.

    By default glibc maps every allocation above 128 KiB fresh from the kernel and unmaps it on
    free, so each received model lands in new pages and pays a page fault per 4 KiB: decoding a
    100 MB stream ran at 1.1 GB/s here, 3.9 GB/s with this (bench/transfer.py). A peer receives
    same-sized tensors every round, so keeping freed memory is what it wants. No-op (False)
    where the C library has no mallopt.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, limit_bytes)) and bool(
        mallopt(m_trim_threshold, 2 * limit_bytes))


def kind_bytes(kinds: dict[str, Pair]) -> list[peer_pb2.KindBytes]:
    """{kind: (sent, received)} as KindBytes, in the dict's (sorted) order."""
    return [peer_pb2.KindBytes(kind=k, sent_bytes=s, received_bytes=r)
            for k, (s, r) in kinds.items()]


class Stopped(Exception):
    """The peer was asked to stop before it started training."""


class PeerRuntime:
    """Everything a running peer holds; the servicer reads it, the loop drives it."""

    def __init__(self, options: PeerOptions) -> None:
        keep_freed_memory()
        self.options = options
        self.node_id = options.node_id
        self.timeout = options.timeout
        self.chunk_bytes = options.chunk_bytes
        self.node: Node | None = None
        self.settings: RunConfig | None = None
        self.traffic = Traffic()
        self.hood: GrpcNeighborhood | None = None
        self.state = "STARTING"
        self.epoch = 0
        self.address = ""
        self.last_loss = math.nan
        self.last_accuracy = math.nan
        self._rejected = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._watch: grpc.Future | None = None
        self.server: RunningServer | None = None

    def wait_ready(self, timeout: float) -> Node | None:
        """The node once built (neighbors may call before this peer has its assignment)."""
        self._ready.wait(timeout)
        return self.node

    # ---- used by the servicer ------------------------------------------------------------
    def count_rejected(self) -> None:
        with self._lock:
            self._rejected += 1

    def fetch_model(self, peer: int, round_: int, timeout: float) -> Params:
        if self.hood is None:
            raise ProtocolError("not ready")
        return self.hood.fetch_model(peer, round_, timeout)

    def status(self) -> peer_pb2.PeerStatus:
        node, hood = self.node, self.hood
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
            node_id=self.node_id, address=self.address, state=self.state,
            total_rounds=self.settings.rounds if self.settings else 0,
            algorithm=self.settings.algorithm if self.settings else "",
            topology_epoch=self.epoch, last_loss=self.last_loss,
            last_accuracy=self.last_accuracy, bytes_sent=sent, bytes_received=received,
            links=links, kinds=kind_bytes(per_kind),
            rejected_messages=self._rejected + (hood.misses.rejected if hood else 0),
            missed_neighbor_answers=hood.misses.total if hood else 0)
        if node is not None:
            status.round = node.round
            status.neighbor_ids.extend(node.assignment.neighbors)
            for j in node.assignment.neighbors:
                status.weights[j] = node.assignment.weights[j]
            status.self_weight = node.assignment.weights[node.id]
            status.qp_fallbacks = int(node.algorithm.stats.get("qp_fallbacks", 0))
        return status

    def stop(self) -> None:
        """Ask the loop to finish the current round and shut down cleanly (also interrupts the
        wait for the run to assemble)."""
        self._stop.set()
        watch = self._watch
        if watch is not None:
            watch.cancel()

    # ---- start-up ------------------------------------------------------------------------
    def _join(self, stub: bootstrap_pb2_grpc.BootstrapStub, samples: int) -> RunConfig:
        request = bootstrap_pb2.JoinRequest(node_id=self.node_id, address=self.address,
                                            num_samples=samples)
        try:
            reply = stub.Join(request, timeout=self.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err, f"Join at bootstrap {self.options.bootstrap}") from None
        return settings_from_proto(reply.settings)

    def _wait_assignment(self, stub: bootstrap_pb2_grpc.BootstrapStub) -> bootstrap_pb2.Assignment:
        request = bootstrap_pb2.GetAssignmentRequest(node_id=self.node_id)
        stream = stub.WatchAssignment(request, timeout=self.options.join_timeout)
        self._watch = stream  # stop() cancels it: SIGTERM while waiting for the other peers
        if self._stop.is_set():
            stream.cancel()
        try:
            return next(iter(stream))
        except grpc.RpcError as err:
            if self._stop.is_set():
                raise Stopped("stopped while waiting for the run to assemble") from None
            raise from_rpc_error(err, "WatchAssignment at the bootstrap") from None
        finally:
            stream.cancel()
            self._watch = None

    def start(self) -> None:
        """Serve, join, build the node; health SERVING when this returns."""
        self.serve()
        self._bootstrap_channel = make_channel(self.options.bootstrap)
        self.bootstrap = bootstrap_pb2_grpc.BootstrapStub(self._bootstrap_channel)
        settings = self._join(self.bootstrap, 0)
        try:  # what the bootstrap sent is a peer's message like any other: checked first
            settings = validate(dataclasses.replace(settings, data_dir=self.options.data_dir,
                                                    device=self.options.device))
        except ConfigError as exc:
            raise ConfigError(f"the run settings from the bootstrap at {self.options.bootstrap} "
                              f"cannot run here: {exc}") from None
        self.settings = settings
        data = load_run_data(settings)
        self._join(self.bootstrap, len(data.parts[self.node_id]))
        log.info("node %d joined with %d samples; waiting for the assignment", self.node_id,
                 len(data.parts[self.node_id]))
        message = self._wait_assignment(self.bootstrap)
        view = assignment_from_proto(message)
        weights = {n.node_id: n.weight for n in view.neighbors}
        weights[self.node_id] = view.self_weight
        assignment = Assignment(neighbors=tuple(n.node_id for n in view.neighbors),
                                weights=weights, epoch=view.epoch)
        self.test_x, self.test_y = data.dataset.test_x, data.dataset.test_y
        node = make_node(settings, data, self.node_id, assignment,
                         resolve_device(settings.device))
        self.attach(node, {n.node_id: n.address for n in view.neighbors}, view.epoch)
        log.info("node %d serving at %s; neighbors %s", self.node_id, self.address,
                 {n.node_id: n.address for n in view.neighbors})

    def serve(self) -> RunningServer:
        """Start the Peer server (health NOT_SERVING until attach())."""
        servicer = PeerServicer(self)
        self.server = make_server(self.options.bind, [Service(
            "crossgrad.v1.Peer", lambda s: add_to_server(servicer, s))])
        self.address = self.options.advertise or self.server.address
        return self.server

    def attach(self, node: Node, addresses: dict[int, str], epoch: int) -> None:
        """Make `node` the one served and driven; neighbors reached at `addresses`. SERVING."""
        self.epoch = epoch
        self.hood = GrpcNeighborhood(node, addresses, timeout=self.timeout, traffic=self.traffic)
        self.node = node
        self._ready.set()
        self.state = "TRAINING"
        if self.server is not None:
            self.server.set_serving()

    # ---- the loop ------------------------------------------------------------------------
    def _heartbeat(self, round_: int, loss: float) -> None:
        request = bootstrap_pb2.HeartbeatRequest(node_id=self.node_id, round=round_, loss=loss,
                                                 health="ok")
        try:
            self.bootstrap.Heartbeat(request, timeout=10.0)
        except grpc.RpcError as err:
            log.warning("node %d: heartbeat failed: %s", self.node_id,
                        from_rpc_error(err, "Heartbeat"))

    def _wait_for_neighbors(self, rounds: int) -> None:
        """Keep serving until every neighbor has finished too (or stops answering)."""
        assert self.node is not None and self.hood is not None
        deadline = time.monotonic() + self.timeout
        pending = set(self.node.assignment.neighbors)
        while pending and time.monotonic() < deadline and not self._stop.is_set():
            for j in sorted(pending):
                try:
                    status = self.hood.status(j, timeout=5.0)
                except ProtocolError:
                    pending.discard(j)  # gone: nothing more it can ask of us
                    continue
                if status.round >= rounds or status.state in ("DONE", "DRAINING"):
                    pending.discard(j)
            self._stop.wait(0.1)

    def run(self) -> dict[str, object]:
        """The round loop; returns the summary written to OUT/summary.json."""
        assert self.node is not None and self.hood is not None and self.settings is not None
        node, cfg, out = self.node, self.settings, self.options.out
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(cfg.to_json())
        metrics = MetricsWriter(out / "metrics.jsonl")
        started = time.perf_counter()
        try:
            while node.round < cfg.rounds and not self._stop.is_set():
                node.publish()
                record = node.run_round(self.hood)
                self.last_loss = record.loss
                per_kind = self.traffic.per_kind()
                metrics.write({"kind": "round", **dataclasses.asdict(record),
                               "bytes": pair_sum(per_kind.values()),
                               "bytes_by_kind": kinds_json(per_kind)})
                self._heartbeat(node.round, record.loss)
                if node.round % cfg.eval_every == 0 or node.round == cfg.rounds:
                    loss, acc = node.trainer.evaluate(node.params, self.test_x, self.test_y)
                    self.last_accuracy = acc
                    metrics.write({"kind": "eval", "round": node.round, "loss": loss,
                                   "accuracy": acc})
                    log.info("node %d round %d/%d: loss %.4f, test accuracy %.4f",
                             self.node_id, node.round, cfg.rounds, record.loss, acc)
            node.publish()  # the final model, for anyone who asks (status tools, the demo)
            self.state = "DONE" if node.round >= cfg.rounds else "DRAINING"
            self._wait_for_neighbors(cfg.rounds)
        finally:
            metrics.close()
        params = [p.detach().cpu() for p in node.params]
        torch.save(params, out / "model.pt")
        per_kind = self.traffic.per_kind()
        sent, received = pair_sum(per_kind.values())
        summary: dict[str, object] = {
            "node": self.node_id, "round": node.round, "rounds": cfg.rounds,
            "accuracy": self.last_accuracy, "loss": self.last_loss, "digest": digest(params),
            "qp_fallbacks": int(node.algorithm.stats.get("qp_fallbacks", 0)),
            "bytes_sent": sent, "bytes_received": received, "traffic": self.traffic.snapshot(),
            "bytes_by_kind": kinds_json(per_kind),
            "missed_neighbor_answers": self.hood.misses.total,
            "seconds": time.perf_counter() - started}
        (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        return summary

    def shutdown(self, grace: float = 5.0) -> None:
        """Leave the bootstrap and stop serving (in-flight calls get `grace` seconds)."""
        try:
            self.bootstrap.Leave(bootstrap_pb2.LeaveRequest(node_id=self.node_id,
                                                            reason=self.state.lower()),
                                 timeout=5.0)
        except (grpc.RpcError, AttributeError) as err:
            log.warning("node %d: leave failed: %s", self.node_id, err)
        if self.server is not None:
            self.server.stop(grace)
        if self.hood is not None:
            self.hood.close()

"""A busy bootstrap: N simulated peers join, heartbeat at 1 Hz and keep a WatchAssignment stream
open each, while the topology changes under them; per-RPC latency and the epochs they saw.

    python bench/bootstrap_load.py                          # 1,000 peers, 20 s loaded, ring
    python bench/bootstrap_load.py --peers 50 --seconds 3 --json
    python bench/bootstrap_load.py --in-process             # server in the driver's process
    python bench/bootstrap_load.py --watch first            # streams closed as peers do
    python bench/bootstrap_load.py --heartbeat call         # a Heartbeat call per heartbeat
    python bench/bootstrap_load.py --pin                    # the bootstrap on a core of its own

The bootstrap is the real `crossgrad bootstrap` in a process of its own (plaintext, a SQLite
state file in a temporary directory, the default per-caller limits); `--in-process` serves it
from bootstrap.server.serve in the driver's process instead (what the CI test does, to spare a
process start). The driver is one process with grpc.aio: a thread per stream would need 1,000
threads on this side as well. Each simulated peer has its own channel and so its own connection,
as N peers are N hosts (and the bootstrap's per-caller limits count per connection).

Phases:
  join     every peer Joins, spread over --ramp seconds, and then opens WatchAssignment; the last
           Join assembles the run (epoch 1) and every stream gets its first assignment
  loaded   --seconds of heartbeats at --heartbeat-hz per peer (random phases), GetAssignment
           probes at --probe-hz for random peers and ListPeers at 1 Hz; --churn times a peer
           Leaves and Joins again (two epoch advances each), one change at a time: the next
           waits until every peer that must learn of the last one did ("fan-out": from the
           start of the call that changed the epoch to the last such peer's receipt of it)
  check    every peer received exactly the epochs it must (none missed, none twice, in order),
           E = 1 + 2 x churn is ListPeers' epoch, and each assignment it received is the run's
           topology at that epoch, repaired around the peers that had left, with
           Metropolis-Hastings weights (bootstrap.topology) and the peers' own addresses

How a peer learns of a new epoch, --watch:
  open     (the default: the issue's load) its WatchAssignment stream stays open for the whole
           run: N streams open. A stream carries the first assignment (epoch 1), then a new one
           at each epoch that changes that peer's neighbors or weights: in a ring, the peer
           that left or came back and the two it borders
  first    what a crossgrad peer does (peer/session.py): the stream is cancelled after the first
           assignment; each heartbeat names the epoch the peer holds, and an answer at a newer
           epoch carries the new assignment, so every epoch reaches every peer within one
           heartbeat period, without a second call. A peer that left does not heartbeat; it
           reads its (lone) assignment once with GetAssignment, so every record has every
           epoch.

How a peer heartbeats, --heartbeat:
  stream   (the default, what a crossgrad peer does) one Heartbeats stream per peer, opened as
           it joins; each heartbeat is a message and its answer ("Heartbeat" in the table: from
           the write to the answer read)
  call     a Heartbeat call each (peers before the stream, and older bootstraps)

Latencies are measured in the driver, from the call to its answer, so they include the driver's
own event-loop delays; "loop lag" (how late a 20 ms timer fires) shows how much of that is the
driver. A failed call is counted under its status code, and any failure fails the check.

--pin (Linux, 2 CPUs or more) runs the bootstrap on the first CPU this process may use and the
driver on the others, so that the two never take turns on a core: a bootstrap host of one core,
with its peers elsewhere. Without it, both share every core. (On 2 cores it measured no better:
the bootstrap's own threads then share its one core; docs/benchmarks.md, "Busy bootstrap".)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bootstrap.convert import assignment_from_proto  # noqa: E402
from bootstrap.topology import (  # noqa: E402
    Topology,
    build_topology,
    metropolis_hastings_weights,
    repair,
)
from crossgrad.collector import PacedCollector  # noqa: E402
from crossgrad.rpc import channel_options  # noqa: E402
from crossgrad.v1 import bootstrap_pb2 as pb  # noqa: E402
from crossgrad.v1 import bootstrap_pb2_grpc  # noqa: E402

T = TypeVar("T")
CALL_TIMEOUT_S = 10.0  # far above any latency worth measuring; a timeout is a failure
FANOUT_TIMEOUT_S = 30.0  # for every stream to get one epoch
LAG_TICK_S = 0.02  # the loop-lag probe's timer
METHODS = ("Join", "Heartbeat", "GetAssignment", "ListPeers", "Leave", "epoch fan-out")


@dataclass(frozen=True)
class LoadConfig:
    """One load run. The defaults are the issue's: 1,000 peers at 1 Hz."""

    peers: int = 1000  # simulated peers, one connection and one WatchAssignment stream each
    seconds: float = 20.0  # length of the loaded phase
    ramp: float = 5.0  # the Joins are spread over this long (200 Joins/s for 1,000 peers)
    heartbeat_hz: float = 1.0  # heartbeats per second per peer
    probe_hz: float = 10.0  # GetAssignment calls per second (random peers)
    churn: int = 4  # Leave + Join-again pairs during the loaded phase (2 epochs each)
    keep_watching: bool = True  # --watch open; False: first (streams closed as peers do)
    heartbeat_stream: bool = True  # --heartbeat stream (as peers do); False: call (one each)
    seed: int = 0  # phases, probes, who churns


@dataclass
class Stats:
    """What the driver measured: latencies (s) and failures (status code name -> count) per
    method, every stream's epochs with the assignments that came with them, loop lags (s)."""

    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    failures: dict[str, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    lags: list[float] = field(default_factory=list)

    async def timed(self, method: str, call: Awaitable[T]) -> T | None:
        """Await `call`, recording its latency, or its status code when it fails (None)."""
        start = time.perf_counter()
        try:
            answer = await call
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
            self.failures[method][code.name if code else type(exc).__name__] += 1
            return None
        except asyncio.TimeoutError:  # a stream's message past CALL_TIMEOUT_S
            self.failures[method][grpc.StatusCode.DEADLINE_EXCEEDED.name] += 1
            return None
        self.latency[method].append(time.perf_counter() - start)
        return answer


class Epochs:
    """Every stream's assignments as they arrive; wait(e, ids) returns once each of ids has e."""

    def __init__(self, peers: int) -> None:
        self.seen: list[list[pb.Assignment]] = [[] for _ in range(peers)]  # per peer, in order
        self.at: dict[int, dict[int, float]] = defaultdict(dict)  # epoch -> peer -> receipt
        self._waiting: dict[int, tuple[frozenset[int], asyncio.Event]] = {}

    def receive(self, node_id: int, assignment: pb.Assignment) -> None:
        self.seen[node_id].append(assignment)
        epoch = assignment.topology_epoch
        self.at[epoch].setdefault(node_id, time.perf_counter())
        self._settle(epoch)

    def _settle(self, epoch: int) -> None:
        if epoch in self._waiting:
            peers, done = self._waiting[epoch]
            if peers <= self.at[epoch].keys():
                done.set()

    async def wait(self, epoch: int, peers: Iterable[int]) -> bool:
        """Wait until each of `peers` has received `epoch` (False after FANOUT_TIMEOUT_S)."""
        done = asyncio.Event()
        self._waiting[epoch] = (frozenset(peers), done)
        self._settle(epoch)
        try:
            await asyncio.wait_for(done.wait(), FANOUT_TIMEOUT_S)
        except asyncio.TimeoutError:
            return False
        return True


Table = tuple[Topology, np.ndarray]  # the repaired graph at an epoch and its MH weights


def expected_table(topology: Topology, live: frozenset[int]) -> Table:
    """What the bootstrap must hand out while `live` are the live peers."""
    graph = repair(topology, np.array([i in live for i in range(topology.n)]))
    return graph, metropolis_hastings_weights(graph)


def changed_peers(before: Table, after: Table) -> list[int]:
    """The peers whose neighbors or weights differ (addresses stay: peers rejoin from theirs)."""
    return np.flatnonzero((before[1] != after[1]).any(axis=1)).tolist()


def receivers(tables: dict[int, Table], epoch: int, every_epoch: bool) -> list[int]:
    """Who must learn of `epoch`: every peer at assembly (1) and when peers follow heartbeats
    (`every_epoch`); with streams open, the peers whose assignment it changed."""
    if every_epoch or epoch == 1:
        return list(range(tables[epoch][0].n))
    return changed_peers(tables[epoch - 1], tables[epoch])


class SimulatedPeer:
    """One peer: its own channel, its WatchAssignment stream, its heartbeats. `left` while it
    has left the run (no heartbeats then); `lock` keeps a heartbeat and a Leave apart."""

    def __init__(self, node_id: int, target: str) -> None:
        self.node_id = node_id
        self.address = f"peer-{node_id}.bench.invalid:50051"  # announced, never dialled
        # A local subchannel pool: channels with equal arguments would otherwise share one
        # connection, and the bootstrap would see one caller instead of N.
        self.channel = grpc.aio.insecure_channel(
            target, options=[*channel_options(), ("grpc.use_local_subchannel_pool", 1)])
        self.stub = bootstrap_pb2_grpc.BootstrapStub(self.channel)
        self.left = False
        self.lock = asyncio.Lock()
        self.epoch = 0  # the last epoch this peer received
        self.beats: grpc.aio.StreamStreamCall | None = None  # its Heartbeats stream

    def join(self) -> Awaitable[pb.JoinResponse]:
        return self.stub.Join(
            pb.JoinRequest(node_id=self.node_id, address=self.address, num_samples=100),
            timeout=CALL_TIMEOUT_S)

    def receive(self, epochs: Epochs, assignment: pb.Assignment) -> None:
        self.epoch = assignment.topology_epoch
        epochs.receive(self.node_id, assignment)

    async def watch(self, epochs: Epochs, stats: Stats, keep_open: bool) -> None:
        call = self.stub.WatchAssignment(pb.GetAssignmentRequest(node_id=self.node_id))
        try:
            async for assignment in call:
                self.receive(epochs, assignment)
                if not keep_open:
                    call.cancel()
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:  # cancelled: the driver ended it
                stats.failures["WatchAssignment"][exc.code().name] += 1
        except asyncio.CancelledError:
            if keep_open:
                raise

    async def read_assignment(self, epochs: Epochs, stats: Stats) -> None:
        """GetAssignment, the assignment a peer that left reads once."""
        answer = await stats.timed("GetAssignment", self.stub.GetAssignment(
            pb.GetAssignmentRequest(node_id=self.node_id), timeout=CALL_TIMEOUT_S))
        if answer is not None and answer.topology_epoch != self.epoch:
            self.receive(epochs, answer)

    def open_heartbeats(self) -> None:
        self.beats = self.stub.Heartbeats()

    async def beat(self, request: pb.HeartbeatRequest, stream: bool) -> pb.HeartbeatResponse:
        """One heartbeat: a message on the Heartbeats stream (opened again after a failure,
        as peer/session.py does), or a Heartbeat call."""
        if not stream:
            answer: pb.HeartbeatResponse = await self.stub.Heartbeat(request,
                                                                     timeout=CALL_TIMEOUT_S)
            return answer
        if self.beats is None:
            self.open_heartbeats()
        beats = self.beats
        assert beats is not None

        async def round_trip() -> pb.HeartbeatResponse:
            await beats.write(request)
            answer = await beats.read()
            if answer is grpc.aio.EOF:  # the stream ended without an error: it never should
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                           grpc.aio.Metadata(), "the Heartbeats stream ended")
            return answer
        # asyncio.wait, not wait_for: Python 3.11's wait_for can swallow the task's own
        # cancellation when the answer comes at that moment, and the heartbeat loop would
        # outlive the run.
        trip = asyncio.ensure_future(round_trip())
        try:
            await asyncio.wait((trip,), timeout=CALL_TIMEOUT_S)
            if not trip.done():
                raise asyncio.TimeoutError
            return trip.result()
        except BaseException:
            trip.cancel()
            beats.cancel()
            self.beats = None
            raise

    async def heartbeat(self, epochs: Epochs, stats: Stats, hz: float, phase: float,
                        follow: bool, stream: bool) -> None:
        await asyncio.sleep(phase)
        start, beat = time.monotonic(), 0
        while True:
            async with self.lock:
                if not self.left:
                    request = pb.HeartbeatRequest(node_id=self.node_id, round=beat, loss=0.5,
                                                  health="ok")
                    if follow:  # say which epoch it holds: a newer one comes in the answer
                        request.assignment_epoch = self.epoch
                    answer = await stats.timed("Heartbeat", self.beat(request, stream))
                    if (follow and answer is not None and answer.HasField("assignment")
                            and answer.assignment.topology_epoch != self.epoch):
                        self.receive(epochs, answer.assignment)
            beat += 1
            # On a fixed schedule, so a slow answer does not lower the rate
            await asyncio.sleep(max(0.0, start + beat / hz - time.monotonic()))


async def every(period: float, action: Callable[[], Awaitable[Any]]) -> None:
    start, tick = time.monotonic(), 0
    while True:
        await action()
        tick += 1
        await asyncio.sleep(max(0.0, start + tick * period - time.monotonic()))


async def lag_probe(stats: Stats) -> None:
    while True:
        start = time.perf_counter()
        await asyncio.sleep(LAG_TICK_S)
        stats.lags.append(time.perf_counter() - start - LAG_TICK_S)


async def fanned_out(epoch: int, peers: list[int], start: float, epochs: Epochs,
                     stats: Stats) -> bool:
    """Wait until each of `peers` has `epoch`; record how long since `start` (the change's
    call) the last of them took."""
    if not await epochs.wait(epoch, peers):
        return False
    stats.latency["epoch fan-out"].append(max(epochs.at[epoch][i] for i in peers) - start)
    return True


async def drive(target: str, config: LoadConfig) -> dict[str, Any]:
    """Load the bootstrap at `target` as `config` says; the report (see summarize)."""
    rng = random.Random(config.seed)
    n = config.peers
    stats, epochs = Stats(), Epochs(n)
    peers = [SimulatedPeer(i, target) for i in range(n)]
    background: list[asyncio.Task[Any]] = [asyncio.create_task(lag_probe(stats))]
    try:
        async def join_and_watch(peer: SimulatedPeer, delay: float) -> pb.JoinResponse | None:
            await asyncio.sleep(delay)
            answer = await stats.timed("Join", peer.join())
            if config.heartbeat_stream:  # as it joins (a peer: at its first beat, soon after)
                peer.open_heartbeats()
            background.append(asyncio.create_task(
                peer.watch(epochs, stats, config.keep_watching)))
            return answer

        joined = await asyncio.gather(*(join_and_watch(p, config.ramp * i / n)
                                        for i, p in enumerate(peers)))
        settings = next(a.settings for a in joined if a is not None)
        topology = build_topology(settings.topology, settings.nodes, settings.seed)
        assembled = await epochs.wait(1, range(n))
        live_at = {1: frozenset(range(n))}
        tables = {1: expected_table(topology, live_at[1])}

        def changed_to(epoch: int) -> list[int]:
            """Who must learn of `epoch`, now that live_at has it."""
            tables[epoch] = expected_table(topology, live_at[epoch])
            return receivers(tables, epoch, every_epoch=not config.keep_watching)

        loaded_start = time.perf_counter()
        background += [asyncio.create_task(p.heartbeat(
            epochs, stats, config.heartbeat_hz, rng.uniform(0, 1 / config.heartbeat_hz),
            follow=not config.keep_watching, stream=config.heartbeat_stream)) for p in peers]

        async def probe() -> None:
            node = rng.randrange(n)
            await stats.timed("GetAssignment", peers[node].stub.GetAssignment(
                pb.GetAssignmentRequest(node_id=node), timeout=CALL_TIMEOUT_S))

        async def list_peers() -> None:
            await stats.timed("ListPeers", peers[0].stub.ListPeers(pb.ListPeersRequest(),
                                                                   timeout=CALL_TIMEOUT_S))

        background += [asyncio.create_task(every(1 / config.probe_hz, probe)),
                       asyncio.create_task(every(1.0, list_peers))]

        changes_ok, epoch = assembled, 1
        for k in range(config.churn if assembled else 0):
            await asyncio.sleep(max(0.0, loaded_start + config.seconds * (k + 0.5) / config.churn
                                    - time.perf_counter()))
            peer = peers[rng.randrange(n)]
            async with peer.lock:  # no heartbeat of it in flight while it leaves
                peer.left = True
                start = time.perf_counter()
                ok = await stats.timed("Leave", peer.stub.Leave(
                    pb.LeaveRequest(node_id=peer.node_id, reason="bench churn"),
                    timeout=CALL_TIMEOUT_S)) is not None
                if ok and not config.keep_watching:
                    await peer.read_assignment(epochs, stats)  # its lone assignment, read once
            epoch += 1
            live_at[epoch] = live_at[epoch - 1] - {peer.node_id}
            ok = ok and await fanned_out(epoch, changed_to(epoch), start, epochs, stats)
            async with peer.lock:
                start = time.perf_counter()
                ok = await stats.timed("Join", peer.join()) is not None and ok
                peer.left = False
            epoch += 1
            live_at[epoch] = live_at[epoch - 1] | {peer.node_id}
            ok = ok and await fanned_out(epoch, changed_to(epoch), start, epochs, stats)
            changes_ok = changes_ok and ok
        await asyncio.sleep(max(0.0, loaded_start + config.seconds - time.perf_counter()))
        loaded = time.perf_counter() - loaded_start
        final = await stats.timed("ListPeers", peers[0].stub.ListPeers(
            pb.ListPeersRequest(), timeout=CALL_TIMEOUT_S))
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await asyncio.gather(*(p.channel.close() for p in peers))
    problems = [] if changes_ok else ["an epoch change failed or did not reach its peers"]
    if final is None:
        problems.append("the final ListPeers failed")
    else:
        problems += check_epochs(epochs, live_at, final, settings,
                                 every_epoch=not config.keep_watching)
    return summarize(config, stats, loaded, epoch, problems)


def check_epochs(epochs: Epochs, live_at: dict[int, frozenset[int]],
                 final: pb.ListPeersResponse, settings: pb.RunSettings, *,
                 every_epoch: bool) -> list[str]:
    """What went wrong with the epochs and assignments the peers received (empty: nothing).
    `every_epoch`: each peer must have every epoch (peers following heartbeats); otherwise
    (streams open) exactly the epochs at which its assignment changed, 1 (assembly) first."""
    problems: list[str] = []
    last = max(live_at)
    if final.topology_epoch != last:
        problems.append(f"the bootstrap is at epoch {final.topology_epoch}; the driver made "
                        f"{last} (a lease expired under load?)")
    addresses = {p.node_id: p.address for p in final.peers}
    topology = build_topology(settings.topology, settings.nodes, settings.seed)
    expected = {epoch: expected_table(topology, live) for epoch, live in live_at.items()}
    owed: dict[int, set[int]] = defaultdict(set)  # peer -> the epochs it must receive
    for epoch in range(1, last + 1):
        for node_id in receivers(expected, epoch, every_epoch):
            owed[node_id].add(epoch)
    for node_id, seen in enumerate(epochs.seen):
        got, want = [a.topology_epoch for a in seen], sorted(owed[node_id])
        if got != want:
            problems.append(f"node {node_id} received epochs {got}; expected {want}")
            continue
        for assignment in seen:
            graph, weights = expected[assignment.topology_epoch]
            view = assignment_from_proto(assignment)  # a peer's own checks
            want = [(j, addresses[j], float(weights[node_id, j]))
                    for j in graph.neighbors(node_id)]
            have = [(j, a, w) for j, a, w in view.neighbors]
            same = [(j, a) for j, a, _ in have] == [(j, a) for j, a, _ in want] and all(
                math.isclose(h, w, abs_tol=1e-12)
                for (_, _, h), (_, _, w) in zip(have, want, strict=True))
            if not same:
                problems.append(f"node {node_id} at epoch {view.epoch}: neighbors {have}, "
                                f"expected {want}")
    return problems[:20]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def summarize(config: LoadConfig, stats: Stats, loaded: float, epochs: int,
              problems: list[str]) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        values = stats.latency.get(method, [])
        rows[method] = {"calls": len(values), "failed": dict(stats.failures.get(method, {})),
                        **{f"p{q}_ms": percentile(values, q) * 1e3 for q in (50, 95, 99)},
                        "max_ms": max(values, default=math.nan) * 1e3}
    stream_failures = dict(stats.failures.get("WatchAssignment", {}))
    failed = sum(sum(r["failed"].values()) for r in rows.values()) + sum(
        stream_failures.values())
    if failed:
        problems.append(f"{failed} calls failed")
    return {"peers": config.peers, "seconds": round(loaded, 2),
            "heartbeats_per_s": len(stats.latency.get("Heartbeat", [])) / loaded,
            "epochs": epochs, "stream_failures": stream_failures, "rpcs": rows,
            "loop_lag_p99_ms": percentile(stats.lags, 99) * 1e3,
            "epochs_ok": not problems, "problems": problems}


# ---- the bootstrap under load ----

class BootstrapProcess:
    """`crossgrad bootstrap` on 127.0.0.1:0, its port read from the line it prints."""

    def __init__(self, peers: int, topology: str, state: Path,
                 cpus: set[int] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "crossgrad", "--log-level", "WARNING", "bootstrap",
             "--nodes", str(peers), "--topology", topology, "--partition", "iid",
             "--bind", "127.0.0.1:0", "--state", str(state), "--insecure"],
            cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True,
            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus))
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        port = re.search(r"\(port (\d+)\)", line)
        if port is None:
            self.stop()
            raise RuntimeError(f"the bootstrap did not start: {line!r}")
        self.address = f"127.0.0.1:{port.group(1)}"

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime+stime

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_in_process(config: LoadConfig, topology: str, state: Path) -> dict[str, Any]:
    from bootstrap.server import serve
    from crossgrad.config import RunConfig

    server = serve(RunConfig(nodes=config.peers, topology=topology, partition="iid"),
                   "127.0.0.1:0", state, lease_seconds=15.0)
    try:
        return asyncio.run(drive(server.address, config))
    finally:
        server.stop(grace=1.0)


def run_process(config: LoadConfig, topology: str, state: Path,
                cpus: set[int] | None = None) -> dict[str, Any]:
    """The driver against `crossgrad bootstrap`; with cpus, the bootstrap runs on those and
    this process on the rest."""
    if cpus is not None:
        os.sched_setaffinity(0, os.sched_getaffinity(0) - cpus)  # before grpc starts threads
    bootstrap = BootstrapProcess(config.peers, topology, state, cpus)
    try:
        before, start = bootstrap.cpu_seconds(), time.perf_counter()
        report = asyncio.run(drive(bootstrap.address, config))
        report["server_cpu_percent"] = round(
            100 * (bootstrap.cpu_seconds() - before) / (time.perf_counter() - start), 1)
        return report
    finally:
        bootstrap.stop()


def table(report: dict[str, Any]) -> str:
    lines = ["| RPC | calls | failed | p50 ms | p95 ms | p99 ms | max ms |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for method, row in report["rpcs"].items():
        lines.append(f"| {method} | {row['calls']} | {sum(row['failed'].values())} | "
                     f"{row['p50_ms']:.1f} | {row['p95_ms']:.1f} | {row['p99_ms']:.1f} | "
                     f"{row['max_ms']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    # A driver stopped from outside (timeout, kill) still stops its bootstrap, in `finally`.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    defaults = LoadConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=defaults.peers)
    parser.add_argument("--seconds", type=float, default=defaults.seconds)
    parser.add_argument("--ramp", type=float, default=defaults.ramp)
    parser.add_argument("--heartbeat-hz", type=float, default=defaults.heartbeat_hz)
    parser.add_argument("--probe-hz", type=float, default=defaults.probe_hz)
    parser.add_argument("--churn", type=int, default=defaults.churn)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--topology", default="ring")
    parser.add_argument("--watch", choices=("open", "first"), default="open",
                        help="keep every WatchAssignment stream open (default), or close it "
                        "after the first assignment and follow heartbeats, as peers do")
    parser.add_argument("--heartbeat", choices=("stream", "call"), default="stream",
                        help="heartbeat on one open Heartbeats stream per peer, as peers do "
                        "(default), or with a Heartbeat call each, as they did before")
    parser.add_argument("--in-process", action="store_true",
                        help="serve the bootstrap in this process (default: its own process)")
    parser.add_argument("--pin", action="store_true",
                        help="the bootstrap on one CPU and this driver on the others (Linux)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON too")
    args = parser.parse_args()
    cpus = None
    if args.pin:
        mine = sorted(os.sched_getaffinity(0))
        if len(mine) < 2 or args.in_process:
            parser.error("--pin needs 2 CPUs or more and the bootstrap in its own process")
        cpus = {mine[0]}
    config = LoadConfig(peers=args.peers, seconds=args.seconds, ramp=args.ramp,
                        heartbeat_hz=args.heartbeat_hz, probe_hz=args.probe_hz,
                        churn=args.churn, keep_watching=args.watch == "open", seed=args.seed,
                        heartbeat_stream=args.heartbeat == "stream")
    # The driver's own collector, paced as the bootstrap's (crossgrad/collector.py): left
    # automatic, its full passes stopped this loop for 110-130 ms, and the heartbeats in flight
    # then counted that as the bootstrap's latency.
    gc.freeze()
    with tempfile.TemporaryDirectory() as tmp, PacedCollector():
        state = Path(tmp) / "bootstrap.sqlite"
        report = (run_in_process(config, args.topology, state) if args.in_process
                  else run_process(config, args.topology, state, cpus))
    where = "in this process" if args.in_process else "in its own process"
    if cpus is not None:
        where += f" on CPU {min(cpus)} (the driver on the others)"
    print(f"{config.peers} peers ({args.topology}), bootstrap {where}, "
          f"{report['seconds']:.0f} s loaded, {report['heartbeats_per_s']:.0f} heartbeats/s, "
          f"WatchAssignment streams {args.watch}, heartbeats by {args.heartbeat}, "
          f"{report['epochs']} epochs; "
          f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    print(table(report))
    print(f"driver loop lag p99 {report['loop_lag_p99_ms']:.1f} ms; bootstrap CPU "
          f"{report.get('server_cpu_percent', 'n/a')} %; epochs "
          f"{'correct' if report['epochs_ok'] else 'WRONG'}")
    for problem in report["problems"]:
        print(f"  problem: {problem}")
    if args.json:
        print(json.dumps(report))
    return 0 if report["epochs_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

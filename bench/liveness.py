"""Liveness under load: how fast a training peer answers Health/Check and GetStatus.

    python bench/liveness.py                         # vgg11 on digits, 2 peers, 15 s per phase
    python bench/liveness.py --baseline /tmp/before  # the same, first with the code in /tmp/before
    python bench/liveness.py --seconds 20 --rate 20 --model cnn5 --batch-size 256

A real run through the real CLI, as `crossgrad demo` starts one: a bootstrap and --nodes peers,
each its own process (and its own session, so that every one of them is killed on any outcome),
on loopback, training CGA with --model on `digits`. Once peer 0 has finished its first round,
this process calls grpc.health.v1.Health/Check and crossgrad.v1.Peer/GetStatus on peer 0, each
from its own thread at --rate calls per second, for --seconds, and records every latency
(request to answer, a 5 s deadline; a call that fails counts as missed, not as a latency). Two
phases, on the same cluster:

  training   the peers train: with the default vgg11 (9.2M parameters, 37 MB a model or a
             cross-gradient) they keep every core busy with torch, and a model or a
             cross-gradient is on the wire in most of each round;
  + streams  the same, while --streams Health/Watch streams stay open on peer 0. Each holds a
             server thread, as a neighbor's GetModel waiting for the next round does: 24 are
             what a node with 12 neighbors serves each round.

Per phase the table gives how busy the cores were (/proc/stat), the rounds peer 0 finished and
the MB/s it sent and received meanwhile (its GetStatus counters), and p50/p90/p99/max latency
per call type.

--baseline DIR runs everything first with the crossgrad checkout in DIR (e.g. `git archive
COMMIT | tar -x -C DIR`), then with this one, and adds the ratio this / baseline of each p99.

The caller runs on the same cores as the peers (a 2-core machine here): its own threads must
be scheduled too, so its latencies are an upper bound of what a caller on another machine sees.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from crossgrad.rpc import make_channel  # noqa: E402
from crossgrad.v1 import peer_pb2, peer_pb2_grpc  # noqa: E402

SERVING = re.compile(r"bootstrap serving on (\S+)")
PEER_ADDRESS = re.compile(r"serving at (\S+);")
CALL_DEADLINE_S = 5.0
START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Workload:
    """What the peers train: enough to keep every core busy and the wire loaded."""

    nodes: int = 2
    model: str = "vgg11"
    batch_size: int = 64
    algorithm: str = "cga"

    def flags(self) -> list[str]:
        return ["--nodes", str(self.nodes), "--topology", "ring", "--dataset", "digits",
                "--partition", "iid", "--model", self.model, "--batch-size",
                str(self.batch_size), "--algorithm", self.algorithm, "--rounds", "1000000"]


@dataclass
class Cluster:
    """A running bootstrap and its peers; `peers[i]` is node i's address."""

    procs: list[subprocess.Popen[bytes]]
    bootstrap: str
    peers: list[str]
    run_dir: Path
    logs: list[IO[bytes]] = field(default_factory=list)


def _kill(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGKILL each process's whole group (each was started in its own session), then reap."""
    for proc in procs:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.wait()


def _wait_for_log(path: Path, pattern: re.Pattern[str], proc: subprocess.Popen[bytes],
                  deadline: float) -> str:
    """The first group of `pattern` in the log at `path`, polled until it appears."""
    while time.monotonic() < deadline:
        match = pattern.search(path.read_text(errors="replace")) if path.exists() else None
        if match:
            return match.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"{path.name}: the process exited with {proc.returncode} "
                               f"before it logged {pattern.pattern!r}; see {path}")
        time.sleep(0.1)
    raise RuntimeError(f"{path.name}: no {pattern.pattern!r} within {START_TIMEOUT_S:.0f} s")


@contextmanager
def cluster(workload: Workload, run_dir: Path, repo: Path = REPO) -> Iterator[Cluster]:
    """A bootstrap and workload.nodes peers as processes running the crossgrad in `repo`, each
    in its own session; every process group is killed when the block ends, however it ends."""
    run_dir.mkdir(parents=True, exist_ok=True)
    environ = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(repo)}
    running = Cluster([], "", [], run_dir)
    deadline = time.monotonic() + START_TIMEOUT_S

    def start(name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(run_dir / f"{name}.log", "wb")  # noqa: SIM115 (closed in finally)
        running.logs.append(log)
        proc = subprocess.Popen([sys.executable, "-m", "crossgrad", "--log-level", "INFO",
                                 *args], cwd=repo, env=environ, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        running.procs.append(proc)
        return proc

    try:
        boot = start("bootstrap", "bootstrap", *workload.flags(), "--bind", "127.0.0.1:0",
                     "--insecure")
        address = _wait_for_log(run_dir / "bootstrap.log", SERVING, boot, deadline)
        running.bootstrap = address
        peers = [start(f"node-{i}", "peer", "--id", str(i), "--bootstrap", address, "--bind",
                       "127.0.0.1:0", "--device", "cpu", "--out", str(run_dir / f"node-{i}"),
                       "--insecure")
                 for i in range(workload.nodes)]
        running.peers = [_wait_for_log(run_dir / f"node-{i}.log", PEER_ADDRESS, proc, deadline)
                         for i, proc in enumerate(peers)]
        yield running
    finally:
        _kill(running.procs)
        for log in running.logs:
            log.close()


def wait_until_training(address: str, proc: subprocess.Popen[bytes], rounds: int = 1) -> None:
    """Return once the peer at `address` has finished `rounds` rounds."""
    deadline = time.monotonic() + START_TIMEOUT_S
    with make_channel(address) as channel:
        stub = peer_pb2_grpc.PeerStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the peer at {address} exited with {proc.returncode}")
            status = stub.GetStatus(peer_pb2.GetStatusRequest(requester="liveness"),
                                    timeout=30.0)
            if status.round >= rounds:
                return
            time.sleep(0.2)
    raise RuntimeError(f"the peer at {address} did not finish {rounds} rounds in "
                       f"{START_TIMEOUT_S:.0f} s")


@dataclass
class Probe:
    """Latencies (s) of the calls that were answered, and how many were not."""

    latencies: list[float] = field(default_factory=list)
    misses: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # status code name -> misses

    def percentile(self, q: float) -> float:
        """The q-th percentile of all calls, a missed one counting as infinitely late."""
        return percentile(self.latencies + [math.inf] * self.misses, q)


@dataclass
class Probes:
    health: Probe
    status: Probe
    seconds: float
    busy: float  # fraction of the machine's CPU time that was busy meanwhile
    rounds: int | None  # rounds the probed peer finished meanwhile (None: it did not say)
    moved_bytes: int | None  # bytes it sent and received meanwhile


def _probe_loop(call: Callable[[], object], probe: Probe, rate: float, until: float) -> None:
    """Call at `rate` per second until `until` (monotonic), on a fixed schedule: a late call
    starts at once instead of shifting the rest, so slow answers thin out the samples only as
    much as they must (a call that takes the whole window is one sample, a miss)."""
    period, due = 1.0 / rate, time.monotonic()
    while due < until and time.monotonic() < until:
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        started = time.perf_counter()
        try:
            call()
        except grpc.RpcError as err:
            probe.misses += 1
            code = err.code() if isinstance(err, grpc.Call) else None
            probe.errors[code.name if code else "?"] += 1
        else:
            probe.latencies.append(time.perf_counter() - started)
        due += period


def _cpu_times() -> tuple[int, int]:
    """(all, idle) CPU time of the machine so far, in clock ticks (/proc/stat)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return sum(ticks), ticks[3] + ticks[4]  # idle + iowait


def probe(address: str, seconds: float, rate: float, streams: int = 0) -> Probes:
    """Health/Check and GetStatus on `address`, each from its own thread at `rate` calls/s,
    while `streams` Health/Watch streams stay open on it."""
    with make_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        peer = peer_pb2_grpc.PeerStub(channel)
        status_request = peer_pb2.GetStatusRequest(requester="liveness")
        health_request = health_pb2.HealthCheckRequest(service="")
        watches = [health.Watch(health_request, timeout=seconds + 60) for _ in range(streams)]
        try:
            before, cpu_before = _status(peer, status_request), _cpu_times()
            result = Probes(Probe(), Probe(), seconds, 0.0, 0, 0)
            until = time.monotonic() + seconds
            threads = [
                threading.Thread(target=_probe_loop, args=(
                    lambda: health.Check(health_request, timeout=CALL_DEADLINE_S),
                    result.health, rate, until)),
                threading.Thread(target=_probe_loop, args=(
                    lambda: peer.GetStatus(status_request, timeout=CALL_DEADLINE_S),
                    result.status, rate, until)),
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            cpu_after = _cpu_times()
            after = _status(peer, status_request)
        finally:
            for watch in watches:
                watch.cancel()
    total, idle = cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1]
    result.busy = 1.0 - idle / total if total else float("nan")
    if before is not None and after is not None:
        result.rounds = after.round - before.round
        result.moved_bytes = (after.bytes_sent + after.bytes_received
                              - before.bytes_sent - before.bytes_received)
    return result


def _status(stub: peer_pb2_grpc.PeerStub,
            request: peer_pb2.GetStatusRequest) -> peer_pb2.PeerStatus | None:
    """The peer's counters, or None if it does not answer within the probes' deadline."""
    try:
        return stub.GetStatus(request, timeout=CALL_DEADLINE_S)
    except grpc.RpcError:
        return None


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by the nearest-rank method: a value that was measured."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def measure(workload: Workload, seconds: float, rate: float, streams: int, run_dir: Path,
            repo: Path = REPO) -> dict[str, Probes]:
    """Start a cluster, wait until peer 0 trains, probe it in both phases, stop everything."""
    with cluster(workload, run_dir, repo) as running:
        wait_until_training(running.peers[0], running.procs[1])
        return {"training": probe(running.peers[0], seconds, rate),
                f"+ {streams} streams": probe(running.peers[0], seconds, rate, streams)}


def _ms(value: float) -> str:
    return f"> {CALL_DEADLINE_S * 1e3:.0f}" if math.isinf(value) else f"{value:.1f}"


def _commit(repo: Path) -> str:
    done = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "not a git checkout"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="probe time per phase")
    parser.add_argument("--rate", type=float, default=20.0, help="calls/s per call type")
    parser.add_argument("--streams", type=int, default=24, help="Health/Watch streams held open")
    parser.add_argument("--model", default=Workload.model)
    parser.add_argument("--batch-size", type=int, default=Workload.batch_size)
    parser.add_argument("--nodes", type=int, default=Workload.nodes)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a crossgrad checkout to measure first, for the ratio column")
    args = parser.parse_args(argv)
    if args.baseline is not None and not (args.baseline / "crossgrad" / "__main__.py").exists():
        parser.error(f"--baseline {args.baseline}: expected a crossgrad checkout (with "
                     "crossgrad/__main__.py); make one with `git archive COMMIT | tar -x -C DIR`")
    workload = Workload(nodes=args.nodes, model=args.model, batch_size=args.batch_size)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{workload.nodes} peers + bootstrap + this caller on the same cores; "
          f"{workload.algorithm} {workload.model} on digits, batch {workload.batch_size}; "
          f"{args.rate:g} calls/s per call type, {args.seconds:g} s per phase", flush=True)
    repos = {"this": REPO} if args.baseline is None else {"baseline": args.baseline,
                                                          "this": REPO}
    results: dict[str, dict[str, Probes]] = {}
    with tempfile.TemporaryDirectory(prefix="liveness-") as tmp:
        for name, repo in repos.items():
            print(f"{name}: {repo} ({_commit(repo)})", flush=True)
            results[name] = measure(workload, args.seconds, args.rate, args.streams,
                                    Path(tmp) / name, repo)
    print()
    print("| code | phase | busy | rounds | MB/s | call | n | missed | p50 ms | p90 ms | p99 ms "
          "| max ms | p99 / baseline |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, phases in results.items():
        for phase, r in phases.items():
            for call in ("Health/Check", "GetStatus"):
                p = r.health if call == "Health/Check" else r.status
                q = [p.percentile(x) * 1e3 for x in (50, 90, 99, 100)]
                ratio = ""
                if "baseline" in results and name != "baseline":
                    base = results["baseline"][phase]
                    ref = (base.health if call == "Health/Check" else base.status).percentile(99)
                    ratio = (f"< {q[2] / (CALL_DEADLINE_S * 1e3):.3f}" if math.isinf(ref)
                             else f"{q[2] / (ref * 1e3):.2f}")
                mb_s = "-" if r.moved_bytes is None else f"{r.moved_bytes / r.seconds / 1e6:.0f}"
                print(f"| {name} | {phase} | {r.busy:.0%} | "
                      f"{'-' if r.rounds is None else r.rounds} | {mb_s} | {call} | "
                      f"{len(p.latencies)} | "
                      f"{p.misses} | " + " | ".join(_ms(v) for v in q) + f" | {ratio} |",
                      flush=True)
    for name, phases in results.items():
        for phase, r in phases.items():
            for call, p in (("Health/Check", r.health), ("GetStatus", r.status)):
                if p.errors:
                    print(f"{name}, {phase}, {call} missed: "
                          + ", ".join(f"{n} x {code}" for code, n in p.errors.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

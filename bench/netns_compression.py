"""Dense vs compressed cross-gradients over a rate-limited link: peers in network namespaces.

    sudo .venv/bin/python bench/netns_compression.py                       # 100 rounds, 100mbit
    sudo .venv/bin/python bench/netns_compression.py --rounds 200 --rates 100mbit none
    sudo .venv/bin/python bench/netns_compression.py --configs cga compcga:sign --rounds 20
    sudo .venv/bin/python bench/netns_compression.py --rounds 500 --target 0.895 \
        --configs cga compcga:topk:0.01 compcga:topk:0.01+models:sign:0.8

A bootstrap and --nodes peers (default 5) run the same training once per configuration (default
`cga`, dense cross-gradients; `compcga:sign`; `compcga:topk:0.01`; a spec may add
`+models:COMPRESSOR:STEP`, model replicas with --model-compressor and --consensus-step, and
`+feedback:F`, --feedback ef21 or clag:Z, e.g. `compcga:topk:0.01+models:sign:0.8+feedback:ef21`),
each process in its own
network namespace, through the real CLI (`ip netns exec NS python -m crossgrad ...`), with the
same seed, ring, partition (`modulo`), model (`mlp`) and number of rounds. The data set is MNIST
from --data-dir, else from $CROSSGRAD_DATA/mnist (or data/mnist) when it is there (the mlp has
109,386 parameters: 438 kB per model or dense cross-gradient message), else scikit-learn's
digits (--dataset, --data-dir). Every
namespace hangs off one bridge (`br0` in the namespace PREFIX-hub) by a veth pair; each peer's
pair is shaped in both directions (tbf on the peer's end and on the bridge's end), so every peer
has a full-duplex access link of --rates to a switch, like a host on a 100 Mbit/s Ethernet port.
The bootstrap's link is not shaped (it carries heartbeats only). tbf's `latency` bounds the
queue, it adds no delay: netem is not available here, so there is no propagation delay, only
queueing and serialization at the set rate.

Both ends of every link are processes on this machine's 2 cores: compute is the same in every
configuration and is not what is varied; only the link is. The CPU also serializes work that a
real deployment would run in parallel on 5 hosts, so absolute round times here are dominated by
compute; "x dense" and the unlimited rows (--rates ... none) say what the link adds.

The namespaces (PREFIX-hub, PREFIX-boot, PREFIX-p0..) and addresses (--subnet, a private /24,
default 10.213.7.0/24: .1 the bootstrap, .10+i peer i) are created by this program and removed
at the end, also on an error, Ctrl-C or SIGTERM (finally and atexit). Nothing on the host's own
interfaces or routes is touched, and no traffic goes anywhere but between these namespaces. If
the namespaces already exist (an earlier run killed with SIGKILL) the program refuses to start
and prints the commands that delete them.

Before the runs, a TCP stream between two peers' namespaces (4 MB, plain sockets) checks that
the shaping works: "link check" is its throughput. Per configuration, from each peer's
metrics.jsonl and summary.json:

  s/round median, mean   per round, the mean over peers of the round's `seconds`; median and
                         mean over rounds (round 0 includes connection set-up). Under model
                         replicas a round's `seconds` ends before its second half (the
                         neighbors' model updates and the gossip, Node.finish_round), so these
                         two columns undercount such rounds: compare wall s/round
  wall s/round           train s / rounds: every part of a round, evaluations included
  train s                the slowest peer's summary `seconds` (first round to the end, with
                         evaluations and heartbeats)
  wall s                 launch of the bootstrap to the exit of the last peer (start-up, data
                         loading, training, shutdown)
  s to ACC               time until the mean test accuracy over peers first reaches --target
                         (evaluated every --eval-every rounds): the slowest peer's sum of round
                         seconds up to that evaluation, and @ the round; "-" if never reached
  wall s to ACC          the same by the clock: from the first peer's "serving at ...;
                         neighbors" log line (round 0 starts next) to the last peer's log line
                         of that evaluation
  final acc              mean over peers of the last evaluation
  xgrad kB, model kB     bytes received per round per peer, from summary.json "traffic"
                         ("j:cross_gradient" and "j:estimate"; "j:model", or under replicas
                         "j:model_update" and "j:replica"; summed over neighbors j; kB = 1000 B;
                         gRPC and HTTP/2 framing included, TCP/IP headers not)
  link s                 (xgrad + model bytes) * 8 / rate: the least time per round the link
                         needs to deliver one peer's incoming messages
  x dense                wall s/round / that of the first configuration at the same rate
  to target x dense      wall s to ACC / that of the first configuration at the same rate
  link share             1 - train s without shaping (rate "none", same configuration, same
                         run) / train s at this rate: the share of the time that the link adds
                         (only when --rates includes none)
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import platform
import queue
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
BOOT_PORT, PEER_PORT, CHECK_PORT = 50050, 50051, 50060
CHECK_BYTES = 4_000_000
PROXY_VARS = ("http_proxy", "https_proxy", "grpc_proxy", "all_proxy", "no_proxy")
# a peer's log line (crossgrad's CLI format): its assignment arrived, or a round's evaluation
LOG_LINE = re.compile(r"(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+: node \d+ "
                      r"(?:(?P<serving>serving at)|round (?P<round>\d+)/\d+: .*test accuracy)")


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """An `ip`/`tc` command; on failure, an error that shows the command and its stderr."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"`{shlex.join(cmd)}` failed ({done.returncode}): "
                           f"{done.stderr.strip()}")
    return done


# ---- the namespaces ----------------------------------------------------------------------------
@dataclass
class Testbed:
    """Namespaces, bridge, veth pairs and addresses; remove() undoes whatever create() did."""

    prefix: str
    nodes: int
    subnet: str  # the first three octets, e.g. "10.213.7"
    created: list[str] = field(default_factory=list)
    shaped: list[tuple[str, str]] = field(default_factory=list)  # (namespace, device)

    @property
    def hub(self) -> str:
        return f"{self.prefix}-hub"

    @property
    def boot(self) -> str:
        return f"{self.prefix}-boot"

    def peer(self, i: int) -> str:
        return f"{self.prefix}-p{i}"

    def members(self) -> list[str]:
        return [self.boot, *(self.peer(i) for i in range(self.nodes))]

    def names(self) -> list[str]:
        return [self.hub, *self.members()]

    def address(self, ns: str) -> str:
        """The bootstrap is .1, peer i is .10+i."""
        if ns == self.boot:
            return f"{self.subnet}.1"
        return f"{self.subnet}.{9 + self.members().index(ns)}"

    def existing(self) -> list[str]:
        listed = run("ip", "netns", "list").stdout.split()
        return [n for n in self.names() if n in listed]

    def create(self) -> None:
        for ns in self.names():
            run("ip", "netns", "add", ns)
            self.created.append(ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.hub, "link", "set", "br0", "up")
        for k, ns in enumerate(self.members()):
            port = f"port{k}"  # the bridge's end, in the hub namespace
            run("ip", "-n", self.hub, "link", "add", port, "type", "veth",
                "peer", "name", "eth0", "netns", ns)
            run("ip", "-n", self.hub, "link", "set", port, "master", "br0", "up")
            run("ip", "-n", ns, "addr", "add", f"{self.address(ns)}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            if ns != self.boot:
                self.shaped += [(ns, "eth0"), (self.hub, port)]

    def check_tbf(self) -> None:
        """tbf on a throw-away veth pair inside the hub namespace, with a clear error if absent."""
        run("ip", "-n", self.hub, "link", "add", "tbftest0", "type", "veth",
            "peer", "name", "tbftest1")
        try:
            done = run("tc", "-n", self.hub, "qdisc", "add", "dev", "tbftest0", "root", "tbf",
                       "rate", "100mbit", "burst", "256kbit", "latency", "50ms", check=False)
            if done.returncode != 0:
                raise SystemExit(f"tc cannot add a tbf qdisc here ({done.stderr.strip()}); the "
                                 "kernel needs sch_tbf (CONFIG_NET_SCH_TBF)")
        finally:
            run("ip", "-n", self.hub, "link", "del", "tbftest0", check=False)

    def shape(self, rate: str, burst: str, latency: str) -> str:
        """tbf at `rate` on both ends of every peer's veth (rate "none": no qdisc); returns what
        `tc qdisc show` says of peer 0's two ends."""
        for ns, dev in self.shaped:
            run("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
            if rate != "none":
                run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                    "burst", burst, "latency", latency)
        return "; ".join(f"{ns} {dev}: " + run("tc", "-n", ns, "qdisc", "show", "dev", dev)
                         .stdout.strip().splitlines()[0] for ns, dev in self.shaped[:2])

    def remove(self) -> None:
        """Kill what is left in our namespaces (only our children can be there); delete them."""
        for ns in reversed(self.created):
            pids = run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run("ip", "netns", "del", ns, check=False)
        self.created.clear()


# ---- processes ---------------------------------------------------------------------------------
class Procs:
    """Processes started in namespaces; their output goes to a log and, line by line, to events."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.events: queue.Queue[tuple[str, str, Any]] = queue.Queue()
        self.serving: set[str] = set()  # names that printed "serving on"
        self.exited: dict[str, int] = {}  # name -> exit code

    def start(self, name: str, ns: str, args: list[str], log: Path) -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS}
        env["PYTHONUNBUFFERED"] = "1"
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                env=env, cwd=REPO, start_new_session=True)
        self.procs.append(proc)
        handle = log.open("w")
        threading.Thread(target=self._pump, args=(name, proc, handle), daemon=True).start()
        return proc

    def _pump(self, name: str, proc: subprocess.Popen[str], handle: IO[str]) -> None:
        assert proc.stdout is not None
        with handle:
            for line in proc.stdout:
                handle.write(line)
                handle.flush()
                self.events.put(("line", name, line.rstrip("\n")))
        self.events.put(("exit", name, proc.wait()))

    def wait_for(self, want: set[str], kind: str, timeout: float, what: str) -> None:
        """Block until every name in `want` has printed "... serving on ..." (kind "line") or
        exited with code 0 (kind "exit"); a non-zero exit of any process, an exit before the
        line, or the timeout raises RuntimeError."""
        deadline = time.monotonic() + timeout
        done = self.serving if kind == "line" else self.exited
        while not want <= set(done):
            left = deadline - time.monotonic()
            if left <= 0:
                pending = ", ".join(sorted(want - set(done)))
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what} of "
                                   f"{pending}")
            try:
                event, name, value = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if event == "line" and "serving on" in value:
                self.serving.add(name)
            elif event == "exit":
                self.exited[name] = value
                if value != 0 or (kind == "line" and name in want and name not in self.serving):
                    raise RuntimeError(f"{name} exited with code {value} while waiting for "
                                       f"{what}")

    def stop(self, grace: float = 10.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()
        self.serving.clear()
        self.exited.clear()
        while not self.events.empty():
            self.events.get_nowait()


# ---- one training run --------------------------------------------------------------------------
def spec_flags(spec: str) -> list[str]:
    """The run flags of a configuration spec, ALGORITHM[:COMPRESSOR] then any of
    `+models:COMPRESSOR:STEP` (--model-compressor, --consensus-step) and `+feedback:F`
    (--feedback ef|ef21|clag:Z), e.g. `compcga:topk:0.01+models:sign:0.8`. The CLI validates
    the values; here only the shape is checked, with an error that shows the expected one."""
    head, *parts = spec.split("+")
    algorithm, _, compressor = head.partition(":")
    flags = ["--algorithm", algorithm, *(["--compressor", compressor] if compressor else [])]
    for part in parts:
        kind, _, value = part.partition(":")
        compressor, _, step = value.rpartition(":")
        if kind == "models" and compressor and step:
            flags += ["--model-compressor", compressor, "--consensus-step", step]
        elif kind == "feedback" and value:
            flags += ["--feedback", value]
        else:
            raise ValueError(f"config {spec!r}: cannot read {part!r}; expected "
                             "models:COMPRESSOR:STEP (e.g. models:sign:0.8) or feedback:F "
                             "(e.g. feedback:clag:0.5)")
    return flags


def run_flags(args: argparse.Namespace, spec: str) -> list[str]:
    return ["--nodes", str(args.nodes), "--topology", "ring", *spec_flags(spec),
            "--dataset", args.dataset, "--partition", args.partition, "--model", args.model,
            "--rounds", str(args.rounds), "--eval-every", str(args.eval_every),
            "--seed", str(args.seed)]


def train(bed: Testbed, procs: Procs, args: argparse.Namespace, spec: str, out: Path) -> float:
    """One run of `spec`; returns its wall time, launch to the last peer's exit."""
    out.mkdir(parents=True)
    python = [sys.executable, "-m", "crossgrad", "--log-level", "INFO"]
    boot_address = f"{bed.address(bed.boot)}:{BOOT_PORT}"
    started = time.perf_counter()
    procs.start("bootstrap", bed.boot, [*python, "bootstrap", *run_flags(args, spec),
                                        "--bind", boot_address, "--insecure"],
                out / "bootstrap.log")
    procs.wait_for({"bootstrap"}, "line", 60.0, "'bootstrap serving on'")
    names = {f"peer {i}" for i in range(args.nodes)}
    for i in range(args.nodes):
        address = f"{bed.address(bed.peer(i))}:{PEER_PORT}"
        peer = ["peer", "--id", str(i), "--bootstrap", boot_address, "--bind", address,
                "--advertise", address, "--out", str(out / f"node-{i}"), "--device", "cpu",
                "--timeout", str(args.call_timeout), "--insecure"]
        if args.data_dir:
            peer += ["--data-dir", str(args.data_dir)]
        procs.start(f"peer {i}", bed.peer(i), [*python, *peer], out / f"node-{i}.log")
    procs.wait_for(names, "line", args.start_timeout, "'peer I serving on'")
    procs.wait_for(names, "exit", args.run_timeout, "the end of training")
    wall = time.perf_counter() - started
    procs.stop()
    return wall


@dataclass
class Result:
    spec: str
    rate: str
    wall: float
    round_seconds: list[float]  # per round, mean over peers
    train_seconds: float
    time_to_target: float | None
    round_at_target: int | None
    wall_to_target: float | None  # first peer's round 0 to the last peer's evaluation, logs
    final_accuracy: float
    xgrad_bytes: float  # received per round per peer: cross-gradients (and estimate resyncs)
    model_bytes: float  # models, or under replicas model updates (and replica resyncs)
    resyncs: int  # replicas and estimates resynchronised from dense state, all peers


def log_times(out: Path, nodes: int) -> tuple[float, dict[int, float]]:
    """From the peers' logs (the CLI stamps every line): when the first peer had its neighbors
    (round 0 starts right after), and per evaluated round when the last peer logged its test
    accuracy, in seconds since the epoch."""
    starts: list[float] = []
    evals: dict[int, float] = {}
    for i in range(nodes):
        for line in (out / f"node-{i}.log").read_text().splitlines():
            match = LOG_LINE.match(line)
            if match is None:
                continue
            at = datetime.strptime(match["time"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if match["serving"]:
                starts.append(at)
            elif match["round"]:
                evals[int(match["round"])] = max(at, evals.get(int(match["round"]), at))
    return min(starts), evals


def read_result(out: Path, args: argparse.Namespace, spec: str, rate: str, wall: float) -> Result:
    rounds: list[list[float]] = []  # [peer][round] seconds
    evals: dict[int, list[float]] = {}  # round -> accuracies
    summaries = []
    for i in range(args.nodes):
        lines = [json.loads(s) for s in (out / f"node-{i}" / "metrics.jsonl").read_text()
                 .splitlines() if s.strip()]
        secs = {r["round"]: r["seconds"] for r in lines if r["kind"] == "round"}
        rounds.append([secs[r] for r in sorted(secs)])
        for r in lines:
            if r["kind"] == "eval":
                evals.setdefault(r["round"], []).append(r["accuracy"])
        summaries.append(json.loads((out / f"node-{i}" / "summary.json").read_text()))
    n_rounds = min(len(r) for r in rounds)
    per_round = [statistics.fmean(r[k] for r in rounds) for k in range(n_rounds)]
    reached, at, wall_reached = None, None, None
    for r in sorted(evals):
        if len(evals[r]) == args.nodes and statistics.fmean(evals[r]) >= args.target:
            reached, at = max(sum(p[:r]) for p in rounds), r
            start, logged = log_times(out, args.nodes)
            wall_reached = logged[r] - start if r in logged else None
            break

    def per_round_received(*kinds: str) -> float:
        total = sum(n for s in summaries for key, n in s["traffic"]["received"].items()
                    if key.split(":", 1)[1] in kinds)
        return total / len(summaries) / max(1, summaries[0]["rounds"])

    return Result(spec=spec, rate=rate, wall=wall, round_seconds=per_round,
                  train_seconds=max(s["seconds"] for s in summaries), time_to_target=reached,
                  round_at_target=at, wall_to_target=wall_reached,
                  final_accuracy=statistics.fmean(s["accuracy"] for s in summaries),
                  xgrad_bytes=per_round_received("cross_gradient", "estimate"),
                  model_bytes=per_round_received("model", "model_update", "replica"),
                  resyncs=sum(s.get("resyncs", 0) for s in summaries))


# ---- the link check ----------------------------------------------------------------------------
CHECK_SERVER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(30)
print("serving on", sys.argv[1], flush=True)
c, _ = s.accept(); c.settimeout(30); n, t0 = 0, None
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    t0 = t0 or time.perf_counter(); n += len(b)
print("received", n, time.perf_counter() - t0, flush=True)
"""
CHECK_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
c.sendall(bytes(int(sys.argv[3]))); c.close()
"""


def link_check(bed: Testbed, procs: Procs, out: Path) -> str:
    """TCP throughput from peer 0's namespace to peer 1's (through two shaped veth ends)."""
    dst = bed.address(bed.peer(1))
    out.mkdir(parents=True, exist_ok=True)
    procs.start("check server", bed.peer(1),
                [sys.executable, "-c", CHECK_SERVER, dst, str(CHECK_PORT)], out / "server.log")
    procs.wait_for({"check server"}, "line", 30.0, "the link check's server")
    procs.start("check client", bed.peer(0), [sys.executable, "-c", CHECK_CLIENT, dst,
                                              str(CHECK_PORT), str(CHECK_BYTES)],
                out / "client.log")
    procs.wait_for({"check server", "check client"}, "exit", 60.0, "the link check")
    procs.stop()
    words = (out / "server.log").read_text().split()
    n, seconds = int(words[-2]), float(words[-1])
    return f"{n * 8 / seconds / 1e6:.1f} Mbit/s ({n / 1e6:.0f} MB TCP, {bed.peer(0)} -> " \
           f"{bed.peer(1)})"


# ---- report ------------------------------------------------------------------------------------
def rate_bits(rate: str) -> float | None:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}
    for unit, scale in units.items():
        if rate.lower().endswith(unit):
            return float(rate[: -len(unit)]) * scale
    return None


def table(results: list[Result], target: float) -> str:
    head = ["config", "rate", "s/round med", "s/round mean", "wall s/round", "train s",
            "wall s", f"s to {target:g}", f"wall s to {target:g}", "final acc", "xgrad kB",
            "model kB", "link s", "x dense", "to target x dense", "link share"]
    rows = []
    for r in results:
        base = next(b for b in results if b.rate == r.rate)
        free = next((b for b in results if b.rate == "none" and b.spec == r.spec), None)
        median = statistics.median(r.round_seconds)
        per_round = r.train_seconds / len(r.round_seconds)
        bits = rate_bits(r.rate)
        link = "-" if bits is None else f"{(r.xgrad_bytes + r.model_bytes) * 8 / bits:.3f}"
        rows.append([r.spec, r.rate, f"{median:.3f}", f"{statistics.fmean(r.round_seconds):.3f}",
                     f"{per_round:.3f}",
                     f"{r.train_seconds:.1f}", f"{r.wall:.1f}",
                     "-" if r.time_to_target is None else
                     f"{r.time_to_target:.1f} @{r.round_at_target}",
                     "-" if r.wall_to_target is None else f"{r.wall_to_target:.1f}",
                     f"{r.final_accuracy:.4f}", f"{r.xgrad_bytes / 1e3:.1f}",
                     f"{r.model_bytes / 1e3:.1f}", link,
                     f"{per_round / (base.train_seconds / len(base.round_seconds)):.2f}",
                     "-" if r.wall_to_target is None or base.wall_to_target is None else
                     f"{r.wall_to_target / base.wall_to_target:.2f}",
                     "-" if free is None or r.rate == "none" else
                     f"{1 - free.train_seconds / r.train_seconds:.0%}"])
    widths = [max(len(h), *(len(row[k]) for row in rows)) for k, h in enumerate(head)]

    def line(cells: list[str]) -> str:  # the first two columns left-aligned, numbers right
        return "| " + " | ".join(c.ljust(w) if k < 2 else c.rjust(w)
                                 for k, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    rule = "|" + "|".join("-" * (w + 2) if k < 2 else "-" * (w + 1) + ":"
                          for k, w in enumerate(widths)) + "|"
    return "\n".join([line(head), rule, *(line(row) for row in rows)])


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    return (f"{platform.system()} {platform.release()} {platform.machine()}, {cpu}, "
            f"{os.cpu_count()} cpus, Python {platform.python_version()}, "
            f"torch {metadata.version('torch')}, grpcio {metadata.version('grpcio')}")


# ---- main --------------------------------------------------------------------------------------
def preflight(bed: Testbed) -> None:
    if os.geteuid() != 0:
        raise SystemExit("this benchmark creates network namespaces: run it as root")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"{' and '.join(missing)} not found: install iproute2 "
                         "(apt-get update && apt-get install -y iproute2)")
    if run("ip", "netns", "list", check=False).returncode != 0:
        raise SystemExit("`ip netns` does not work here; it needs iproute2 with netns support")
    existing = bed.existing()
    if existing:
        raise SystemExit(f"network namespaces {', '.join(existing)} already exist (a run killed "
                         "before it could clean up?). Make sure no benchmark is running, then "
                         "delete them: " + "; ".join(f"ip netns del {ns}" for ns in existing))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # as peer.training.datasets.data_home, without importing torch into the orchestrator
    mnist = Path(os.environ.get("CROSSGRAD_DATA") or "data") / "mnist"
    parser.add_argument("--configs", nargs="+",
                        default=["cga", "compcga:sign", "compcga:topk:0.01"],
                        help="ALGORITHM[:COMPRESSOR][+models:COMPRESSOR:STEP][+feedback:F] "
                        "per run, e.g. compcga:topk:0.01+models:sign:0.8; the first is the "
                        "baseline")
    parser.add_argument("--rates", nargs="+", default=["100mbit"],
                        help="tbf rates, each a set of runs ('none': no qdisc)")
    parser.add_argument("--burst", default="256kbit", help="tbf burst")
    parser.add_argument("--latency", default="50ms", help="tbf latency (queue bound)")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.80, help="mean test accuracy")
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--dataset", default="mnist" if mnist.is_dir() else "digits")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"default {mnist} for mnist, none for digits")
    parser.add_argument("--partition", default="modulo")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--prefix", default="cgb", help="namespace name prefix")
    parser.add_argument("--subnet", default="10.213.7", help="first three octets of a /24")
    parser.add_argument("--call-timeout", type=float, default=60.0,
                        help="peers' --timeout for neighbor calls")
    parser.add_argument("--start-timeout", type=float, default=180.0,
                        help="seconds for every peer to load its data and join")
    parser.add_argument("--run-timeout", type=float, default=900.0,
                        help="seconds for the training of one configuration")
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory (default runs/<timestamp>-netns)")
    args = parser.parse_args(argv)
    for spec in args.configs:
        try:
            spec_flags(spec)
        except ValueError as err:
            parser.error(str(err))
    if args.data_dir is None and args.dataset == "mnist":
        args.data_dir = mnist
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bed = Testbed(args.prefix, args.nodes, args.subnet)
    procs = Procs()
    preflight(bed)

    def cleanup() -> None:
        procs.stop(grace=5.0)
        bed.remove()

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    out = args.out or REPO / "runs" / f"{datetime.now():%Y%m%d-%H%M%S}-netns"
    tbf = f"tbf rate RATE burst {args.burst} latency {args.latency}"
    print(f"machine: {machine()}")
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(f"link: {args.nodes} peers + bootstrap, each in a namespace on one bridge; "
          f"`tc qdisc add dev DEV root {tbf}` on both ends of every peer's veth; "
          f"rates {', '.join(args.rates)}")
    print(f"run: {args.nodes} peers, ring, {args.dataset}/{args.partition}, model "
          f"{args.model}, {args.rounds} rounds, eval every {args.eval_every}, seed {args.seed}; "
          f"run directory {out}")
    load_before = os.getloadavg()
    results: list[Result] = []
    try:
        bed.create()
        bed.check_tbf()
        for rate in args.rates:
            print(f"tc at {rate}: {bed.shape(rate, args.burst, args.latency)}")
            check = link_check(bed, procs, out / f"check-{rate}")
            print(f"link check at {rate}: {check}", flush=True)
            for spec in args.configs:
                run_dir = out / f"{rate}-{spec.replace(':', '-').replace('+', '_')}"
                wall = train(bed, procs, args, spec, run_dir)
                results.append(read_result(run_dir, args, spec, rate, wall))
                r = results[-1]
                print(f"  {spec} at {rate}: {statistics.median(r.round_seconds):.3f} s/round "
                      f"(median), final mean accuracy {r.final_accuracy:.4f}, "
                      f"{(r.xgrad_bytes + r.model_bytes) / 1e3:.1f} kB/round per peer, "
                      f"{r.resyncs} resyncs, wall {wall:.1f} s", flush=True)
    except KeyboardInterrupt:
        print("interrupted: stopping the processes and removing the namespaces", file=sys.stderr)
        return 130
    except RuntimeError as err:
        print(f"error: {err}; logs under {out}", file=sys.stderr)
        return 1
    finally:
        cleanup()
    load_after = os.getloadavg()
    print(f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print()
    print(table(results, args.target))
    return 0


if __name__ == "__main__":
    sys.exit(main())

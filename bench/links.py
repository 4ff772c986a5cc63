"""GetModel over a rate-limited link between network namespaces, against raw TCP on the same link.

    python bench/links.py                             # 100 MB; loopback, veth, 1gbit, the top rate
    python bench/links.py --rates 1gbit --repeats 3
    python bench/links.py --grpc-arg grpc.http2.lookahead_bytes=16777216

Two namespaces (tests/faults/netns.py: a sender and a receiver, each with a veth pair to one
private bridge; a third, unused, for the bootstrap) and, per link below, two processes: the
sender runs bench/transfer.py's server (a real PeerServicer over a real Node holding a --bytes
float32 model, behind crossgrad.rpc.make_server, and a plain socket that sendall()s the same
bytes), the receiver runs this file with --fetch: bench/transfer.py's clients, raw TCP (recv_into
a preallocated buffer) and GetModel (crossgrad.rpc.make_channel, peer.wire.decode with every
check), one warm-up each, then --repeats transfers of each, interleaved. The links:

  loopback     both processes in the receiver's namespace, over its `lo` (no veth, no qdisc);
  veth         sender -> bridge -> receiver, no qdisc: raw TCP's rate here is the highest this
               machine sustains between two namespaces;
  tbf RATE     the same path with `tc qdisc ... tbf rate RATE burst --burst latency --latency`
               on both ends of the sender's veth (its upload on its eth0, its download on the
               bridge port), like a host on a RATE full-duplex port. --rates takes tc rates and
               `max`: the veth row's raw TCP rate, rounded down to 100 Mbit/s.

MB/s = payload bytes / wall time of one transfer (request to last byte validated), median over
the repeats (MB = 10^6 bytes); "x raw TCP" is that median over raw TCP's on the same link in the
same run. CPU s/GB: CPU seconds each process spent per GB of payload (sender: every thread of
the server process, from /proc/PID/task/*/schedstat; receiver: the fetching process's
process_time), median over the repeats. The namespaces are removed at the end, also on an error,
Ctrl-C or SIGTERM. Needs root, `ip` and `tc` (iproute2) and the kernel's sch_tbf.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "faults"))

from netns import Namespaces, unavailable  # noqa: E402

from bench import transfer  # noqa: E402
from bench.netns_compression import PROXY_VARS, machine  # noqa: E402
from crossgrad import rpc  # noqa: E402
from peer import wire  # noqa: E402
from peer.training.allocator import keep_freed_memory  # noqa: E402

SENDER, RECEIVER = 0, 1  # peers of the Namespaces layout
METHODS = ("raw TCP", "GetModel")
SUBNET = "10.213.12"  # a private /24, only ever inside our namespaces
FETCH_TIMEOUT_S = 900.0
COLUMNS = ("link", "method", "MB/s", "min-max", "x raw TCP", "sender CPU s/GB",
           "receiver CPU s/GB")


# ---- the receiver process ----------------------------------------------------------------------
def fetch(args: argparse.Namespace) -> int:
    """In the receiver's namespace: check one GetModel, then time both methods; print the samples
    as one JSON line {method: [Sample fields, ...]}."""
    keep_freed_memory()  # as every peer process does (peer/service.py)
    names, tensors = transfer.make_model(args.bytes)
    specs = wire.specs_of(names, tensors)
    payload = sum(s.nbytes for s in specs)
    ports = json.loads(args.ports)
    max_message = max(rpc.DEFAULT_MAX_MESSAGE_BYTES, args.chunk_bytes + 4096)
    transfer.add_grpc_args(args.grpc_arg)
    transfer.check_getmodel(ports["peer"], names, tensors, max_message, host=args.host)
    del tensors  # only the specs are needed from here: keep the receiver's memory to one model
    results = transfer.measure({
        "raw TCP": (transfer.raw_transfer(ports["raw"], payload, host=args.host), ports["raw"]),
        "GetModel": (transfer.getmodel_transfer(ports["peer"], specs, max_message,
                                                host=args.host), ports["peer"]),
    }, args.repeats, args.server_pid)
    print(json.dumps({name: [dataclasses.asdict(s) for s in samples]
                      for name, samples in results.items()}), flush=True)
    return 0


# ---- the orchestrator --------------------------------------------------------------------------
@dataclass
class Link:
    name: str  # the table's "link" cell
    samples: dict[str, list[transfer.Sample]]

    def mb_per_s(self, method: str, payload: int) -> list[float]:
        return [payload / s.seconds / 1e6 for s in self.samples[method]]


def measure_link(name: str, net: Namespaces, server: subprocess.Popen[str], ports: str,
                 host: str, args: argparse.Namespace) -> Link:
    """Run the receiver (--fetch) in the receiver's namespace against `server` at `host`."""
    command = [*net.prefix(RECEIVER), sys.executable, str(Path(__file__).resolve()), "--fetch",
               "--host", host, "--ports", ports, "--server-pid", str(server.pid),
               "--bytes", str(args.bytes), "--repeats", str(args.repeats),
               "--chunk-bytes", str(args.chunk_bytes),
               *(f"--grpc-arg={k}={v}" for k, v in args.grpc_arg)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                          timeout=FETCH_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"the receiver failed on {name} ({done.returncode}): "
                           f"{done.stderr.strip()[-2000:]}")
    raw = json.loads(done.stdout.strip().splitlines()[-1])
    link = Link(name, {m: [transfer.Sample(**s) for s in raw[m]] for m in METHODS})
    print(f"  {name}: " + ", ".join(
        f"{m} {statistics.median(link.mb_per_s(m, payload_of(args))):.0f} MB/s" for m in METHODS),
        flush=True)
    return link


def start_sender(net: Namespaces, node: int, host: str, args: argparse.Namespace
                 ) -> tuple[subprocess.Popen[str], str]:
    """bench/transfer.py's server in `node`'s namespace, listening on `host`; it and its ports.
    `ip netns exec` execs the command, so the Popen's pid is the server's (its CPU is read from
    /proc/PID by the receiver)."""
    child = [*net.prefix(node), sys.executable, str(REPO / "bench" / "transfer.py"), "--serve",
             "--host", host, "--bytes", str(args.bytes), "--chunk-bytes", str(args.chunk_bytes),
             *(f"--grpc-arg={k}={v}" for k, v in args.grpc_arg)]
    return transfer.start_server(child)


def stop_sender(server: subprocess.Popen[str]) -> None:
    if server.stdin:
        server.stdin.close()  # transfer.serve returns when its stdin closes
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def top_rate(veth: Link, payload: int) -> str:
    """Raw TCP's median over the unshaped veth, rounded down to 100 Mbit/s, as a tc rate."""
    mbit = statistics.median(veth.mb_per_s("raw TCP", payload)) * 8
    return f"{max(100, int(mbit // 100) * 100)}mbit"


def payload_of(args: argparse.Namespace) -> int:
    """The model's bytes, from its shapes (without building it)."""
    return sum(4 * math.prod(shape) for _, shape in transfer.model_shapes(args.bytes))


def run_links(net: Namespaces, args: argparse.Namespace) -> list[Link]:
    links: list[Link] = []
    loopback = "127.0.0.1"
    server, ports = start_sender(net, RECEIVER, loopback, args)
    try:
        links.append(measure_link("loopback", net, server, ports, loopback, args))
    finally:
        stop_sender(server)
    host = net.host(SENDER)
    server, ports = start_sender(net, SENDER, host, args)
    try:
        links.append(measure_link("veth", net, server, ports, host, args))
        for rate in args.rates:
            if rate == "max":
                rate = top_rate(links[1], payload_of(args))
            net.rate_limit(SENDER, rate, burst=args.burst, latency=args.latency)
            print(f"  tc: {'; '.join(net.qdiscs(SENDER))}", flush=True)
            links.append(measure_link(f"tbf {rate}", net, server, ports, host, args))
            net.unlimit(SENDER)
    finally:
        stop_sender(server)
    return links


# ---- the report --------------------------------------------------------------------------------
def summary(links: list[Link], payload: int) -> list[dict[str, float | str]]:
    """Per link and method: medians of MB/s, of its ratio to raw TCP, of CPU s/GB per side."""
    gb = payload / 1e9
    out: list[dict[str, float | str]] = []
    for link in links:
        base = statistics.median(link.mb_per_s("raw TCP", payload))
        for method in METHODS:
            speeds, samples = link.mb_per_s(method, payload), link.samples[method]
            out.append({"link": link.name, "method": method,
                        "mb_per_s": statistics.median(speeds),
                        "min": min(speeds), "max": max(speeds),
                        "x_raw_tcp": statistics.median(speeds) / base,
                        "sender_cpu_s_per_gb": statistics.median(
                            [s.server_cpu / gb for s in samples]),
                        "receiver_cpu_s_per_gb": statistics.median(
                            [s.client_cpu / gb for s in samples])})
    return out


def rows(results: list[dict[str, float | str]]) -> list[list[str]]:
    return [[str(r["link"]), str(r["method"]), f"{r['mb_per_s']:.0f}",
             f"{r['min']:.0f}-{r['max']:.0f}", f"{r['x_raw_tcp']:.2f}",
             f"{r['sender_cpu_s_per_gb']:.2f}", f"{r['receiver_cpu_s_per_gb']:.2f}"]
            for r in results]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes", type=int, default=100_000_000,
                        help="model size in bytes (float32; rounded down to the model's shape)")
    parser.add_argument("--repeats", type=int, default=5, help="timed transfers per method")
    parser.add_argument("--chunk-bytes", type=int, default=rpc.DEFAULT_CHUNK_BYTES,
                        help="GetModel data piece size (the peer's --chunk-bytes)")
    parser.add_argument("--rates", nargs="*", default=["1gbit", "max"],
                        help="tbf rates (tc syntax), 'max': the unshaped veth's raw TCP rate")
    parser.add_argument("--burst", default="4mbit",
                        help="tbf burst: at 1 Gbit/s it must hold a 64 KB TSO packet and "
                             "more than one timer tick of data")
    parser.add_argument("--latency", default="20ms", help="tbf latency (bounds the queue)")
    parser.add_argument("--grpc-arg", action="append", default=[], metavar="NAME=INT",
                        type=lambda s: (s.split("=", 1)[0], int(s.split("=", 1)[1])),
                        help="extra channel argument for crossgrad's server and channel")
    parser.add_argument("--json", action="store_true",
                        help="also print each row as a JSON line (for tests)")
    parser.add_argument("--fetch", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--ports", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fetch:
        return fetch(args)
    why = unavailable()
    if why is not None:
        raise SystemExit(f"cannot create network namespaces: {why}")

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the `with`: cleanup

    signal.signal(signal.SIGTERM, terminate)
    for name in [k for k in os.environ if k.lower() in PROXY_VARS]:
        del os.environ[name]  # the children inherit it: grpc would send our addresses to a proxy
    payload = payload_of(args)
    print("\n".join(transfer.header_lines("bench/links.py")))
    print(f"# machine: {machine()}")
    print(f"# payload {payload} bytes, chunk {args.chunk_bytes} bytes, median of {args.repeats} "
          f"after 1 warm-up; tbf burst {args.burst} latency {args.latency}"
          + (f"; extra grpc args {args.grpc_arg}" if args.grpc_arg else ""), flush=True)
    try:
        with Namespaces(nodes=2, subnet=SUBNET) as net:
            links = run_links(net, args)
    except KeyboardInterrupt:
        print("interrupted: the namespaces are removed", file=sys.stderr)
        return 130
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    results = summary(links, payload)
    print()
    print(transfer.table(rows(results), COLUMNS))
    if args.json:
        for result in results:
            print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

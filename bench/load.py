"""Load: N concurrent GetModel streams of one published model from one node, with the server's
peak memory.

    python bench/load.py                                # 100 MB model; 1, 8 and 64 streams
    python bench/load.py --streams 64 --json            # one JSON line per case as well
    python bench/load.py --streams 64 --max-streams 56  # a limit below the load: 8 refused

For each number of streams N, fresh processes on loopback:

  server   a real Node holding a synthetic float32 model (bench/large_model.py's Synthetic, 4
           nn.Linear layers, about --bytes), its round-0 model published, with an assignment of
           max(--streams) neighbors (ids 1..), served by a real PeerRuntime (PeerRuntime.serve:
           the peer's stream limit --max-streams, PeerServicer.GetModel, peer/wire.encode_raw);
  clients  --client-procs processes sharing N requesters, one thread and one channel (its own
           connection, as N neighbors are N hosts) per requester. Each requester calls GetModel
           for round 0 with its own requester_id, decodes the stream with peer/wire.decode (every
           check a peer makes) and takes the CRC-32C of every tensor it got; the main process
           compares them with those the server computed from its own parameters ("correct").
           All N calls start together, once every client has connected.

Server memory (VmRSS / VmHWM of /proc/self/status): "base" before the model is built (the
interpreter, torch, grpc), "loaded" once the model is built and published and the server
listens; then the server resets its high-water mark to its RSS of that moment (/proc/self/
clear_refs, Linux) so that "peak" is the highest RSS while the streams run, not while the model
was being built. The node holds its parameters and the published snapshot (2x the model); every
stream reads the snapshot itself and holds one piece (1 MiB) at a time in memory, so "peak -
loaded" is what the streams cost ("MiB/stream": per stream served), and it should grow with N,
not with N x the model. "x model" is (peak - base) / model.

"refused": calls answered UNAVAILABLE (the stream limit); "in flight": the most answered calls
between their start and their end at one moment (all N when they overlapped); GB/s: the models
answered / wall time from the first call to the last answer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import grpc
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.large_model import (  # noqa: E402
    build_node,
    gb,
    markdown_table,
    model_bytes,
    parse_size,
    report,
    status_kib,
    status_kib_total,
)
from crossgrad import rpc  # noqa: E402
from crossgrad.v1 import peer_pb2  # noqa: E402
from peer.service import DEFAULT_MAX_STREAMS, PeerOptions, PeerRuntime  # noqa: E402
from peer.wire import TensorSpec, checksums, decode  # noqa: E402

SERVER, ROUND = 0, 0
CALL_TIMEOUT_S = 600.0


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


# ---- the server --------------------------------------------------------------------------------
def reset_peak_rss() -> bool:
    """VmHWM back to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def run_server(args: argparse.Namespace) -> int:
    base = status_kib("VmRSS")
    # Built before the PeerRuntime tells glibc to keep freed memory (keep_freed_memory): the
    # template's own parameters, freed by share_template, go back to the system, and "loaded"
    # is the node's two models (a peer builds its node after: that memory stays in its heap
    # for the next allocations of that size, the neighbors' models; bench/large_model.py).
    node = build_node(SERVER, args.bytes, seed=1, keep_template=False,
                      neighbors=range(1, args.neighbors + 1))
    node.publish()  # round ROUND's snapshot is what GetModel serves
    runtime = PeerRuntime(PeerOptions(node_id=SERVER, bootstrap="unused:1", bind="127.0.0.1:0",
                                      timeout=CALL_TIMEOUT_S, max_streams=args.max_streams))
    server = runtime.serve()
    runtime.attach(node, {}, epoch=1)  # it only serves: no neighbor is ever asked
    crcs = checksums(node.params)
    build_peak = status_kib("VmHWM")
    reset = reset_peak_rss()
    report(address=server.address, model_bytes=model_bytes(node), base_rss=base,
           loaded_rss=status_kib("VmRSS"), build_peak_rss=build_peak, peak_reset=reset,
           names=node.names, shapes=[list(p.shape) for p in node.params],
           dtypes=[str(p.dtype).removeprefix("torch.") for p in node.params], crcs=crcs,
           max_streams=args.max_streams)
    sys.stdin.read()  # the main process closes our stdin once every client is done
    report(peak_rss=status_kib("VmHWM"), end_rss=status_kib("VmRSS"))
    server.stop(grace=0)
    return 0


# ---- the clients -------------------------------------------------------------------------------
def fetch(channel: grpc.Channel, requester: int, specs: list[TensorSpec]) -> dict[str, Any]:
    """One GetModel as a peer makes it (GrpcNeighborhood._stream): answers kept as bytes,
    decoded and validated by peer/wire."""
    call = channel.unary_stream("/crossgrad.v1.Peer/GetModel",
                                request_serializer=peer_pb2.GetModelRequest.SerializeToString,
                                response_deserializer=None)
    started = time.monotonic()
    try:
        decoded = decode(call(peer_pb2.GetModelRequest(requester_id=requester, round=ROUND),
                              timeout=CALL_TIMEOUT_S),
                         specs, sender_id=SERVER, round_=ROUND)
    except grpc.RpcError as err:
        return {"requester": requester, "code": err.code().name, "details": err.details(),
                "start": started, "end": time.monotonic()}
    ended = time.monotonic()
    return {"requester": requester, "code": "OK", "start": started, "end": ended,
            "wire_bytes": decoded.wire_bytes, "crcs": checksums(decoded.tensors)}


def run_client(args: argparse.Namespace) -> int:
    served = json.loads(sys.stdin.readline())
    specs = [TensorSpec(n, tuple(s), getattr(torch, d))
             for n, s, d in zip(served["names"], served["shapes"], served["dtypes"], strict=True)]
    # One connection per requester (a local subchannel pool), as each neighbor is a host of
    # its own; through crossgrad's channel arguments otherwise (make_channel's).
    options = [*rpc.channel_options(), ("grpc.use_local_subchannel_pool", 1)]
    channels = {i: grpc.insecure_channel(served["address"], options=options)
                for i in args.requesters}
    for ch in channels.values():
        grpc.channel_ready_future(ch).result(timeout=60)
    report(ready=len(channels))
    sys.stdin.readline()  # "go": every client is connected
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        result = fetch(channels[i], i, specs)
        with lock:
            results.append(result)

    threads = [threading.Thread(target=one, args=(i,)) for i in args.requesters]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for ch in channels.values():
        ch.close()
    for r in results:
        report(**r)
    return 0


# ---- one case ----------------------------------------------------------------------------------
def write(stream: IO[str] | None, line: str) -> None:
    assert stream is not None
    stream.write(line + "\n")
    stream.flush()


def read_json(process: subprocess.Popen[str], who: str) -> dict[str, Any]:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise SystemExit(f"the {who} exited before answering (its error is above)")
    return dict(json.loads(line))


def in_flight(results: list[dict[str, Any]]) -> int:
    """The most calls between their start and their end at one moment."""
    events = sorted([(r["start"], 1) for r in results] + [(r["end"], -1) for r in results],
                    key=lambda e: (e[0], e[1]))  # an end before a start at the same moment
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def measure(streams: int, args: argparse.Namespace) -> dict[str, Any]:
    """One case: a server and the clients, killed on any way out."""
    me = [sys.executable, str(Path(__file__).resolve())]
    started: list[subprocess.Popen[str]] = []

    def start(command: list[str]) -> subprocess.Popen[str]:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True)
        started.append(process)
        return process

    try:
        server = start([*me, "--role", "server", "--bytes", str(args.bytes),
                        "--neighbors", str(args.neighbors), "--max-streams",
                        str(args.max_streams)])
        served = read_json(server, "server")
        share = min(args.client_procs, streams)
        clients = [start([*me, "--role", "client", "--requesters",
                          ",".join(str(i) for i in range(1 + k, streams + 1, share))])
                   for k in range(share)]
        for client in clients:
            write(client.stdin, json.dumps(served))
        for client in clients:
            read_json(client, "client")  # connected
        for client in clients:
            write(client.stdin, "go")
        results = []
        for client in clients:
            assert client.stdout is not None
            results += [json.loads(line) for line in client.stdout]
            if client.wait(timeout=60) != 0:
                raise SystemExit("a client failed (its error is above)")
        assert server.stdin is not None
        server.stdin.close()
        memory = read_json(server, "server")
        server.wait(timeout=60)
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()
    ok = [r for r in results if r["code"] == "OK"]
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    size = served["model_bytes"]
    return {
        "streams": streams, "max_streams": served["max_streams"], "model_bytes": size,
        "answered": len(results), "ok": len(ok),
        "refused": sum(r["code"] == "UNAVAILABLE" for r in results),
        "failed": sorted({f"{r['code']}: {r.get('details', '')}" for r in results
                          if r["code"] not in ("OK", "UNAVAILABLE")}),
        "correct": sum(r["crcs"] == served["crcs"] for r in ok),
        "in_flight": in_flight(ok), "seconds": wall,
        "gb_per_s": len(ok) * size / wall / 1e9,
        "stream_seconds_median": statistics.median(r["end"] - r["start"] for r in ok)
        if ok else 0.0,
        "server_base_rss": served["base_rss"], "server_loaded_rss": served["loaded_rss"],
        "server_build_peak_rss": served["build_peak_rss"], "peak_reset": served["peak_reset"],
        "server_peak_rss": memory["peak_rss"], "server_end_rss": memory["end_rss"]}


# ---- the report --------------------------------------------------------------------------------
COLUMNS = ("streams", "limit", "ok", "refused", "correct", "in flight", "wall s", "GB/s",
           "s/stream", "loaded GB", "peak GB", "peak - loaded MB", "MiB/stream", "x model")


def row(r: dict[str, Any]) -> list[str]:
    added = r["server_peak_rss"] - r["server_loaded_rss"]
    return [str(r["streams"]), str(r["max_streams"]), str(r["ok"]), str(r["refused"]),
            f"{r['correct']}/{r['ok']}", str(r["in_flight"]), f"{r['seconds']:.1f}",
            f"{r['gb_per_s']:.2f}", f"{r['stream_seconds_median']:.1f}",
            gb(r["server_loaded_rss"]), gb(r["server_peak_rss"]), f"{added / 1e6:.0f}",
            f"{added / max(1, r['ok']) / 2**20:.1f}",
            f"{(r['server_peak_rss'] - r['server_base_rss']) / r['model_bytes']:.2f}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes", type=parse_size, default=parse_size("100MB"),
                        help="model size (100MB, 1GB, ...; default 100MB)")
    parser.add_argument("--streams", type=int_list, default=int_list("1,8,64"),
                        help="concurrent GetModel calls per case, comma-separated (1,8,64)")
    parser.add_argument("--max-streams", type=int, default=DEFAULT_MAX_STREAMS,
                        help=f"the server's --max-streams (default {DEFAULT_MAX_STREAMS})")
    parser.add_argument("--client-procs", type=int, default=4,
                        help="client processes sharing the requesters (default 4)")
    parser.add_argument("--json", action="store_true", help="one JSON line per case as well")
    parser.add_argument("--role", choices=("server", "client"), help=argparse.SUPPRESS)
    parser.add_argument("--neighbors", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--requesters", type=int_list, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "server":
        return run_server(args)
    if args.role == "client":
        return run_client(args)
    args.neighbors = max(args.streams)

    print(f"# {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {status_kib_total() / 2**30:.0f} GiB RAM, "
          f"Python {platform.python_version()}")
    print(f"# torch {torch.__version__}, grpcio {grpc.__version__}")
    print(f"# command: python {shlex.join(['bench/load.py', *sys.argv[1:]])}")
    results = []
    for streams in args.streams:
        result = measure(streams, args)
        results.append(result)
        if args.json:
            print(json.dumps(result), flush=True)
    first = results[0]
    print(f"# float32, 4 nn.Linear layers, {first['model_bytes'] / 1e6:.0f} MB; server RSS "
          f"before the model {gb(first['server_base_rss'])} GB, peak while building it "
          f"{gb(first['server_build_peak_rss'])} GB; {args.client_procs} client processes; "
          f"peak measured {'from loaded' if first['peak_reset'] else 'over the process life'}")
    print()
    print(markdown_table(COLUMNS, [row(r) for r in results]))
    good = all(r["ok"] + r["refused"] == r["streams"] and r["correct"] == r["ok"]
               and not r["failed"] for r in results)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())

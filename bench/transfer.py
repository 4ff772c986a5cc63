"""Transfer throughput between two processes on loopback: GetModel vs raw TCP vs one unary message.

    python bench/transfer.py                           # 100 MB model, 5 repetitions after a warm-up
    python bench/transfer.py --bytes 20000000 --repeats 3 --chunk-bytes 4194304

A server process (this file with --serve) holds a float32 model of about --bytes bytes shaped like
a small transformer (an embedding, 4 blocks of attention and MLP weights, their biases and layer
norms) and serves it three ways; the main process fetches it each way, a warm-up and then
--repeats times:

  raw TCP      sendall of the payload from a preallocated buffer, recv_into a preallocated
               bytearray, one persistent connection (a 1-byte request starts each transfer);
  GetModel     the real crossgrad.v1.Peer service: the real PeerServicer over a real Node, behind
               crossgrad.rpc.make_server, encoding with peer.wire.encode on every call; the client
               uses crossgrad.rpc.make_channel, stub.GetModel and peer.wire.decode (header checks,
               copy into tensors preallocated from the header, CRC-32C, finiteness), as
               peer/client.py does;
  unary        the naive baseline: the same payload as ONE gRPC message (raw bytes, identity
               serializers, generic handler, message limits raised to fit it).

Two more rows say where GetModel's time goes: "GetModel, no decode" is the same call with the
chunks only parsed by grpc (TensorChunk.FromString), not decoded; "pre-serialized stream" streams
GetModel's exact bytes, serialized once at server start, with identity serializers on both sides:
no protobuf and no tensor work, the ceiling of a gRPC stream of these messages in Python. The
stage rows time, in the main process with no network, encode plus the servicer's per-chunk
ByteSize, and decode of chunks already parsed.

Throughput is payload bytes / wall time of one transfer (request to last byte validated), median
over the repetitions; each repetition runs every method once, interleaved, so that load from other
work on the machine falls on all alike; "x raw TCP" is the ratio to raw TCP in the same run. CPU
columns are the CPU seconds each process spent per second of transfer (1.00 = one core busy).
Wire columns, per transfer: "modelled" sums peer.wire.frame_bytes over every message (what
peer.metrics.Traffic counts; it assumes 16 KiB HTTP/2 frames); "socket" is the TCP payload the
client socket received (tcpi_bytes_received from `ss -ti`: the real HTTP/2 bytes, no TCP/IP
headers); "lo" is the change of the loopback interface's rx counter in /proc/net/dev (both
directions, TCP/IP headers and ACKs included, and any other loopback traffic on the machine: an
upper bound). Minimums over the repetitions.

--grpc-arg NAME=INT appends a channel argument to crossgrad.rpc's server and channel options for
this run (GetModel only), to measure a setting before changing crossgrad/rpc.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import grpc.experimental
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from crossgrad import rpc  # noqa: E402
from crossgrad.security import Security  # noqa: E402
from crossgrad.v1 import peer_pb2, peer_pb2_grpc  # noqa: E402
from peer import wire  # noqa: E402
from peer.metrics import Traffic  # noqa: E402
from peer.node import Node  # noqa: E402
from peer.rounds import Assignment  # noqa: E402
from peer.service import MAX_ROUND  # noqa: E402
from peer.servicer import PeerServicer, add_to_server  # noqa: E402
from peer.training.allocator import keep_freed_memory  # noqa: E402

# The baselines' service (no proto): a unary method, and a stream of GetModel's exact bytes
# serialized once at start (identity serializers: no protobuf work on either side).
BASELINE_SERVICE, UNARY_METHOD, STREAM_METHOD = "bench.Transfer", "Get", "Stream"
SENDER, REQUESTER, ROUND = 0, 1, 0
BLOCKS, VOCAB = 4, 8192  # the model's shape: VOCAB x d embedding, BLOCKS transformer blocks
CALL_TIMEOUT_S = 300.0
LOCAL = "127.0.0.1"  # where the server listens unless --host says otherwise (bench/links.py)
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- the model ---------------------------------------------------------------------------------
def model_shapes(total_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of a float32 transformer of at most total_bytes, d chosen to fit.

    Per block: qkv (3d, d), proj (d, d), fc (4d, d), fc_proj (d, 4d) -> 12 d^2 weights; 13 d biases
    and layer-norm parameters; plus the (VOCAB, d) embedding and a final layer norm.
    """
    elements = total_bytes // 4
    a, b = 12 * BLOCKS, 13 * BLOCKS + VOCAB + 2
    d = max(1, int((-b + math.sqrt(b * b + 4 * a * elements)) / (2 * a)))
    shapes: list[tuple[str, tuple[int, ...]]] = [("wte.weight", (VOCAB, d))]
    for i in range(BLOCKS):
        p = f"blocks.{i}."
        shapes += [(p + "ln1.weight", (d,)), (p + "ln1.bias", (d,)),
                   (p + "attn.qkv.weight", (3 * d, d)), (p + "attn.qkv.bias", (3 * d,)),
                   (p + "attn.proj.weight", (d, d)), (p + "attn.proj.bias", (d,)),
                   (p + "ln2.weight", (d,)), (p + "ln2.bias", (d,)),
                   (p + "mlp.fc.weight", (4 * d, d)), (p + "mlp.fc.bias", (4 * d,)),
                   (p + "mlp.proj.weight", (d, 4 * d)), (p + "mlp.proj.bias", (d,))]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


def make_model(total_bytes: int, seed: int = 0) -> tuple[list[str], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = model_shapes(total_bytes)
    return ([n for n, _ in shapes],
            [torch.randn(s, generator=gen, dtype=torch.float32) * 0.02 for _, s in shapes])


# ---- the server process ------------------------------------------------------------------------
def serving_node(total_bytes: int) -> tuple[Node, list[str], list[torch.Tensor]]:
    """A real Node holding make_model(total_bytes), round ROUND published (what GetModel serves),
    with REQUESTER as its one neighbor; its names and tensors."""
    names, tensors = make_model(total_bytes)
    trainer = SimpleNamespace(device="cpu", names=names)  # what Node reads of its trainer
    algorithm = SimpleNamespace(stats={})  # what PeerRuntime.status reads of its algorithm
    node = Node(SENDER, trainer, algorithm,  # type: ignore[arg-type]
                assignment=Assignment(neighbors=(REQUESTER,), weights={SENDER: .5, REQUESTER: .5}),
                params=tensors)
    node.publish()
    return node, names, tensors


class Runtime:
    """The part of peer.service.PeerRuntime that PeerServicer.GetModel uses, over a real Node."""

    def __init__(self, node: Node, chunk_bytes: int) -> None:
        self.node = node
        self.node_id = node.id
        self.chunk_bytes = chunk_bytes
        self.timeout = CALL_TIMEOUT_S
        self.traffic = Traffic()
        # The bench fetches one round's model again and again: no per-round byte budget.
        self.bytes_per_round = 1 << 62

    def wait_ready(self, timeout: float) -> Node | None:
        return self.node

    def count_rejected(self, reason: str) -> None:
        pass

    def last_round(self) -> int:
        return MAX_ROUND

    def draining(self) -> bool:
        return False


def add_grpc_args(extra: list[tuple[str, int]]) -> None:
    """Append channel arguments to every crossgrad server and channel made from now on."""
    if not extra:
        return
    server_options, channel_options = rpc.server_options, rpc.channel_options

    def server_with_extra(max_message_bytes: int = rpc.DEFAULT_MAX_MESSAGE_BYTES
                          ) -> list[tuple[str, int]]:
        return [*server_options(max_message_bytes), *extra]

    def channel_with_extra(max_message_bytes: int = rpc.DEFAULT_MAX_MESSAGE_BYTES
                           ) -> list[tuple[str, int]]:
        return [*channel_options(max_message_bytes), *extra]

    rpc.server_options, rpc.channel_options = server_with_extra, channel_with_extra


def serve_raw(listener: socket.socket, payload: memoryview) -> None:
    """Per connection: for every request byte, sendall the whole payload."""
    while True:
        conn, _ = listener.accept()
        with conn:
            while conn.recv(1):
                conn.sendall(payload)


def serve(args: argparse.Namespace) -> int:
    node, names, tensors = serving_node(args.bytes)
    payload = b"".join(t.numpy().tobytes() for t in tensors)  # the bytes GetModel carries

    add_grpc_args(args.grpc_arg)
    servicer = PeerServicer(Runtime(node, args.chunk_bytes))  # type: ignore[arg-type]
    peer_server = rpc.make_server(
        f"{args.host}:0",
        [rpc.Service("crossgrad.v1.Peer",
                     lambda s: add_to_server(servicer, s))],
        max_message_bytes=max(rpc.DEFAULT_MAX_MESSAGE_BYTES, args.chunk_bytes + 4096))
    peer_server.set_serving()

    limit = len(payload) + (1 << 20)
    unary_server = grpc.server(futures.ThreadPoolExecutor(4),
                               options=[("grpc.max_send_message_length", limit),
                                        ("grpc.max_receive_message_length", limit)])
    serialized = [chunk.SerializeToString() for chunk in wire.encode(
        names, tensors, sender_id=SENDER, round_=ROUND, chunk_bytes=args.chunk_bytes)]
    handlers = {
        UNARY_METHOD: grpc.unary_unary_rpc_method_handler(lambda request, context: payload),
        STREAM_METHOD: grpc.unary_stream_rpc_method_handler(
            lambda request, context: iter(serialized)),
    }
    unary_server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(BASELINE_SERVICE, handlers)])
    unary_port = unary_server.add_insecure_port(f"{args.host}:0")
    unary_server.start()

    listener = socket.create_server((args.host, 0))
    raw = memoryview(bytearray(payload))
    threading.Thread(target=serve_raw, args=(listener, raw), daemon=True).start()

    print(json.dumps({"peer": peer_server.port, "unary": unary_port,
                      "raw": listener.getsockname()[1]}), flush=True)
    sys.stdin.read()  # the main process closes our stdin when it is done
    peer_server.stop(grace=0)
    unary_server.stop(0)
    return 0


# ---- measuring ---------------------------------------------------------------------------------
@dataclass
class Sample:
    seconds: float
    server_cpu: float
    client_cpu: float
    socket_bytes: int | None  # TCP payload received by the client socket
    lo_bytes: int  # change of the lo rx counter
    modelled_bytes: int | None  # frame_bytes over every message


def process_cpu(pid: int) -> float:
    """CPU seconds of a process's live threads (schedstat: ns), else utime + stime (ticks)."""
    try:
        return sum(int((task / "schedstat").read_text().split()[0])
                   for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9
    except (OSError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK


def lo_rx_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[0])
    return 0


def socket_rx_bytes(port: int) -> int | None:
    """Bytes received by the client side of every connection to port `port` (ss -ti)."""
    try:
        out = subprocess.run(["ss", "-tinH", "state", "established", f"( dport = :{port} )"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    found = [int(n) for n in re.findall(r"bytes_received:(\d+)", out)]
    return sum(found) if found else None


def sample(transfer: Callable[[], int | None], server_pid: int, port: int) -> Sample:
    """Time one transfer; transfer() returns the modelled wire bytes (or None)."""
    sock0 = socket_rx_bytes(port)
    lo0, srv0, cli0 = lo_rx_bytes(), process_cpu(server_pid), time.process_time()
    t0 = time.perf_counter()
    modelled = transfer()
    seconds = time.perf_counter() - t0
    cli1, srv1, lo1 = time.process_time(), process_cpu(server_pid), lo_rx_bytes()
    sock1 = socket_rx_bytes(port)
    return Sample(seconds, srv1 - srv0, cli1 - cli0,
                  None if sock0 is None or sock1 is None else sock1 - sock0, lo1 - lo0, modelled)


def measure(methods: dict[str, tuple[Callable[[], int | None], int]], repeats: int,
            server_pid: int) -> dict[str, list[Sample]]:
    """One warm-up each, then `repeats` rounds of one transfer per method, interleaved so that
    load from other work on the machine falls on every method alike."""
    for transfer, _ in methods.values():
        transfer()
    out: dict[str, list[Sample]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, (transfer, port) in methods.items():
            out[name].append(sample(transfer, server_pid, port))
    return out


def raw_transfer(port: int, nbytes: int, host: str = LOCAL) -> Callable[[], None]:
    conn = socket.create_connection((host, port))
    buf = bytearray(nbytes)
    view = memoryview(buf)

    def run() -> None:
        conn.sendall(b"!")
        got = 0
        while got < nbytes:
            n = conn.recv_into(view[got:])
            if n == 0:
                raise ConnectionError(f"raw TCP server closed after {got} of {nbytes} bytes")
            got += n
    return run


def getmodel_transfer(port: int, specs: list[wire.TensorSpec], max_message_bytes: int,
                      single_thread: bool = False, *, security: Security | None = None,
                      server_name: str | None = None, host: str = LOCAL) -> Callable[[], int]:
    """single_thread: grpc's experimental SingleThreadedUnaryStream channel option (the thread
    that iterates the call polls for its messages itself, no hand-off from the channel's
    polling thread), to measure it before turning it on in crossgrad/rpc.py. security and
    server_name: as crossgrad.rpc.make_channel (None: plaintext). host: the server's address."""
    if single_thread:
        one_thread = (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)
        channel = grpc.insecure_channel(
            f"{host}:{port}", options=[*rpc.channel_options(max_message_bytes), one_thread])
    else:
        channel = rpc.make_channel(f"{host}:{port}", max_message_bytes=max_message_bytes,
                                   security=security, server_name=server_name)
    get_model = channel.unary_stream(  # as peer/client.py GrpcNeighborhood: raw answers
        "/crossgrad.v1.Peer/GetModel",
        request_serializer=peer_pb2.GetModelRequest.SerializeToString,
        response_deserializer=None)
    request = peer_pb2.GetModelRequest(requester_id=REQUESTER, round=ROUND)

    def run() -> int:  # as peer/client.py GrpcNeighborhood._stream
        assert channel is not None  # keeps the channel alive (a closed one refuses calls)
        call = get_model(request, timeout=CALL_TIMEOUT_S, wait_for_ready=True)
        return wire.decode(call, specs, sender_id=SENDER, round_=ROUND).wire_bytes
    return run


def check_getmodel(port: int, names: list[str], tensors: list[torch.Tensor],
                   max_message_bytes: int, *, security: Security | None = None,
                   server_name: str | None = None, host: str = LOCAL) -> None:
    """One GetModel whose tensors are compared with the model, not only checked by CRC."""
    channel = rpc.make_channel(f"{host}:{port}", max_message_bytes=max_message_bytes,
                               security=security, server_name=server_name)
    call = peer_pb2_grpc.PeerStub(channel).GetModel(
        peer_pb2.GetModelRequest(requester_id=REQUESTER, round=ROUND), timeout=CALL_TIMEOUT_S)
    got = wire.decode(call, wire.specs_of(names, tensors), sender_id=SENDER, round_=ROUND)
    channel.close()
    if not all(torch.equal(a, b) for a, b in zip(got.tensors, tensors, strict=True)):
        raise AssertionError("GetModel delivered other tensors than the server holds")


def drain_transfer(port: int, max_message_bytes: int) -> Callable[[], None]:
    """GetModel from the real server, the chunks only parsed (FromString), not decoded."""
    channel = rpc.make_channel(f"127.0.0.1:{port}", max_message_bytes=max_message_bytes)
    stub = peer_pb2_grpc.PeerStub(channel)
    request = peer_pb2.GetModelRequest(requester_id=REQUESTER, round=ROUND)
    def run() -> None:
        for _ in stub.GetModel(request, timeout=CALL_TIMEOUT_S):
            pass
    return run


def ceiling_transfer(port: int, max_message_bytes: int) -> Callable[[], int]:
    """GetModel's bytes, serialized once by the server, received as bytes (no protobuf)."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}",
                                    options=rpc.channel_options(max_message_bytes))
    stream = channel.unary_stream(f"/{BASELINE_SERVICE}/{STREAM_METHOD}")
    return lambda: sum(wire.frame_bytes(len(m)) for m in stream(b"", timeout=CALL_TIMEOUT_S))


def unary_transfer(port: int, nbytes: int) -> Callable[[], int]:
    limit = nbytes + (1 << 20)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}",
                                    options=[("grpc.max_send_message_length", limit),
                                             ("grpc.max_receive_message_length", limit)])
    get = channel.unary_unary(f"/{BASELINE_SERVICE}/{UNARY_METHOD}")

    def run() -> int:
        reply = get(b"", timeout=CALL_TIMEOUT_S, wait_for_ready=True)
        if len(reply) != nbytes:
            raise ValueError(f"unary reply of {len(reply)} bytes, expected {nbytes}")
        return wire.frame_bytes(len(reply))
    return run


def stage_samples(fn: Callable[[], Any], repeats: int) -> list[Sample]:
    fn()
    out = []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        out.append(Sample(time.perf_counter() - t0, 0.0, time.process_time() - c0, None, 0, None))
    return out


# ---- the report --------------------------------------------------------------------------------
def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(value: int | None, payload: int) -> str:
    return "-" if value is None else f"{value / payload:.5f}"


COLUMNS = ("method", "GB/s", "min-max", "x raw TCP", "srv CPU", "cli CPU",
           "wire/payload modelled", "socket", "lo")


def row(name: str, samples: list[Sample], payload: int, baseline: float) -> list[str]:
    gbps = [payload / s.seconds / 1e9 for s in samples]
    cells = [name, f"{median(gbps):.2f}", f"{min(gbps):.2f}-{max(gbps):.2f}",
             f"{median(gbps) / baseline:.2f}",
             f"{median([s.server_cpu / s.seconds for s in samples]):.2f}",
             f"{median([s.client_cpu / s.seconds for s in samples]):.2f}"]
    if name.startswith("stage"):  # in-process: no server, no network
        cells[4] = "-"
        return [*cells, "-", "-", "-"]
    modelled = min((s.modelled_bytes for s in samples if s.modelled_bytes), default=None)
    sock = min((s.socket_bytes for s in samples if s.socket_bytes), default=None)
    lo = min(s.lo_bytes for s in samples)
    return [*cells, ratio(modelled, payload), ratio(sock, payload), ratio(lo, payload)]


def table(rows: list[list[str]], columns: tuple[str, ...] = COLUMNS) -> str:
    widths = [max(len(r[i]) for r in [list(columns), *rows]) for i in range(len(columns))]
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"
    rule = "|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2)
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(list(columns)), rule, *map(line, rows)])


def header_lines(script: str) -> list[str]:
    """What a report starts with: the machine, its load, the versions, the command."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return [f"# {platform.platform()}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores (load average {load}), Python {platform.python_version()}",
            f"# torch {torch.__version__}, grpcio {grpc.__version__}, numpy {np.__version__}",
            f"# command: python {shlex.join([script, *sys.argv[1:]])}"]


def start_server(child: list[str]) -> tuple[subprocess.Popen[str], str]:
    """Start a bench's --serve child; it and the line it prints once listening (its ports).
    The child serves until its stdin closes."""
    server = subprocess.Popen(child, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    line = server.stdout.readline()
    if not line:
        server.wait(timeout=30)
        raise SystemExit("the server process exited before listening (its error is above)")
    return server, line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes", type=int, default=100_000_000,
                        help="model size in bytes (float32; rounded down to the model's shape)")
    parser.add_argument("--repeats", type=int, default=5, help="timed transfers per method")
    parser.add_argument("--chunk-bytes", type=int, default=rpc.DEFAULT_CHUNK_BYTES,
                        help="GetModel data piece size (the peer's --chunk-bytes)")
    parser.add_argument("--grpc-arg", action="append", default=[], metavar="NAME=INT",
                        type=lambda s: (s.split("=", 1)[0], int(s.split("=", 1)[1])),
                        help="extra channel argument for crossgrad's server and channel")
    parser.add_argument("--no-stages", action="store_true", help="skip the in-process stage rows")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--host", default=LOCAL, help=argparse.SUPPRESS)  # --serve's address
    args = parser.parse_args()
    keep_freed_memory()  # as every peer process does (peer/service.py): both ends of the bench
    if args.serve:
        return serve(args)

    names, tensors = make_model(args.bytes)
    specs = wire.specs_of(names, tensors)
    payload = sum(s.nbytes for s in specs)
    print("\n".join(header_lines("bench/transfer.py")))
    print(f"# payload {payload} bytes in {len(specs)} float32 tensors "
          f"(largest {max(s.nbytes for s in specs)} bytes), chunk {args.chunk_bytes} bytes, "
          f"median of {args.repeats} after 1 warm-up"
          + (f", extra grpc args {args.grpc_arg}" if args.grpc_arg else ""))

    child = [sys.executable, str(Path(__file__).resolve()), "--serve", "--bytes", str(args.bytes),
             "--chunk-bytes", str(args.chunk_bytes)]
    for name, value in args.grpc_arg:
        child += ["--grpc-arg", f"{name}={value}"]
    server, line = start_server(child)
    try:
        ports = json.loads(line)
        max_message = max(rpc.DEFAULT_MAX_MESSAGE_BYTES, args.chunk_bytes + 4096)
        ceiling = ceiling_transfer(ports["unary"], max_message)  # before --grpc-arg applies
        add_grpc_args(args.grpc_arg)
        check_getmodel(ports["peer"], names, tensors, max_message)
        results = measure({
            "raw TCP": (raw_transfer(ports["raw"], payload), ports["raw"]),
            "GetModel (stream)": (getmodel_transfer(ports["peer"], specs, max_message),
                                  ports["peer"]),
            "GetModel, 1-thread client": (getmodel_transfer(ports["peer"], specs, max_message,
                                                            single_thread=True), ports["peer"]),
            "unary (1 message)": (unary_transfer(ports["unary"], payload), ports["unary"]),
            "GetModel, no decode": (drain_transfer(ports["peer"], max_message), ports["peer"]),
            "pre-serialized stream": (ceiling, ports["unary"]),
        }, args.repeats, server.pid)
    finally:
        if server.stdin:
            server.stdin.close()
        server.wait(timeout=30)

    if not args.no_stages:
        chunks = list(wire.encode(names, tensors, sender_id=SENDER, round_=ROUND,
                                  chunk_bytes=args.chunk_bytes))
        results["stage: encode + ByteSize"] = stage_samples(
            lambda: sum(c.ByteSize() for c in wire.encode(
                names, tensors, sender_id=SENDER, round_=ROUND, chunk_bytes=args.chunk_bytes)),
            args.repeats)
        results["stage: decode"] = stage_samples(
            lambda: wire.decode(chunks, specs, sender_id=SENDER, round_=ROUND), args.repeats)

    base = median([payload / s.seconds / 1e9 for s in results["raw TCP"]])
    print()
    print(table([row(name, samples, payload, base) for name, samples in results.items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

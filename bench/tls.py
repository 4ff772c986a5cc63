"""The cost of TLS: GetModel throughput, a round's time and a handshake, with and without TLS.

    python bench/tls.py                                  # 100 MB GetModel; mlp and vgg11 runs
    python bench/tls.py --bytes 20000000 --repeats 3 --big-model none --runs 1

Three modes, the ones a deployment chooses between (docs/security.md), every one through the
real server and channel factories (crossgrad.rpc.make_server / make_channel) with the
Security a `crossgrad peer` builds from its flags (crossgrad.cluster.tls_flags read by the CLI's
own parser):

  plaintext    --insecure
  TLS + token  the server presents its certificate, callers none; every call carries the
               run's bearer token (--client-auth token)
  mutual TLS   both sides present certificates signed by the run's CA (the default with TLS)

The certificates are a throw-away run CA's (crossgrad.certs.make_run_certificates: ECDSA
P-256); a caller verifies the server's certificate by its name node-0.crossgrad, as a peer
verifies a neighbor's. Three measurements, each against plaintext measured in the same run:

  GetModel     two processes on loopback, as bench/transfer.py measures: a server process holds
               a float32 model of about --bytes bytes (bench/transfer.py's transformer shapes) in
               a real Node, served by three real PeerRuntimes (one per mode, the same Node); this
               process fetches it with transfer.py's GetModel client (stub.GetModel and
               peer.wire.decode with every check) as node 1, one warm-up and --repeats
               transfers per mode, interleaved so that load from other work falls on every mode
               alike. Columns as in bench/transfer.py (throughput, CPU per process, bytes on the
               wire per payload byte: "socket" includes TLS's record overhead), and "CPU s/GB":
               the CPU seconds both processes spent per GB of payload, which depends far less
               on the machine's other load than the throughput does. A stage row times, in this
               process with no network, what the cipher alone costs: every payload byte sealed
               and opened in 16 KiB TLS records with AES-256-GCM (the `cryptography` package's
               OpenSSL, not grpc's BoringSSL; the costlier of the two AES-GCM suites of TLS 1.3,
               so an upper bound of the encryption both ends of a transfer do).
  handshake    --handshakes times per mode, interleaved: a new channel (its own connection:
               grpc.use_local_subchannel_pool), the time to the answer of its first GetStatus
               (TCP connect, HTTP/2 set-up and, with TLS, the handshake) and of a second one on
               the same channel; "set-up" is first minus second.
  rounds       a real run per mode: a bootstrap and --nodes peers, each a `crossgrad` process
               (crossgrad.cluster.LocalCluster), --rounds rounds of cga on digits with the mlp
               (and --big-rounds with --big-model, vgg11 by default: 37 MB per model and per
               cross-gradient), --runs times per mode in alternating order. "s/round" is the
               median of the round records' `seconds` of every peer (metrics.jsonl, as
               bench/faults.py reads them; round 0, which opens the connections, left out and
               shown on its own); "wall s/round" is, per peer, the time from its round 1 to its
               last round appearing in metrics.jsonl over the rounds between (RoundWatch, 50 ms
               polls), the median over peers: what a round costs with publishing and logging.

Everything runs on this machine's cores, both ends of every connection included: TLS's work is
done twice (encrypt on one end, decrypt on the other) on the same cores as the training.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from bench import transfer  # noqa: E402
from bench.faults import round_seconds  # noqa: E402
from crossgrad.certs import Made, make_run_certificates  # noqa: E402
from crossgrad.cluster import LocalCluster, RoundWatch, tls_flags  # noqa: E402
from crossgrad.config import RunConfig  # noqa: E402
from crossgrad.rpc import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MESSAGE_BYTES, make_channel  # noqa: E402
from crossgrad.security import (  # noqa: E402
    Role,
    Security,
    add_security_flags,
    node_server_name,
    security_from_args,
)
from crossgrad.v1 import peer_pb2, peer_pb2_grpc  # noqa: E402
from peer import wire  # noqa: E402
from peer.service import PeerOptions, PeerRuntime  # noqa: E402
from peer.training.allocator import keep_freed_memory  # noqa: E402

TLS_RECORD_BYTES = 1 << 14  # the most plaintext one TLS record carries (RFC 8446, 5.1)

SENDER, REQUESTER = transfer.SENDER, transfer.REQUESTER


@dataclass(frozen=True)
class Mode:
    name: str
    tls: bool
    token: bool = False


MODES = (Mode("plaintext", tls=False), Mode("TLS + token", tls=True, token=True),
         Mode("mutual TLS", tls=True))


def peer_security(certs: Made, node: int, mode: Mode) -> Security:
    """What `crossgrad peer --id node` runs with in `mode`: LocalCluster's flags for it, read by
    the CLI's own parser. A peer calls its neighbors with the Security it serves with."""
    if not mode.tls:
        return Security.plaintext()  # what --insecure gives, without its start-up warning
    parser = argparse.ArgumentParser()
    add_security_flags(parser, serves=True)
    args = parser.parse_args(tls_flags(certs, f"node-{node}", token=mode.token))
    return security_from_args(args, Role.SERVER, "peer")


def certificates(directory: str) -> Made:
    return Made(Path(directory), ())  # the layout make_run_certificates wrote there


# ---- the server process ------------------------------------------------------------------------
def serve(args: argparse.Namespace) -> int:
    """One real PeerRuntime per mode over the same Node; their ports on stdout, one line."""
    node, _, _ = transfer.serving_node(args.bytes)
    certs = certificates(args.certs)
    runtimes = []
    for mode in MODES:
        runtime = PeerRuntime(PeerOptions(
            node_id=SENDER, bootstrap="unused:1", timeout=transfer.CALL_TIMEOUT_S,
            chunk_bytes=args.chunk_bytes, security=peer_security(certs, SENDER, mode),
            bytes_per_round=1 << 62))  # the bench fetches one round's model again and again
        runtime.serve()
        runtime.attach(node, {}, epoch=1)  # it only serves: no neighbor is ever asked
        runtimes.append(runtime)
    print(" ".join(str(r.server.port) for r in runtimes if r.server), flush=True)
    sys.stdin.read()  # the main process closes our stdin when it is done
    for runtime in runtimes:
        if runtime.server:
            runtime.server.stop(grace=0)
    return 0


def aes_gcm(payload: int) -> Callable[[], None]:
    """Seal and open `payload` bytes as TLS records of TLS_RECORD_BYTES with AES-256-GCM: the
    cipher's work for one transfer, both ends' share, in this thread. One record's buffer
    again and again (in cache: a little optimistic)."""
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    record, nonce = os.urandom(TLS_RECORD_BYTES), bytes(12)
    records = math.ceil(payload / TLS_RECORD_BYTES)

    def run() -> None:
        for _ in range(records):
            aead.decrypt(nonce, aead.encrypt(nonce, record, None), None)
    return run


def cpu_per_gb(samples: list[transfer.Sample], payload: int) -> str:
    """CPU seconds of both processes (this one only, for a stage) per GB of payload."""
    return f"{med([(s.server_cpu + s.client_cpu) / (payload / 1e9) for s in samples]):.2f}"


# ---- handshakes --------------------------------------------------------------------------------
@dataclass
class Handshakes:
    first: list[float] = field(default_factory=list)  # s to the first answer on a new channel
    second: list[float] = field(default_factory=list)  # s to the next answer on it


def first_calls(port: int, security: Security) -> tuple[float, float]:
    """Seconds to the first GetStatus answer on a new channel, and to a second one on it."""
    request = peer_pb2.GetStatusRequest(requester="bench-tls")
    with make_channel(f"127.0.0.1:{port}", security=security,
                      server_name=node_server_name(SENDER)) as channel:
        stub = peer_pb2_grpc.PeerStub(channel)
        t0 = time.perf_counter()
        stub.GetStatus(request, timeout=30.0, wait_for_ready=True)
        t1 = time.perf_counter()
        stub.GetStatus(request, timeout=30.0)
        return t1 - t0, time.perf_counter() - t1


def measure_handshakes(ports: dict[str, int], certs: Made, count: int) -> dict[str, Handshakes]:
    # Each channel its own connection: grpc otherwise may hand a new channel the subchannel of
    # an earlier one with the same target and arguments, with no handshake at all.
    transfer.add_grpc_args([("grpc.use_local_subchannel_pool", 1)])
    securities = {m.name: peer_security(certs, REQUESTER, m) for m in MODES}
    for mode in MODES:  # warm-up: the first TLS channel of a process loads the CA and more
        first_calls(ports[mode.name], securities[mode.name])
    out = {m.name: Handshakes() for m in MODES}
    for _ in range(count):
        for mode in MODES:
            first, second = first_calls(ports[mode.name], securities[mode.name])
            out[mode.name].first.append(first)
            out[mode.name].second.append(second)
    return out


# ---- rounds ------------------------------------------------------------------------------------
@dataclass
class Rounds:
    seconds: list[float] = field(default_factory=list)  # round records, rounds >= 1, all peers
    round0: list[float] = field(default_factory=list)  # round 0 of each peer
    wall: list[float] = field(default_factory=list)  # per peer and run: wall s/round
    load: list[float] = field(default_factory=list)  # 1-minute load average after each run
    runs: int = 0


def run_once(config: RunConfig, mode: Mode, certs: Made, out: Path, timeout: float,
             into: Rounds) -> None:
    """One run of `config` in `mode` (LocalCluster: every process its own session, all ended on
    any way out); its figures added to `into`."""
    nodes = list(range(config.nodes))
    with LocalCluster(config, out, certs=certs if mode.tls else None,
                      token=mode.token) as cluster:
        watch = RoundWatch(out, nodes)
        try:
            cluster.start_bootstrap()
            cluster.start_peers()
            codes = cluster.wait_peers(timeout)
        finally:
            watch.stop()
    if any(codes.values()):
        raise RuntimeError(f"{mode.name}: peers exited with {codes}; see the logs in {out}")
    for i in nodes:
        seconds = round_seconds(out, i)
        into.round0.append(seconds.pop(0))
        into.seconds += seconds.values()
        seen = watch.times(i)
        last = max(seen)
        if last > 1:
            into.wall.append((seen[last] - seen[1]) / (last - 1))
    into.load.append(os.getloadavg()[0])
    into.runs += 1


def measure_rounds(config: RunConfig, certs: Made, runs: int, out: Path,
                   timeout: float) -> dict[str, Rounds]:
    """`runs` runs per mode, in alternating order (A B C, C B A, ...): a drift of the machine's
    load falls on every mode alike."""
    results = {m.name: Rounds() for m in MODES}
    for k in range(runs):
        for mode in MODES if k % 2 == 0 else MODES[::-1]:
            started = time.monotonic()
            where = out / f"{config.model}-{mode.name.replace(' ', '').replace('+', '-')}-{k}"
            run_once(config, mode, certs, where, timeout, results[mode.name])
            print(f"# {config.model}, {mode.name}, run {k + 1}: "
                  f"{time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return results


# ---- the report --------------------------------------------------------------------------------
def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "-"
    return f"{min(values) * scale:.{digits}f}-{max(values) * scale:.{digits}f}"


def markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def handshake_table(results: dict[str, Handshakes]) -> str:
    base = med(results[MODES[0].name].first)
    rows = []
    for name, h in results.items():
        setup = [a - b for a, b in zip(h.first, h.second, strict=True)]
        rows.append([name, f"{med(h.first) * 1e3:.2f}", spread(h.first, 1e3),
                     f"{med(h.second) * 1e3:.2f}", f"{med(setup) * 1e3:.2f}",
                     f"{med(h.first) / base:.2f}"])
    return markdown(["mode", "first call ms", "min-max", "next call ms", "set-up ms",
                     "first x plaintext"], rows)


def rounds_table(results: dict[str, dict[str, Rounds]]) -> str:
    rows = []
    for model, by_mode in results.items():
        base = by_mode[MODES[0].name]
        for name, r in by_mode.items():
            rows.append([model, name, str(r.runs), str(len(r.seconds)), f"{med(r.seconds):.3f}",
                         f"{med(r.seconds) / med(base.seconds):.2f}", f"{med(r.wall):.3f}",
                         spread(r.wall, digits=3), f"{med(r.wall) / med(base.wall):.2f}",
                         f"{med(r.round0):.2f}", spread(r.load, digits=1)])
    return markdown(["model", "mode", "runs", "rounds", "s/round", "x plaintext",
                     "wall s/round", "min-max", "x plaintext", "round 0 s", "load"], rows)


def getmodel(args: argparse.Namespace, certs: Made) -> tuple[str, dict[str, Handshakes]]:
    """The GetModel table and the handshakes, against one server process."""
    names, tensors = transfer.make_model(args.bytes)
    specs = wire.specs_of(names, tensors)
    payload = sum(s.nbytes for s in specs)
    print(f"# GetModel: payload {payload} bytes in {len(specs)} float32 tensors, chunk "
          f"{args.chunk_bytes} bytes, median of {args.repeats} after 1 warm-up; "
          f"handshakes: median of {args.handshakes}", flush=True)
    child = [sys.executable, str(Path(__file__).resolve()), "--serve", "--bytes",
             str(args.bytes), "--chunk-bytes", str(args.chunk_bytes), "--certs", str(certs.out)]
    server, line = transfer.start_server(child)
    try:
        ports = dict(zip((m.name for m in MODES), map(int, line.split()), strict=True))
        max_message = max(DEFAULT_MAX_MESSAGE_BYTES, args.chunk_bytes + 4096)
        methods: dict[str, tuple[Callable[[], int | None], int]] = {}
        for mode in MODES:
            security = peer_security(certs, REQUESTER, mode)
            name = node_server_name(SENDER)
            transfer.check_getmodel(ports[mode.name], names, tensors, max_message,
                                    security=security, server_name=name)
            methods[mode.name] = (transfer.getmodel_transfer(
                ports[mode.name], specs, max_message, security=security, server_name=name),
                ports[mode.name])
        samples = transfer.measure(methods, args.repeats, server.pid)
        samples["stage: AES-256-GCM seal + open"] = transfer.stage_samples(aes_gcm(payload),
                                                                           args.repeats)
        handshakes = measure_handshakes(ports, certs, args.handshakes)
    finally:
        if server.stdin:
            server.stdin.close()
        server.wait(timeout=60)
    base = med([payload / s.seconds / 1e9 for s in samples[MODES[0].name]])
    columns = tuple("x plaintext" if c == "x raw TCP" else c for c in transfer.COLUMNS)
    columns = ("mode", *columns[1:], "CPU s/GB")
    rows = [[*transfer.row(n, s, payload, base), cpu_per_gb(s, payload)]
            for n, s in samples.items()]
    return transfer.table(rows, columns), handshakes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--bytes", type=int, default=100_000_000,
                        help="GetModel: model size in bytes (float32; rounded down to its shape)")
    parser.add_argument("--repeats", type=int, default=5, help="GetModel: transfers per mode")
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES,
                        help="GetModel: data piece size (the peer's --chunk-bytes)")
    parser.add_argument("--handshakes", type=int, default=30, help="new channels per mode")
    parser.add_argument("--nodes", type=int, default=3, help="peers of each run")
    parser.add_argument("--rounds", type=int, default=100, help="rounds of each mlp run")
    parser.add_argument("--runs", type=int, default=3, help="runs per mode and model")
    parser.add_argument("--big-model", default="vgg11",
                        help="a second, bigger model for the runs ('none': only the mlp)")
    parser.add_argument("--big-rounds", type=int, default=15, help="rounds of each big run")
    parser.add_argument("--run-timeout", type=float, default=600.0, help="per run (s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="keep the runs' directories here (default: a temporary one)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--certs", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    keep_freed_memory()  # as every peer process does (peer/service.py)
    if args.serve:
        return serve(args)

    started = time.monotonic()
    print("\n".join(transfer.header_lines("bench/tls.py")), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        out = args.out or Path(tmp)
        certs = make_run_certificates(out / "certs", nodes=max(args.nodes, 2))
        getmodel_table, handshakes = getmodel(args, certs)
        print(f"\n{getmodel_table}\n\n{handshake_table(handshakes)}\n", flush=True)
        plans = [(RunConfig(nodes=args.nodes, topology="ring", algorithm="cga", dataset="digits",
                            partition="iid", model="mlp", rounds=args.rounds,
                            eval_every=args.rounds, device="cpu"))]
        if args.big_model != "none":
            plans.append(RunConfig(nodes=args.nodes, topology="ring", algorithm="cga",
                                   dataset="digits", partition="iid", model=args.big_model,
                                   rounds=args.big_rounds, eval_every=args.big_rounds,
                                   device="cpu"))
        print(f"# rounds: {args.nodes} peers, cga on digits (iid, ring, batch "
              f"{plans[0].batch_size}), {args.runs} runs per mode and model", flush=True)
        rounds = {config.model: measure_rounds(config, certs, args.runs, out / "runs",
                                               args.run_timeout) for config in plans}
    print(f"\n{rounds_table(rounds)}\n")
    print(f"# {time.monotonic() - started:.0f} s in all; load average now "
          f"{os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

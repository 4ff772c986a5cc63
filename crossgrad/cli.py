"""The `crossgrad` command.

    crossgrad simulate  [--nodes N --topology T --algorithm A --dataset D --partition P ...]
    crossgrad bootstrap [run flags] [--bind HOST:PORT --state FILE --lease-seconds S]
    crossgrad peer      --id I --bootstrap HOST:PORT [--bind HOST:PORT --advertise HOST:PORT ...]
    crossgrad demo      [run flags]   a bootstrap and N peers as processes on loopback
    crossgrad status    ADDRESS [--watch]   a peer's status, or the bootstrap's list of peers
    crossgrad certs     --nodes N --out DIR   a CA and the certificates of a run
    crossgrad plot      RUN_DIR [RUN_DIR ...] [--out DIR]   PNGs of finished runs

Serving and calling need TLS material (--tls-ca, --tls-cert, --tls-key) or an explicit --insecure
(docs/security.md); `crossgrad demo` makes a throw-away CA in its run directory.

Bad input (unknown names, impossible settings, missing data files) ends in one line on stderr
and exit code 2, never a traceback. Choices shown in --help come from the registries.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import NoReturn

from crossgrad.certs import DEFAULT_DAYS, DEFAULT_HOSTS
from crossgrad.config import DEVICES, MEMORY_FORMATS, RunConfig
from crossgrad.errors import ConfigError, DataError, ProtocolError
from crossgrad.guard import add_limit_flags, limits_from_args
from crossgrad.security import Role, add_security_flags, security_from_args
from peer.builder import (
    load_config,  # ranges and registry names: the whole check
)

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _help(name: str) -> str:
    from bootstrap.topology import TOPOLOGY_NAMES
    from peer.algorithms import ALGORITHMS
    from peer.compression import COMPRESSOR_NAMES
    from peer.training.datasets import DATASETS
    from peer.training.models import MODELS
    from peer.training.partitions import PARTITION_NAMES

    default = getattr(RunConfig(), name)
    known = {
        "compressor": list(COMPRESSOR_NAMES), "model_compressor": list(COMPRESSOR_NAMES),
        "algorithm": sorted(ALGORITHMS), "dataset": sorted(DATASETS), "model": sorted(MODELS),
        "topology": list(TOPOLOGY_NAMES), "partition": list(PARTITION_NAMES),
        "device": list(DEVICES), "memory_format": list(MEMORY_FORMATS),
    }.get(name)
    text = f"default {default!r}" if default not in ("", None) else "default: per data set"
    return f"one of {', '.join(known)}; {text}" if known else text


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field; None means 'not given', so TOML and env can fill it."""
    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        ftype = {"int": int, "float": float}.get(str(f.type), str)
        parser.add_argument(flag, dest=f.name, type=ftype, default=None, help=_help(f.name))
    parser.add_argument("--config", help="TOML file with run settings (flags override it)")


def add_metrics_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--metrics-port", type=int, default=0,
                        help=f"serve Prometheus metrics at http://HOST:PORT/metrics, {what} "
                        "(docs/metrics.md; default 0: no metrics)")


def metrics_port(args: argparse.Namespace) -> int | None:
    """--metrics-port as the servers take it: None for 0 (off)."""
    return args.metrics_port or None


def build_parser() -> Parser:
    parser = Parser(prog="crossgrad", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    sim = sub.add_parser("simulate", help="run every node of a run in this process")
    add_run_flags(sim)
    sim.add_argument("--out", type=Path, default=None,
                     help="run directory for metrics and models (default runs/<timestamp>-...)")
    sim.add_argument("--quiet", action="store_true", help="print only the final table")
    sim.add_argument("--engine", choices=("nodes", "batched"), default="nodes",
                     help="nodes: every Node's round in turn (default); batched: all nodes' "
                     "gradients and steps as stacked tensors, for many nodes (dpsgd, cga)")

    boot = sub.add_parser("bootstrap", help="serve the rendezvous that assigns neighbors")
    add_run_flags(boot)
    boot.add_argument("--expect", dest="nodes", type=int, default=None,
                      help="peers to wait for before round 0 (the same as --nodes)")
    boot.add_argument("--bind", default="0.0.0.0:50050", help="HOST:PORT to serve on "
                      "(port 0: any free port; default 0.0.0.0:50050)")
    boot.add_argument("--state", default=None,
                      help="SQLite file that keeps the run across restarts (default: memory)")
    boot.add_argument("--lease-seconds", type=float, default=15.0,
                      help="a peer silent this long is presumed dead (default 15)")
    add_security_flags(boot, serves=True)
    add_limit_flags(boot)
    add_metrics_flag(boot, "HOST the one of --bind")

    peer = sub.add_parser("peer", help="run one node: serve, join the bootstrap, train")
    peer.add_argument("--id", dest="node_id", type=int, required=True,
                      help="this node's id: its data partition index, 0..N-1")
    peer.add_argument("--bootstrap", required=True, help="HOST:PORT of the bootstrap")
    peer.add_argument("--bind", default="0.0.0.0:50051",
                      help="HOST:PORT to serve on (default 0.0.0.0:50051; port 0: any free port)")
    peer.add_argument("--advertise", default="",
                      help="HOST:PORT neighbors reach this node at (default: the bound address)")
    peer.add_argument("--data-dir", default=None, help="directory holding the data set's files")
    peer.add_argument("--device", default="auto", choices=DEVICES, help="default auto")
    peer.add_argument("--out", type=Path, default=None,
                      help="directory for metrics, model and summary (default runs/peer-ID)")
    peer.add_argument("--timeout", type=float, default=60.0,
                      help="deadline of every call to a neighbor, in seconds (default 60): a "
                      "dead or stalled neighbor delays a round by at most this much")
    peer.add_argument("--checkpoint-dir", type=Path, default=None,
                      help="where this peer keeps its checkpoints (default OUT/checkpoints)")
    peer.add_argument("--checkpoint-every", type=int, default=None,
                      help="rounds between checkpoints (0: only on SIGTERM; default: under 2%% "
                      "of round time, see docs/reliability.md)")
    peer.add_argument("--resume", action="store_true",
                      help="restart from the latest checkpoint of this run (an error if there "
                      "is none); without it, a checkpoint of the same run is used when found")
    peer.add_argument("--max-model-bytes", type=int, default=None,
                      help="the largest model or cross-gradient stream accepted from a "
                      "neighbor, in bytes (default 8 GiB); larger ones are refused at their "
                      "header")
    peer.add_argument("--max-streams", type=int, default=None,
                      help="streams this peer serves at once (model fetches, cross-gradient "
                      "requests: two per neighbor in a round; default 128); one more is "
                      "refused UNAVAILABLE, and threads are kept for unary calls apart")
    peer.add_argument("--join-timeout", type=float, default=300.0,
                      help="how long to wait for the bootstrap and the other peers at start, "
                      "in seconds (default 300)")
    peer.add_argument("--config", default=None,
                      help="TOML file; this command reads its [security] table")
    add_security_flags(peer, serves=True)
    add_limit_flags(peer)
    peer.add_argument("--max-bytes-per-round", type=int, default=None,
                      help="bytes one neighbor may stream from this node per round (default: "
                      "four times the model)")
    add_metrics_flag(peer, "HOST the one of --bind")

    demo = sub.add_parser("demo", help="a bootstrap and N peers as processes on loopback")
    add_run_flags(demo)
    demo.add_argument("--out", type=Path, default=None,
                      help="run directory (default runs/<timestamp>-demo)")
    demo.add_argument("--timeout", type=float, default=60.0,
                      help="peers' deadline for neighbor calls, in seconds (default 60)")
    demo.add_argument("--quiet", action="store_true", help="print only the final table")
    demo.add_argument("--insecure", action="store_true",
                      help="plaintext; by default the demo runs with mutual TLS, with a "
                      "throw-away CA in its run directory")
    add_metrics_flag(demo, "HOST 127.0.0.1: the bootstrap's on PORT, peer I's on PORT+1+I")

    status = sub.add_parser("status", help="show a peer's status or the bootstrap's peers")
    status.add_argument("address", help="HOST:PORT of a peer or of the bootstrap")
    status.add_argument("--timeout", type=float, default=5.0)
    status.add_argument("--server-name", default=None,
                        help="the name to verify on the server's certificate (e.g. "
                        "node-3.crossgrad; default: the host of ADDRESS)")
    status.add_argument("--watch", action="store_true",
                        help="keep showing the peer, or every peer of the run, until the run "
                        "ends or Ctrl-C (a live table in a terminal, log lines otherwise)")
    status.add_argument("--interval", type=float, default=1.0,
                        help="seconds between two looks with --watch (default 1)")
    add_security_flags(status, serves=False)

    certs = sub.add_parser("certs", help="make a CA and the certificates of a run")
    certs.add_argument("--nodes", type=int, required=True, help="one certificate per node")
    certs.add_argument("--out", type=Path, required=True, help="directory to write them to")
    certs.add_argument("--hosts", default=",".join(DEFAULT_HOSTS),
                       help="comma-separated names and addresses people reach the servers at "
                       f"(default {','.join(DEFAULT_HOSTS)})")
    certs.add_argument("--days", type=int, default=DEFAULT_DAYS,
                       help=f"validity of the certificates (default {DEFAULT_DAYS})")
    certs.add_argument("--ca-cert", type=Path, default=None,
                       help="sign with this existing CA (with --ca-key) instead of a new one: "
                       "to add nodes or renew certificates")
    certs.add_argument("--ca-key", type=Path, default=None)
    certs.add_argument("--if-missing", action="store_true",
                       help="do nothing when OUT already holds a CA (a compose set-up that "
                       "runs this at every `up` keeps its certificates)")

    plot = sub.add_parser("plot", help="PNGs of finished runs: accuracy and loss per round, "
                          "accuracy against bytes on the wire, round time")
    plot.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                      help="run directories written by simulate, demo or peer (--out)")
    plot.add_argument("--out", type=Path, default=None,
                      help="directory for the PNGs (default RUN_DIR/plots for one run, "
                      "./plots for several)")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    return {f.name: getattr(args, f.name) for f in fields(RunConfig)}


def cmd_simulate(args: argparse.Namespace) -> int:
    from peer import batched, simulate

    config = load_config(_overrides(args), args.config)
    if args.engine == "batched":
        batched.refuse_unsupported(config)
    from crossgrad.display import RunDisplay

    title = f"simulate: {config.algorithm}, {config.topology}, {config.dataset}/{config.partition}"
    with RunDisplay(quiet=args.quiet, title=title) as display:
        # Bytes on the wire are counted by encoding each message as a peer would (a few per
        # cent of a round): run records then carry them, as a deployed peer's do, for the live
        # table and `crossgrad plot`.
        run = batched.run if args.engine == "batched" else simulate.run
        result = run(config, args.out, progress=display.note,
                     watch=display.update if display.live else None, count_bytes=True)
    print(simulate.table(result), flush=True)
    return 0


def freeze_startup() -> None:
    """For a long-lived server, once it is up: what it loaded to start (torch and numpy, which
    the settings' checks import: some 180,000 objects; a peer's model and data) lives as long as
    the process, so the collector's full passes need not scan it again. Such a pass stopped a
    bootstrap under 1,000 peers for 190 ms, and a peer's round for up to 100 ms; frozen, it
    scans what the process made since (docs/benchmarks.md, "Busy bootstrap")."""
    gc.freeze()


def cmd_bootstrap(args: argparse.Namespace) -> int:
    import threading

    from bootstrap.server import serve
    from crossgrad.collector import PacedCollector
    from crossgrad.rpc import install_signal_handlers

    config = load_config(_overrides(args), args.config)
    security = security_from_args(args, Role.SERVER, "bootstrap")
    server = serve(config, args.bind, args.state, args.lease_seconds, security=security,
                   limits=limits_from_args(args), metrics_port=metrics_port(args))
    freeze_startup()
    stop = threading.Event()
    install_signal_handlers(stop.set)  # before the line that tells a supervisor it is up
    # Paced: a thousand streams' pending reads fill the young generation (crossgrad/collector.py)
    with PacedCollector():
        print(f"bootstrap serving on {server.address} (port {server.port}); waiting for "
              f"{config.nodes} peers", flush=True)
        stop.wait()
        server.stop(grace=2.0)
    return 0


def cmd_peer(args: argparse.Namespace) -> int:
    from crossgrad.rpc import install_signal_handlers
    from peer.service import PeerOptions, PeerRuntime, Stopped

    out = args.out or Path(f"runs/peer-{args.node_id}")
    security = security_from_args(args, Role.SERVER, "peer")
    given = {"checkpoint_every": args.checkpoint_every, "max_model_bytes": args.max_model_bytes,
             "bytes_per_round": args.max_bytes_per_round, "max_streams": args.max_streams}
    options = PeerOptions(node_id=args.node_id, bootstrap=args.bootstrap, bind=args.bind,
                          advertise=args.advertise, data_dir=args.data_dir, device=args.device,
                          out=out, timeout=args.timeout, join_timeout=args.join_timeout,
                          checkpoint_dir=args.checkpoint_dir or out / "checkpoints",
                          resume=args.resume, security=security,
                          limits=limits_from_args(args), metrics_port=metrics_port(args),
                          **{k: v for k, v in given.items() if v is not None})
    runtime = PeerRuntime(options)
    install_signal_handlers(runtime.stop)
    try:
        try:
            runtime.start()
        except Stopped:
            print(f"peer {args.node_id} stopped before the run assembled", flush=True)
            return 0
        freeze_startup()
        print(f"peer {args.node_id} serving on {runtime.address}", flush=True)
        summary = runtime.run()
        verb = "done" if summary["round"] == summary["rounds"] else "stopped"
        print(f"peer {args.node_id} {verb} at round {summary['round']} of {summary['rounds']}; "
              f"last test accuracy {summary['accuracy']:.4f}", flush=True)
    finally:
        runtime.shutdown(grace=2.0)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from crossgrad.demo import run_demo

    config = load_config(_overrides(args), args.config)
    return run_demo(config, args.out, timeout=args.timeout, insecure=args.insecure,
                    quiet=args.quiet, metrics_port=args.metrics_port)


def cmd_status(args: argparse.Namespace) -> int:
    from crossgrad.status import show_status

    security = security_from_args(args, Role.CLIENT, "status")
    if args.watch:
        from crossgrad.status import watch_status

        print(watch_status(args.address, interval=args.interval, timeout=args.timeout,
                           security=security, server_name=args.server_name), flush=True)
        return 0
    print(show_status(args.address, timeout=args.timeout, security=security,
                      server_name=args.server_name))
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from crossgrad.certs import make_run_certificates

    if (args.ca_cert is None) != (args.ca_key is None):
        raise ConfigError("--ca-cert and --ca-key go together")
    if args.if_missing and (args.out / "ca.pem").exists():
        print(f"{args.out} already holds a CA: nothing written (--if-missing)", flush=True)
        return 0
    made = make_run_certificates(args.out, args.nodes, hosts=args.hosts.split(","),
                                 days=args.days,
                                 ca=(args.ca_cert, args.ca_key) if args.ca_cert else None)
    print(f"wrote {len(made.names)} certificates and keys, and a token, to {made.out}: "
          f"{', '.join(made.names)}. Keep ca.key offline; give each node its node-ID.pem and "
          "node-ID.key, and everyone ca.pem", flush=True)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from crossgrad.plots import plot_runs

    out = args.out or (args.runs[0] / "plots" if len(args.runs) == 1 else Path("plots"))
    for path in plot_runs(args.runs, out):
        print(path, flush=True)
    return 0


COMMANDS = {"simulate": cmd_simulate, "bootstrap": cmd_bootstrap, "peer": cmd_peer,
            "demo": cmd_demo, "status": cmd_status, "certs": cmd_certs, "plot": cmd_plot}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError) as exc:
        print(f"crossgrad {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ProtocolError as exc:
        print(f"crossgrad {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"crossgrad {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`crossgrad demo`: a bootstrap and N peers as separate processes on loopback.

Everything goes through the real CLI and real sockets: the bootstrap binds a free port and says
which; every peer binds a free port, joins, trains and writes its results under the run
directory. Progress comes from the bootstrap's ListPeers and each peer's GetStatus
(crossgrad/watch.py), drawn live in a terminal and as log lines otherwise (crossgrad/display.py);
--quiet keeps only the final table. At the end
the demo prints the final table (per-node accuracy, mean, min, average-model accuracy,
consensus distance, QP fallbacks, bytes on the wire in all and per message kind), writes its
plots (crossgrad/plots.py) under RUN/plots, prints their paths and stops everything; Ctrl-C or
SIGTERM stops everything too, even when the demo was started with SIGINT ignored (as POSIX
shells start `&` jobs).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any, NoReturn

import torch

from crossgrad.certs import make_run_certificates
from crossgrad.cluster import client_security, command, read_bootstrap_address, run_flags, tls_flags
from crossgrad.config import RunConfig
from crossgrad.display import PeerRow, RunDisplay, Snapshot, state_label
from crossgrad.errors import ConfigError, ProtocolError
from crossgrad.plots import plot_runs
from crossgrad.security import BOOTSTRAP_SERVER_NAME
from crossgrad.status import byte_cells, byte_columns, kind_columns
from crossgrad.v1 import bootstrap_pb2
from crossgrad.watch import RunWatcher

POLL_SECONDS = 0.5  # between two looks at the run: a person's refresh rate


class Terminated(Exception):
    """SIGTERM reached the demo: it stops the run as Ctrl-C does, with exit code 143."""


class _StopSignals:
    """SIGINT and SIGTERM as exceptions in the demo's main thread, installed explicitly.

    Python raises KeyboardInterrupt on SIGINT only if SIGINT was not ignored when it started,
    and POSIX shells start `&` jobs with SIGINT ignored; SIGTERM would end the demo at once.
    Either way the bootstrap and the peers would train on. The first signal raises; later ones
    are ignored, since the demo is already stopping. Inside `deferred()` a signal waits for the
    block to end, so that it cannot land between starting a child and recording it.
    """

    def __init__(self) -> None:
        self.stopping = False
        self._deferring = False
        self._pending: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle)
                          for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._deferring:
            self._pending = self._pending or signum
        elif not self.stopping:
            self._raise(signum)

    def _raise(self, signum: int) -> NoReturn:
        self.stopping = True
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending is not None and not self.stopping:
            self._raise(self._pending)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)




def _stop(procs: list[subprocess.Popen[str]], grace: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def node_marks(summary: Mapping[str, Any] | None,
               peer: bootstrap_pb2.PeerInfo | None) -> str:
    """What happened to a node, for the final table: done or stopped (its own summary), dead
    (no summary, or expired at the bootstrap), resumed (restarted from its checkpoint), returned
    (let back in after it was dead or had left)."""
    marks = []
    if summary is None or (peer is not None and peer.state == "EXPIRED"):
        marks.append("dead")
    if summary is not None:
        marks.append("done" if summary["round"] >= summary["rounds"] else "stopped")
        if summary.get("resumes", 0):
            marks.append("resumed")
    if peer is not None and peer.returns:
        marks.append("returned")
    return ",".join(marks)


def final_table(config: RunConfig, out: Path,
                peers: Mapping[int, bootstrap_pb2.PeerInfo] | None = None) -> str:
    """Per node: state marks, accuracy, QP fallbacks, missed answers, bytes; then the mean and
    minimum over the nodes that wrote results, the average model and the consensus distance.
    `peers` (the bootstrap's ListPeers rows by id) adds what only the bootstrap knows."""
    from peer.builder import load_run_data
    from peer.metrics import average, consensus_distance, pair_sum
    from peer.training.models import make_model
    from peer.training.trainer import Schedule, Trainer

    peers = peers or {}
    found = {i: out / f"node-{i}" / "summary.json" for i in range(config.nodes)}
    summaries = {i: json.loads(path.read_text()) for i, path in found.items() if path.exists()}
    models = [torch.load(out / f"node-{i}" / "model.pt", weights_only=True) for i in summaries]
    by_kind = {i: {k: (n["sent"], n["received"]) for k, n in s["bytes_by_kind"].items()}
               for i, s in summaries.items()}
    kinds = kind_columns(k for node in by_kind.values() for k in node)
    heads = byte_columns(kinds)
    width = max(9, *(len(h) for h in heads))
    lines = [f"{'node':>6}  {'state':<22}  {'test acc':>8}  {'QP fallbacks':>12}  {'missed':>6}  "
             + "  ".join(f"{h:>{width}}" for h in heads)]
    for i in range(config.nodes):
        marks = node_marks(summaries.get(i), peers.get(i))
        s = summaries.get(i)
        if s is None:
            lines.append(f"{i:>6}  {marks:<22}  {'-':>8}  {'-':>12}  {'-':>6}")
            continue
        lines.append(f"{i:>6}  {marks:<22}  {s['accuracy']:>8.4f}  {s['qp_fallbacks']:>12}  "
                     f"{s['missed_neighbor_answers']:>6}  "
                     + byte_cells(s["bytes_sent"], s["bytes_received"], by_kind[i], kinds, width))
    if not summaries:
        return "\n".join([*lines, "no node wrote results", f"run directory {out}"])
    accs = [s["accuracy"] for s in summaries.values()]
    total = {k: pair_sum(node.get(k, (0, 0)) for node in by_kind.values()) for k, _ in kinds}
    data = load_run_data(config)
    ds = data.dataset
    model = make_model(config.model, ds.input_shape, ds.num_classes)
    judge = Trainer(-1, model, ds.test_x[:1], ds.test_y[:1], Schedule(), config.seed,
                    torch.device("cpu"))
    _, avg_acc = judge.evaluate(average(models), ds.test_x, ds.test_y)
    lines += [f"{'mean':>6}  {'':<22}  {sum(accs) / len(accs):>8.4f}",
              f"{'min':>6}  {'':<22}  {min(accs):>8.4f}",
              f"{'all':>6}  {'':<22}  {'':>8}  {'':>12}  {'':>6}  "
              + byte_cells(sum(s["bytes_sent"] for s in summaries.values()),
                           sum(s["bytes_received"] for s in summaries.values()), total, kinds,
                           width),
              f"average model accuracy  {avg_acc:.4f}",
              f"consensus distance      {consensus_distance(models):.4f}"]
    resyncs = sum(s.get("resyncs", 0) for s in summaries.values())
    if resyncs:
        lines.append(f"resyncs after missed updates  {resyncs}")
    skips = sum(s.get("cross_skips", 0) for s in summaries.values())
    sent = sum(s.get("cross_sent", 0) for s in summaries.values())
    if skips + sent:
        lines.append(f"cross-gradient tensors skipped (clag)  {skips} of {skips + sent}")
    lines.append(f"run directory {out}")
    return "\n".join(lines)


def _watch(watcher: RunWatcher, display: RunDisplay) -> None:
    # the bootstrap busy or gone: the next look, or the final table, tells
    with contextlib.suppress(ProtocolError):
        display.update(watcher.poll())


def finished(config: RunConfig, out: Path, seen: Mapping[int, PeerRow]) -> Snapshot:
    """The last frame: each peer's own summary.json where it wrote one (its final round,
    accuracy and bytes, exact), what was last seen of the others. Polling may have missed the
    last rounds of a fast run, and a peer that finished and left no longer answers."""
    rows = dict(seen)
    for i in range(config.nodes):
        path = out / f"node-{i}" / "summary.json"
        if path.exists():
            s = json.loads(path.read_text())
            rows[i] = PeerRow(node=i, round=s["round"], loss=s["loss"], accuracy=s["accuracy"],
                              evaluated=s["round"], sent=s["bytes_sent"],
                              received=s["bytes_received"],
                              state=state_label(s["state"], resumed=s.get("resumes", 0) > 0))
    return Snapshot(rows=tuple(rows[i] for i in sorted(rows)), rounds=config.rounds,
                    nodes=config.nodes)


def metrics_flags(port: int, offset: int) -> list[str]:
    """--metrics-port of the demo's process number `offset` (0: the bootstrap, 1+I: peer I):
    `port` + offset, or no flag when the demo runs without metrics (port 0)."""
    if port < 0:
        raise ConfigError(f"--metrics-port must be 0 (no metrics) or a port; got {port}")
    if not port:
        return []
    if port + offset > 65535:
        raise ConfigError(f"--metrics-port {port}: the demo needs ports {port} to "
                          f"{port + offset} (the bootstrap's, then one per peer), above 65535")
    return ["--metrics-port", str(port + offset)]


def run_demo(config: RunConfig, out: Path | None, *, timeout: float = 60.0,
             insecure: bool = False, quiet: bool = False, metrics_port: int = 0) -> int:
    """The demo; mutual TLS with a throw-away CA in OUT/certs unless `insecure`. With
    `metrics_port`, the bootstrap serves Prometheus metrics on 127.0.0.1:metrics_port and
    peer I on 127.0.0.1:metrics_port+1+I."""
    metrics_flags(metrics_port, config.nodes)  # all the ports fit, before anything starts
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = out or Path("runs") / f"{stamp}-demo"
    out.mkdir(parents=True, exist_ok=True)
    certs = None if insecure else make_run_certificates(out / "certs", config.nodes)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen[str]] = []
    logs: list[IO[str]] = []
    started = time.perf_counter()
    signals = _StopSignals()
    display = RunDisplay(quiet=quiet, title=f"demo: {config.nodes} peers, {config.algorithm}, "
                         f"{config.topology}, {config.dataset}/{config.partition}")
    try:
        boot_log = open(out / "bootstrap.log", "w")  # noqa: SIM115 (closed in finally)
        logs.append(boot_log)
        with signals.deferred():
            boot = subprocess.Popen(
                command("--log-level", "INFO", "bootstrap", *run_flags(config), "--bind",
                         "127.0.0.1:0", "--state", str(out / "bootstrap.sqlite"),
                         *tls_flags(certs, "bootstrap"), *metrics_flags(metrics_port, 0)),
                stdout=subprocess.PIPE, stderr=boot_log, text=True, env=env)
            procs.append(boot)
        address = read_bootstrap_address(boot, timeout=60.0)
        with display:
            for i in range(config.nodes):
                log = open(out / f"node-{i}.log", "w")  # noqa: SIM115 (closed in finally)
                logs.append(log)
                args = ["--log-level", "INFO", "peer", "--id", str(i), "--bootstrap", address,
                        "--bind", "127.0.0.1:0", "--out", str(out / f"node-{i}"), "--device",
                        config.device, "--timeout", str(timeout), *tls_flags(certs, f"node-{i}"),
                        *metrics_flags(metrics_port, 1 + i)]
                if config.data_dir:
                    args += ["--data-dir", config.data_dir]
                with signals.deferred():
                    procs.append(subprocess.Popen(command(*args), stdout=log,
                                                  stderr=subprocess.STDOUT, text=True, env=env))
            display.note(f"bootstrap on {address}; started {config.nodes} peers "
                         f"({config.algorithm}, {config.topology}, "
                         f"{config.dataset}/{config.partition}); run directory {out}")
            if metrics_port:
                display.note(f"Prometheus metrics: http://127.0.0.1:{metrics_port}/metrics "
                             f"(bootstrap), ports {metrics_port + 1}.."
                             f"{metrics_port + config.nodes} (peers 0..{config.nodes - 1})")
            watcher = RunWatcher(address, security=client_security(certs),
                                 server_name=BOOTSTRAP_SERVER_NAME)
            try:
                peers = procs[1:]
                last = 0.0
                while any(p.poll() is None for p in peers):
                    if any(p.returncode not in (None, 0) for p in peers):
                        break
                    if time.perf_counter() - last >= POLL_SECONDS:
                        _watch(watcher, display)
                        last = time.perf_counter()
                    time.sleep(0.2)
                with contextlib.suppress(ProtocolError):
                    watcher.poll()  # what the bootstrap says last (expired, returned)
                display.update(finished(config, out, watcher.rows))
            finally:
                watcher.close()
        listed = ({p.node_id: p for p in watcher.last.peers}
                  if isinstance(watcher.last, bootstrap_pb2.ListPeersResponse) else {})
        failed = [i for i, p in enumerate(peers) if p.returncode != 0]
        if failed:
            _stop(procs)
            for i in failed:
                tail = (out / f"node-{i}.log").read_text().splitlines()[-5:]
                print(f"peer {i} failed (exit {peers[i].returncode}):", *tail, sep="\n  ",
                      file=sys.stderr)
            return 1
        print(final_table(config, out, listed), flush=True)
        print(f"{config.rounds} rounds in {time.perf_counter() - started:.1f} s", flush=True)
        plotted = plot_runs([out], out / "plots")
        print(f"plots: {', '.join(str(p) for p in plotted)}", flush=True)
        return 0
    except KeyboardInterrupt:
        print("interrupted: stopping the bootstrap and the peers", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated: stopping the bootstrap and the peers", file=sys.stderr)
        return 143
    finally:
        signals.stopping = True  # a second Ctrl-C must not cut the stopping short
        _stop(procs)
        for handle in logs:
            handle.close()
        signals.restore()

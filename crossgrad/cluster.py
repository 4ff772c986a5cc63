"""A bootstrap and N peers as processes on this machine, each a real `crossgrad` CLI process.

The demo's layout (OUT/bootstrap.log, OUT/bootstrap.sqlite, OUT/node-I.log, OUT/node-I/), with
the handles a fault-injection driver needs: kill or stop any process with any signal, restart
the bootstrap on the same port with the same state, restart a peer with --resume, ask the
bootstrap and any peer for their status.

    with LocalCluster(config, out, peer_args=["--timeout", "5"]) as cluster:
        cluster.start_bootstrap(lease_seconds=5)
        cluster.start_peers()
        cluster.wait_round(2, 55)
        cluster.signal(2, signal.SIGKILL)
        ...

Every process is started in its own session (process group), and close() ends every group on
any way out (SIGTERM, then SIGKILL after a grace period). The signal dispositions they need
(SIGTERM and SIGINT drain) the `crossgrad` processes install themselves, whatever they
inherited. `prefix` runs a peer's command under another
(e.g. `ip netns exec NS`) to put it in a network namespace; `hosts` gives each peer its own
bind address there, and `bootstrap_host`/`bootstrap_prefix` do the same for the bootstrap.
Processes in other namespaces cannot be reached from this one, so `recorded_round` and
`wait_recorded` follow a peer through its metrics.jsonl instead of GetStatus. With `certs`
(crossgrad/certs.py) every process runs with mutual TLS and its own certificate; without, every
process is started with --insecure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any, TypeVar

import grpc

from crossgrad.certs import Made
from crossgrad.config import RunConfig
from crossgrad.rpc import make_channel
from crossgrad.security import (
    BOOTSTRAP_SERVER_NAME,
    Role,
    Security,
    SecurityFlags,
    load_security,
    node_server_name,
)
from crossgrad.v1 import bootstrap_pb2, bootstrap_pb2_grpc, peer_pb2, peer_pb2_grpc

SERVING = re.compile(r"bootstrap serving on (\S+)")
PEER_SERVING = re.compile(r"serving at (\S+);")


def run_flags(config: RunConfig) -> list[str]:
    """The run's settings as command-line flags (every one visible, as in the compose file)."""
    flags: list[str] = []
    for key, value in asdict(config).items():
        if key in ("data_dir", "device") or value is None:
            continue
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def tls_flags(certs: Made | None, name: str, *, token: bool = False) -> list[str]:
    """The security flags of process `name` ("bootstrap", "node-3", "client"): its certificate
    from `certs` (crossgrad certs), or --insecure when there are none. With `token`, callers
    authenticate with the run's token instead of certificates (TLS, --client-auth token)."""
    if certs is None:
        return ["--insecure"]
    flags = ["--tls-ca", str(certs.ca), "--tls-cert", str(certs.cert(name)),
             "--tls-key", str(certs.key(name))]
    if token:
        flags += ["--client-auth", "token", "--token-file", str(certs.token)]
    return flags


def client_security(certs: Made | None, *, token: bool = False) -> Security:
    """What this process presents to the cluster's servers: the client certificate (or, with
    `token`, the token), or plaintext when there are no certificates."""
    if certs is None:
        return Security.plaintext()
    flags = (SecurityFlags(ca=str(certs.ca), token_file=str(certs.token)) if token else
             SecurityFlags(ca=str(certs.ca), cert=str(certs.cert("client")),
                           key=str(certs.key("client"))))
    return load_security(flags, Role.CLIENT, command="cluster", environ={})


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "crossgrad", *args]


def read_bootstrap_address(proc: subprocess.Popen[str], timeout: float) -> str:
    """The address a starting `crossgrad bootstrap` prints on its stdout ("bootstrap serving on
    HOST:PORT"); RuntimeError when it exits or says nothing of the kind within `timeout` s."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        match = SERVING.search(line)
        if match:
            return match.group(1)
    raise RuntimeError(f"the bootstrap did not start (exit code {proc.poll()}); see its log")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for a server that must come back on the same one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalCluster:
    """A bootstrap and config.nodes peers as processes (see the module docstring)."""

    def __init__(self, config: RunConfig, out: Path, *, peer_args: Sequence[str] = (),
                 host: str = "127.0.0.1", prefix: Callable[[int], list[str]] | None = None,
                 log_level: str = "INFO", hosts: Callable[[int], str] | None = None,
                 bootstrap_host: str | None = None,
                 bootstrap_prefix: Callable[[], list[str]] | None = None,
                 certs: Made | None = None, token: bool = False) -> None:
        self.config = config
        self.certs = certs  # None: every process runs --insecure
        self.token = token  # with certs: TLS, callers authenticated by the token
        self.security = client_security(certs, token=token)  # what list_peers and status use
        self.out = out
        self.peer_args = list(peer_args)
        self.host = host
        self.prefix = prefix or (lambda node: [])
        self.hosts = hosts or (lambda node: host)  # where peer `node` binds
        self.bootstrap_host = bootstrap_host or host
        self.bootstrap_prefix = bootstrap_prefix or (lambda: [])
        self.log_level = log_level
        self.bootstrap: subprocess.Popen[str] | None = None
        self.bootstrap_address = ""
        self.peers: dict[int, subprocess.Popen[str]] = {}
        self._logs: list[IO[str]] = []
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        out.mkdir(parents=True, exist_ok=True)

    # ---- processes -----------------------------------------------------------------------
    def _spawn(self, args: list[str], log: IO[str], stdout: Any = None) -> subprocess.Popen[str]:
        return subprocess.Popen(args, stdout=stdout if stdout is not None else log,
                                stderr=log if stdout is not None else subprocess.STDOUT,
                                text=True, env=self._env, start_new_session=True)

    def start_bootstrap(self, *, port: int = 0, lease_seconds: float = 15.0,
                        timeout: float = 60.0) -> str:
        """Start (or restart, on the same port and state file) the bootstrap; its address."""
        if port == 0 and self.bootstrap_address:
            port = int(self.bootstrap_address.rpartition(":")[2])
        log = open(self.out / "bootstrap.log", "a")  # noqa: SIM115 (closed in close())
        self._logs.append(log)
        self.bootstrap = self._spawn([*self.bootstrap_prefix(), *command(
            "--log-level", self.log_level, "bootstrap", *run_flags(self.config),
            "--bind", f"{self.bootstrap_host}:{port}",
            "--state", str(self.out / "bootstrap.sqlite"),
            "--lease-seconds", str(lease_seconds),
            *tls_flags(self.certs, "bootstrap", token=self.token))], log, stdout=subprocess.PIPE)
        self.bootstrap_address = read_bootstrap_address(self.bootstrap, timeout)
        return self.bootstrap_address

    def peer_dir(self, node: int) -> Path:
        return self.out / f"node-{node}"

    def start_peer(self, node: int, *, resume: bool = False,
                   extra: Sequence[str] = ()) -> subprocess.Popen[str]:
        """Start peer `node` (again: its log is appended to; --resume when asked)."""
        log = open(self.out / f"node-{node}.log", "a")  # noqa: SIM115 (closed in close())
        self._logs.append(log)
        args = [*self.prefix(node), *command(
            "--log-level", self.log_level, "peer", "--id", str(node), "--bootstrap",
            self.bootstrap_address, "--bind", f"{self.hosts(node)}:0", "--out",
            str(self.peer_dir(node)), "--device", self.config.device,
            *tls_flags(self.certs, f"node-{node}", token=self.token), *self.peer_args, *extra)]
        if self.config.data_dir:
            args += ["--data-dir", self.config.data_dir]
        if resume:
            args.append("--resume")
        self.peers[node] = self._spawn(args, log)
        return self.peers[node]

    def start_peers(self) -> None:
        for i in range(self.config.nodes):
            self.start_peer(i)

    def signal(self, target: int | str, sig: int) -> None:
        """Send `sig` to peer `target` or to "bootstrap" (its whole process group)."""
        proc = self.bootstrap if target == "bootstrap" else self.peers[int(target)]
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, sig)

    def wait_peers(self, timeout: float, nodes: Sequence[int] | None = None) -> dict[int, int]:
        """Wait for the peers (all, or `nodes`) to exit; their exit codes. TimeoutError if any
        is still running after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        codes = {}
        for i in sorted(self.peers if nodes is None else nodes):
            try:
                codes[i] = self.peers[i].wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"peer {i} still running after {timeout:.0f} s; see "
                                   f"{self.out / f'node-{i}.log'}") from None
        return codes

    def close(self, grace: float = 10.0) -> None:
        """End every process group (SIGTERM, then SIGKILL after `grace`), on any way out."""
        procs = [p for p in (*self.peers.values(), self.bootstrap) if p is not None]
        for p in procs:
            _killpg(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            _killpg(p, signal.SIGKILL)  # also members left behind by a leader that exited
            p.wait()
            if p.stdout is not None:
                p.stdout.close()
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- what they say -------------------------------------------------------------------
    def peer_address(self, node: int) -> str | None:
        """The address the peer's latest process logged (None before it serves)."""
        found = PEER_SERVING.findall((self.out / f"node-{node}.log").read_text())
        return found[-1] if found else None

    def list_peers(self, timeout: float = 5.0) -> bootstrap_pb2.ListPeersResponse:
        with make_channel(self.bootstrap_address, security=self.security,
                          server_name=BOOTSTRAP_SERVER_NAME) as channel:
            return bootstrap_pb2_grpc.BootstrapStub(channel).ListPeers(
                bootstrap_pb2.ListPeersRequest(), timeout=timeout)

    def status(self, node: int, timeout: float = 5.0) -> peer_pb2.PeerStatus | None:
        """GetStatus of a peer (None when it does not answer)."""
        address = self.peer_address(node)
        if address is None:
            return None
        try:
            with make_channel(address, security=self.security,
                              server_name=node_server_name(node)) as channel:
                return peer_pb2_grpc.PeerStub(channel).GetStatus(
                    peer_pb2.GetStatusRequest(requester="cluster"), timeout=timeout)
        except grpc.RpcError:
            return None

    def wait_round(self, node: int, round_: int, timeout: float = 300.0) -> int:
        """Until peer `node` reports a round >= round_ (polled over GetStatus); that round."""
        def reached() -> int | None:
            proc = self.peers[node]
            if proc.poll() is not None:
                raise RuntimeError(f"peer {node} exited with {proc.returncode} before round "
                                   f"{round_}")
            status = self.status(node, timeout=2.0)
            return status.round if status is not None and status.round >= round_ else None

        return poll(reached, timeout, f"peer {node} reaching round {round_}")

    def wait_state(self, node: int, state: str, timeout: float = 60.0) -> None:
        """Until the bootstrap lists peer `node` in `state` (ACTIVE, EXPIRED, LEFT, ...)."""
        def listed() -> bool | None:
            peers = {p.node_id: p.state for p in self.list_peers().peers}
            return True if peers.get(node) == state else None

        poll(listed, timeout, f"the bootstrap listing peer {node} as {state}")


    def recorded_round(self, node: int) -> int:
        """The round peer `node` is at by its metrics.jsonl: one past the last round it
        recorded (GetStatus's round), 0 before its first."""
        path = self.peer_dir(node) / "metrics.jsonl"
        if not path.exists():
            return 0
        last = 0
        for line in path.read_text().splitlines():
            if '"kind": "round"' not in line:
                continue
            try:
                last = max(last, int(json.loads(line)["round"]) + 1)
            except (ValueError, KeyError):
                continue  # a line still being written
        return last

    def wait_recorded(self, node: int, round_: int, timeout: float = 300.0) -> None:
        """Until peer `node` has recorded round_ - 1 (recorded_round >= round_), read from its
        metrics.jsonl: for peers this process cannot reach (another network namespace)."""
        def recorded() -> bool | None:
            if self.recorded_round(node) >= round_:
                return True
            proc = self.peers[node]
            if proc.poll() is not None:
                raise RuntimeError(f"peer {node} exited with {proc.returncode} before round "
                                   f"{round_}; see {self.out / f'node-{node}.log'}")
            return None

        poll(recorded, timeout, f"peer {node} recording round {round_}")


T = TypeVar("T")


def poll(condition: Callable[[], T | None], timeout: float, what: str,
         interval: float = 0.05) -> T:
    """condition()'s first answer that is not None, asked every `interval` s (a remote state
    has no event to wait on); TimeoutError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        answer = condition()
        if answer is not None:
            return answer
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f} s")
        time.sleep(interval)


class RoundWatch:
    """When each peer's rounds first appeared in its metrics.jsonl, from a thread that reads the
    new lines every `every` seconds until stop().

    The wall-clock time from one round to the next includes what a round record's `seconds`
    leaves out (evaluations, checkpoints, catch-ups, taking a new assignment), so the longest
    gap says whether a node was ever stuck. Resolution: `every` plus the file system's."""

    def __init__(self, out: Path, nodes: Sequence[int], every: float = 0.05) -> None:
        self.out = out
        self.every = every
        self.seen: dict[int, dict[int, float]] = {n: {} for n in nodes}  # node -> round -> t
        self._offsets = dict.fromkeys(nodes, 0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="round-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.poll()

    def poll(self) -> None:
        """Read what each peer appended since the last poll (called by the thread)."""
        now = time.monotonic()
        for node, offset in self._offsets.items():
            path = self.out / f"node-{node}" / "metrics.jsonl"
            if not path.exists():
                continue
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits
            self._offsets[node] = offset + len(complete)
            for line in complete.decode().splitlines():
                record = json.loads(line)
                if record.get("kind") == "round":
                    with self._lock:
                        self.seen[node].setdefault(int(record["round"]), now)

    def times(self, node: int) -> dict[int, float]:
        """Round -> when its record was first seen (time.monotonic())."""
        with self._lock:
            return dict(self.seen[node])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()


def _killpg(proc: subprocess.Popen[str], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)

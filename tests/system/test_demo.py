"""`crossgrad demo` as a person runs it: `crossgrad status` shows a training peer's bytes per
link and per message kind; Ctrl-C stops the bootstrap and every peer, also when the demo was
started as a background job (SIGINT ignored), and so does SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from crossgrad.cluster import poll
from crossgrad.rpc import make_channel
from crossgrad.security import Role, SecurityFlags, load_security
from crossgrad.v1 import peer_pb2, peer_pb2_grpc

from procs import ProcessGroup, as_background_job, crossgrad


def children_of_run(run_dir: Path) -> list[str]:
    """Processes whose command line names this run's directory (the demo's children do)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(run_dir) in cmdline and " demo " not in cmdline:
            found.append(cmdline)
    return found


def demo_command(run_dir: Path) -> list[str]:
    """A demo with 2 peers (CGA) and far more rounds than any test lasts."""
    return crossgrad("demo", "--nodes", "2", "--partition", "iid", "--rounds", "100000",
                     "--out", str(run_dir))


@dataclass
class Demo:
    group: ProcessGroup
    proc: subprocess.Popen[str]
    run_dir: Path
    bootstrap: str  # the address the demo's first line names


@pytest.fixture(scope="module")
def training_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """`crossgrad demo` with 2 peers, once both peers train, started as `crossgrad demo &` is:
    with SIGINT ignored, so that Python installs no KeyboardInterrupt and the demo must handle
    Ctrl-C itself. The last test of this module stops it with Ctrl-C; whatever happens, its
    whole process group is stopped at the end."""
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    group = ProcessGroup()
    try:
        demo = group.start(as_background_job(demo_command(run_dir)))
        assert demo.stdout is not None
        first = demo.stdout.readline()
        assert first.startswith("bootstrap on "), first
        bootstrap = first.split()[2].rstrip(";")
        deadline = time.monotonic() + 180
        evaluated: set[str] = set()
        while time.monotonic() < deadline and len(evaluated) < 2:  # both peers trained a while
            line = demo.stdout.readline()  # plain lines: stdout is a pipe
            if not line:
                break
            assert "\x1b" not in line, line
            if match := re.match(r"node (\d+)  round \d+/100000 .* acc 0\.\d{4} ", line):
                evaluated.add(match.group(1))
        assert evaluated == {"0", "1"}, "the peers never got to their first evaluation"
        yield Demo(group, demo, run_dir, bootstrap)
    finally:
        group.stop_all()


def peer_address(run_dir: Path, node: int) -> str:
    match = re.search(r"serving at (\S+);", (run_dir / f"node-{node}.log").read_text())
    assert match, f"node {node} did not log its address"
    return match.group(1)


def test_status_shows_the_bytes_of_a_training_peer_per_link_and_kind(
        training_demo: Demo, procs: ProcessGroup) -> None:
    address = peer_address(training_demo.run_dir, 0)
    certs = training_demo.run_dir / "certs"  # the demo runs with mutual TLS, its own CA
    security = load_security(SecurityFlags(ca=str(certs / "ca.pem"),
                                           cert=str(certs / "client.pem"),
                                           key=str(certs / "client.key")),
                             Role.CLIENT, command="test", environ={})
    assert "mutual TLS" in (training_demo.run_dir / "node-0.log").read_text()
    with make_channel(address, security=security) as channel:  # the numbers of one GetStatus
        s = peer_pb2_grpc.PeerStub(channel).GetStatus(
            peer_pb2.GetStatusRequest(requester="test"), timeout=10)
    kinds = {k.kind: (k.sent_bytes, k.received_bytes) for k in s.kinds}
    assert list(kinds) == ["cross_gradient", "model"]
    assert min(kinds["model"]) > 0 and min(kinds["cross_gradient"]) > 0  # CGA, past round 1
    assert (s.bytes_sent, s.bytes_received) == (sum(p[0] for p in kinds.values()),
                                                sum(p[1] for p in kinds.values()))
    assert [link.peer_id for link in s.links] == [1]
    link = {k.kind: (k.sent_bytes, k.received_bytes) for k in s.links[0].kinds}
    assert link == kinds  # one neighbor: its link carried everything

    proc = procs.run(crossgrad("status", address, "--tls-ca", str(certs / "ca.pem"),
                               "--tls-cert", str(certs / "client.pem"),
                               "--tls-key", str(certs / "client.key")), timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:1] == ["neighbor"])
    assert lines[head].split() == ["neighbor", "weight", "sent", "MiB", "recv", "MiB", "model",
                                   "sent", "model", "recv", "xgrad", "sent", "xgrad", "recv"]
    rows = {line.split()[0]: [float(c) for c in line.split()[-6:]] for line in lines[head + 1:]}
    assert list(rows) == ["1", "all"], proc.stdout
    sent, received, model_sent, model_recv, xgrad_sent, xgrad_recv = rows["all"]
    assert model_recv > 0 and xgrad_recv > 0, proc.stdout
    assert sent == pytest.approx(model_sent + xgrad_sent, abs=0.015), proc.stdout
    assert received == pytest.approx(model_recv + xgrad_recv, abs=0.015), proc.stdout


def test_status_watch_shows_every_peer_of_the_run_until_ctrl_c(training_demo: Demo,
                                                                procs: ProcessGroup) -> None:
    """`crossgrad status --watch BOOTSTRAP` through a pipe: a plain line per peer (each peer's
    GetStatus, over mutual TLS), no escape codes; Ctrl-C ends the watch, not the run, and
    prints the bootstrap's table of the last look."""
    certs = training_demo.run_dir / "certs"
    watch = procs.start(crossgrad("status", training_demo.bootstrap, "--watch", "--interval",
                                  "0.2", "--tls-ca", str(certs / "ca.pem"), "--tls-cert",
                                  str(certs / "client.pem"), "--tls-key",
                                  str(certs / "client.key")))
    assert watch.stdout is not None
    seen: dict[str, str] = {}
    for line in watch.stdout:
        assert "\x1b" not in line, line
        if match := re.match(r"node (\d+)  round (\d+)/100000  loss \S+  acc \S+  sent "
                             r"\d+\.\d\d MiB  recv \d+\.\d\d MiB  (.+)$", line):
            seen[match.group(1)] = match.group(3)
        if len(seen) == 2:
            break
    assert set(seen) == {"0", "1"}
    assert all(state in ("training", "waiting on neighbor 0", "waiting on neighbor 1")
               for state in seen.values()), seen
    procs.signal(watch, signal.SIGINT)
    assert watch.wait(timeout=30) == 0
    rest = watch.stdout.read()
    assert "bootstrap: 2 of 2 peers" in rest, rest
    assert training_demo.proc.poll() is None  # the run goes on


def test_ctrl_c_stops_the_bootstrap_and_every_peer(training_demo: Demo) -> None:
    """Also when the demo was started with SIGINT ignored (a background job), as this one was."""
    demo, run_dir = training_demo.proc, training_demo.run_dir
    assert len(children_of_run(run_dir)) == 3  # bootstrap + 2 peers
    training_demo.group.signal(demo, signal.SIGINT)
    assert demo.wait(timeout=60) == 130
    assert demo.stderr is not None and "interrupted" in demo.stderr.read()
    assert children_of_run(run_dir) == []


@pytest.mark.slow  # a demo of its own: 5 s on an idle machine, 25 s on a busy one
@pytest.mark.parametrize(("background", "sig", "code", "said"), [
    (False, signal.SIGINT, 130, "interrupted"), (True, signal.SIGTERM, 143, "terminated")],
    ids=["foreground-ctrl-c", "background-sigterm"])
def test_the_demo_stops_everything_as_soon_as_its_children_run(
        procs: ProcessGroup, tmp_path: Path, background: bool, sig: signal.Signals, code: int,
        said: str) -> None:
    """Ctrl-C in a foreground demo and SIGTERM in a background one (SIGINT ignored) stop the
    bootstrap and the peers while the peers are still starting."""
    run_dir = tmp_path / "run"
    command = demo_command(run_dir)
    demo = procs.start(as_background_job(command) if background else command)
    assert demo.stdout is not None
    for line in demo.stdout:  # the demo says so once every child was started
        if line.startswith("bootstrap on "):
            break
    # every child was started; /proc may show the last one's command line a moment later
    poll(lambda: True if len(children_of_run(run_dir)) == 3 else None, 30,
         "the demo's bootstrap and 2 peers in /proc")
    procs.signal(demo, sig)
    assert demo.wait(timeout=60) == code
    assert demo.stderr is not None and said in demo.stderr.read()
    assert children_of_run(run_dir) == []


def test_sigterm_while_waiting_for_the_run_to_assemble_exits_cleanly(procs: ProcessGroup,
                                                                     tmp_path: Path) -> None:
    """A peer whose partners never come stops at once on SIGTERM, exit code 0."""
    boot = procs.start(crossgrad("bootstrap", "--nodes", "2", "--partition", "iid", "--bind",
                                 "127.0.0.1:0", "--insecure"), stderr=subprocess.DEVNULL)
    assert boot.stdout is not None
    address = boot.stdout.readline().split("serving on ")[1].split()[0]
    peer = procs.start(crossgrad("--log-level", "INFO", "peer", "--id", "0", "--bootstrap",
                                 address, "--bind", "127.0.0.1:0", "--out", str(tmp_path / "p0"),
                                 "--insecure"),
                       stderr=subprocess.STDOUT)
    assert peer.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the second Join (with the sample count) is logged
        line = peer.stdout.readline()
        if not line or "waiting for the assignment" in line:
            break
    procs.signal(peer, signal.SIGTERM)
    assert peer.wait(timeout=30) == 0
    assert "stopped before the run assembled" in peer.stdout.read()

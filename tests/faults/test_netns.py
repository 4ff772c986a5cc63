"""The namespace helper (tests/faults/netns.py) on its own: TCP across the bridge, a cut and a
restore, a rate limit, and removal. Plain sockets in small Python processes, no crossgrad."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from netns import Namespaces, listed, run, unavailable

from crossgrad.cluster import poll

WHY = unavailable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=WHY or "")

# A TCP server: prints its port, then reads each connection to its end and answers how many
# bytes came. Killed (its process group) by the test.
SERVER = """
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(8)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    n = 0
    while b := c.recv(1 << 16):
        n += len(b)
    c.sendall(str(n).encode()); c.close()
"""
# Connect (at most argv[3] s), send argv[4] bytes, print the answer; exit 1 if that failed.
CLIENT = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    c.settimeout(30); c.sendall(bytes(int(sys.argv[4]))); c.shutdown(socket.SHUT_WR)
    print(c.recv(64).decode())
except OSError as exc:
    print(exc); sys.exit(1)
"""


@pytest.fixture
def net() -> Iterator[Namespaces]:
    with Namespaces(nodes=2) as made:
        yield made


@contextlib.contextmanager
def serving(net: Namespaces, node: int) -> Iterator[str]:
    """host:port of SERVER in peer `node`'s namespace, killed on the way out."""
    proc = subprocess.Popen([*net.prefix(node), sys.executable, "-c", SERVER, net.host(node)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        yield f"{net.host(node)}:{int(proc.stdout.readline())}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]


@pytest.fixture
def server(net: Namespaces) -> Iterator[str]:
    with serving(net, 1) as address:
        yield address


def send(net: Namespaces, address: str, size: int = 10, connect_timeout: float = 1.0,
         source: int = 0) -> tuple[bool, str, float]:
    """From peer `source`'s namespace: (whether it worked, what the client printed, seconds)."""
    host, port = address.split(":")
    started = time.perf_counter()
    done = subprocess.run([*net.prefix(source), sys.executable, "-c", CLIENT, host, port,
                           str(connect_timeout), str(size)],
                          capture_output=True, text=True, timeout=60)
    return done.returncode == 0, done.stdout.strip(), time.perf_counter() - started


def test_peers_reach_each_other_across_the_bridge_and_a_cut_link_is_silent_until_restored(
        net: Namespaces, server: str) -> None:
    ok, said, _ = send(net, server)
    assert ok and said == "10", said
    net.cut(1)
    ok, said, _ = send(net, server, connect_timeout=1.0)
    assert not ok and "timed out" in said, said  # silent: no refusal, no ICMP came back
    net.restore(1)
    ok, said, _ = send(net, server)
    assert ok and said == "10", said


def test_a_rate_limited_link_carries_about_its_rate_in_both_directions(
        net: Namespaces, server: str) -> None:
    net.rate_limit(1, "1mbit")
    assert all("tbf" in line and "1Mbit" in line for line in net.qdiscs(1)), net.qdiscs(1)
    size = 125_000  # 1 Mbit: one second at the limit
    ok, said, seconds = send(net, server, size)  # peer 1's download
    assert ok and said == str(size), said
    assert 0.8 < seconds < 10, seconds
    with serving(net, 0) as upstream:
        ok, said, up = send(net, upstream, size, source=1)  # peer 1's upload
        assert ok and said == str(size), said
        assert 0.8 < up < 10, up
        net.unlimit(1)
        ok, said, fast = send(net, upstream, size, source=1)
    assert ok and fast < min(seconds, up) / 2, (fast, seconds, up)


def test_remove_kills_what_runs_inside_and_deletes_every_namespace() -> None:
    net = Namespaces(nodes=1).create()
    names = list(net.created)
    assert set(names) <= set(listed())
    proc = subprocess.Popen([*net.prefix(0), "sleep", "600"], start_new_session=True)
    try:
        poll(lambda: True if str(proc.pid) in run("ip", "netns", "pids", net.peer(0)).stdout
             .split() else None, 10, "the process entering the namespace", interval=0.01)
        net.remove()
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert not set(names) & set(listed())
        net.remove()  # twice is fine
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

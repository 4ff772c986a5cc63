"""Network namespaces for link-fault tests: a private switch, one namespace per process.

    with Namespaces(nodes=5) as net:
        cluster = LocalCluster(config, out, host=net.host, prefix=net.prefix,
                               bootstrap_host=net.boot_host, bootstrap_prefix=net.boot_prefix)
        ...
        net.cut(2)                  # peer 2's link goes down (its switch port)
        net.restore(2)
        net.rate_limit(2, "1mbit")  # tbf on both ends of peer 2's link

The layout (every name carries the creating process's id and a counter, so parallel runs never
collide; the addresses repeat across runs, but each run has its own bridge):

    TAG-hub     a Linux bridge `br0`; port0 (the bootstrap) and port1.. (peers 0..) attached
    TAG-boot    the bootstrap: eth0 = SUBNET.1/24
    TAG-pI      peer I: eth0 = SUBNET.(10+I)/24

Each member is joined to the bridge by a veth pair: `eth0` in the member's namespace, `portK`
in the hub's. `lo` is up everywhere. Nothing touches the host's own interfaces, routes or
namespaces, and traffic only ever flows between the namespaces created here.

A cut takes the switch end of the peer's link down (`ip link set portK down`): the peer's
eth0 loses carrier, and both the peer and everyone else see a silent link (packets dropped, no
reset, no ICMP), like an unplugged cable or a dead switch port. TCP connections stay open and
resume when the link is restored. `rate_limit` puts a tbf qdisc on both ends (the peer's
upload is shaped on eth0, its download on portK), like a host on a slow full-duplex port.

remove() kills whatever still runs inside the namespaces (only our children can be there) and
deletes them; it runs on leaving the `with` block, on garbage collection and at interpreter exit
(weakref.finalize). Namespaces left behind by a run that was SIGKILLed (their creator's pid is
gone) are removed by the next create().
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import weakref

SUBNET = "10.213.0"  # a private /24 (RFC 1918); only ever used inside our namespaces
PREFIX = "cgt"  # "crossgrad test": TAG = cgt<pid>x<counter>
_TAG = re.compile(rf"^{PREFIX}(\d+)x\d+-")
_COUNTER = itertools.count()


class NetnsError(RuntimeError):
    """An `ip` or `tc` command failed (the message shows the command and its stderr)."""


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise NetnsError(f"`{shlex.join(cmd)}` failed ({done.returncode}): "
                         f"{done.stderr.strip()}")
    return done


def unavailable() -> str | None:
    """Why namespaces cannot be created here (None when they can): for pytest.skip."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run the tests as root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}x{next(_COUNTER)}-probe"
    done = run("ip", "netns", "add", probe, check=False)
    if done.returncode != 0:
        return f"`ip netns add` does not work here: {done.stderr.strip()}"
    run("ip", "netns", "del", probe, check=False)
    return None


def listed() -> list[str]:
    """The namespaces `ip netns list` shows (names only)."""
    return [line.split()[0] for line in run("ip", "netns", "list").stdout.splitlines()
            if line.strip()]


def _remove(names: list[str]) -> None:
    """Kill what runs inside `names`, then delete them (best effort, never raises)."""
    for ns in reversed(names):
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            for pid in run("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
                    os.kill(int(pid), signal.SIGKILL)
            run("ip", "netns", "del", ns, check=False)
    names.clear()


def remove_stale() -> list[str]:
    """Remove namespaces of this layout whose creating process is gone; their names."""
    stale = []
    for ns in listed():
        match = _TAG.match(ns)
        if match is None:
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            stale.append(ns)
        except PermissionError:
            continue  # alive, someone else's
    _remove(list(stale))
    return stale


class Namespaces:
    """The bootstrap and `nodes` peers, each in its own namespace on one bridge (module doc)."""

    def __init__(self, nodes: int, *, subnet: str = SUBNET) -> None:
        if not 1 <= nodes <= 200:
            raise ValueError(f"nodes must be in 1..200 (addresses .10 to .209); got {nodes}")
        self.nodes = nodes
        self.subnet = subnet
        self.tag = f"{PREFIX}{os.getpid()}x{next(_COUNTER)}"
        self.created: list[str] = []
        self._finalizer = weakref.finalize(self, _remove, self.created)

    # ---- names and addresses -------------------------------------------------------------
    @property
    def hub(self) -> str:
        return f"{self.tag}-hub"

    @property
    def boot(self) -> str:
        return f"{self.tag}-boot"

    def peer(self, node: int) -> str:
        return f"{self.tag}-p{node}"

    def members(self) -> list[str]:
        """Bridge port K is members()[K]: the bootstrap, then peers 0.."""
        return [self.boot, *(self.peer(i) for i in range(self.nodes))]

    def host(self, node: int) -> str:
        """Peer `node`'s address."""
        return f"{self.subnet}.{10 + node}"

    @property
    def boot_host(self) -> str:
        return f"{self.subnet}.1"

    def prefix(self, node: int) -> list[str]:
        """The command prefix that runs a process in peer `node`'s namespace."""
        return ["ip", "netns", "exec", self.peer(node)]

    def boot_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.boot]

    def port(self, node: int) -> str:
        """The switch end of peer `node`'s link (in the hub namespace)."""
        return f"port{1 + node}"

    # ---- life --------------------------------------------------------------------------
    def create(self) -> Namespaces:
        """Create everything (module docstring); on a failure, remove what was made, raise."""
        remove_stale()
        try:
            for ns in (self.hub, *self.members()):
                run("ip", "netns", "add", ns)
                self.created.append(ns)
                run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
            run("ip", "-n", self.hub, "link", "set", "br0", "up")
            for k, ns in enumerate(self.members()):
                port = f"port{k}"
                address = self.boot_host if k == 0 else self.host(k - 1)
                run("ip", "-n", self.hub, "link", "add", port, "type", "veth",
                    "peer", "name", "eth0", "netns", ns)
                run("ip", "-n", self.hub, "link", "set", port, "master", "br0", "up")
                run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
                run("ip", "-n", ns, "link", "set", "eth0", "up")
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Kill every process left in our namespaces and delete them (idempotent)."""
        _remove(self.created)

    def __enter__(self) -> Namespaces:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ---- faults ------------------------------------------------------------------------
    def cut(self, node: int) -> None:
        """Take peer `node`'s link down at the switch: silent for both sides until restore()."""
        run("ip", "-n", self.hub, "link", "set", self.port(node), "down")

    def restore(self, node: int) -> None:
        run("ip", "-n", self.hub, "link", "set", self.port(node), "up")

    def rate_limit(self, node: int, rate: str, *, burst: str = "32kbit",
                   latency: str = "400ms") -> None:
        """tbf at `rate` (tc syntax: "1mbit", "500kbit") on both ends of peer `node`'s link.

        `latency` bounds the queue (packets that would wait longer are dropped); it adds no
        delay of its own. The defaults keep a few tens of kB queued at 1 Mbit/s, enough that
        TCP does not see drops from the shaper alone."""
        for ns, dev in ((self.peer(node), "eth0"), (self.hub, self.port(node))):
            run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                "burst", burst, "latency", latency)

    def unlimit(self, node: int) -> None:
        for ns, dev in ((self.peer(node), "eth0"), (self.hub, self.port(node))):
            run("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)

    def qdiscs(self, node: int) -> list[str]:
        """What `tc qdisc show` says of both ends of peer `node`'s link (first lines)."""
        return [run("tc", "-n", ns, "qdisc", "show", "dev", dev).stdout.strip().splitlines()[0]
                for ns, dev in ((self.peer(node), "eth0"), (self.hub, self.port(node)))]

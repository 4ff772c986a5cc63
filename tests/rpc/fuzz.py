"""The fuzz driver: malformed requests (malformed.py) to every method of a live peer and a live
bootstrap, each answer checked (issue #9). A test runs it (test_fuzz_rpc.py) and so can a person:

    python tests/rpc/fuzz.py --peer HOST:PORT --bootstrap HOST:PORT --count 10000 --insecure
    python tests/rpc/fuzz.py --peer HOST:PORT --tls-ca ca.pem --tls-cert node-3.pem \\
        --tls-key node-3.key --peer-server-name node-0.crossgrad

Every request goes out as raw bytes through a generic channel (`unary_unary` / `unary_stream`
with no serializer), so bytes no client library would write reach the server as they are. Each
answer must be:

  documented  a status code its method documents (malformed.METHODS: peer.proto, bootstrap.proto,
              the servicers); INTERNAL, UNKNOWN, UNIMPLEMENTED and the rest are failures, as is
              DEADLINE_EXCEEDED from a method that never waits by design;
  in time     back within its deadline plus SLACK_S: a short deadline for the methods that wait
              by design (a future round, a watch), a long one for the rest;
  readable    every message of an OK answer parses as the method's response type.

How hypothesis draws the requests: `fuzz` wraps a function that hands one Probe to the senders
in hypothesis' own @given, with @seed(seed), max_examples=count, only the generate phase and no
example database, and calls it: hypothesis' engine then draws `count` probes from the
malformed.probes strategy, as in any property test, and the same seed draws the same probes
(with the same hypothesis version). Strategy.example() is meant for the interactive prompt (it
warns elsewhere and takes no seed), and a random.Random would bypass the strategies' edge-seeking,
so neither is used. Nothing is shrunk: a failure is reported with its
bytes (Probe), and the driver goes on, so one run counts every failure. The @given body only
hands its probe to WORKERS sender threads, so the probes that wait out their deadline overlap.

Before it starts, the driver asks the node and the bootstrap who they are (GetStatus,
ListPeers): its id, neighbors, round and the run's size and length are the values most worth
sending (malformed.Known). What it cannot see from outside (the node's model bit-identical, the
bootstrap's real peers as they were) the test checks; the program checks that both servers still
report SERVING.

Why here and not in bench/: it is a checker, not a measurement against a baseline, it needs
hypothesis (a test dependency), and its test uses the RPC harness beside it.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

if __name__ == "__main__":  # run as a program (this directory is on the path): the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from crossgrad.errors import ConfigError
from crossgrad.healthcheck import check
from crossgrad.rpc import make_channel
from crossgrad.security import Role, add_security_flags, security_from_args
from crossgrad.v1 import bootstrap_pb2, peer_pb2

from malformed import BOOTSTRAP, METHODS, PEER, U32_EDGES, Known, Probe, probes

WORKERS = 6  # calls in flight (see fuzz())
WAIT_DEADLINE_S = 0.25  # the methods that wait by design: a round not yet published, a watch
DEADLINE_S = 5.0  # the others answer at once; missing this is a hang
SLACK_S = 2.0  # an answer later than its deadline by more than this is a hang of the client
KEPT_FAILURES = 50  # failures kept with their bytes (all are counted)


@dataclass(frozen=True)
class Answer:
    probe: Probe
    code: grpc.StatusCode
    details: str
    seconds: float
    problem: str  # "" when the answer is one the method documents, in time and readable


@dataclass
class Report:
    """What a fuzz run sent and got: counts by method and code, by kind, the failures."""

    sent: int = 0
    seconds: float = 0.0
    slowest_s: float = 0.0
    codes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (method, code name)
    kinds: Counter[str] = field(default_factory=Counter)
    failed: int = 0
    failures: list[Answer] = field(default_factory=list)  # the first KEPT_FAILURES

    def add(self, answer: Answer) -> None:
        self.sent += 1
        self.slowest_s = max(self.slowest_s, answer.seconds)
        self.codes[answer.probe.method.name, answer.code.name] += 1
        self.kinds[answer.probe.kind] += 1
        if answer.problem:
            self.failed += 1
            if len(self.failures) < KEPT_FAILURES:
                self.failures.append(answer)

    def table(self) -> str:
        """Counts per method (rows) and status code (columns), then the totals."""
        names = sorted({code for _, code in self.codes})
        methods = [m.name for m in METHODS if any(k[0] == m.name for k in self.codes)]
        width = max(len(n) for n in names)
        lines = [f"{'method':<22}" + "".join(f"{n:>{width + 1}}" for n in names)]
        for method in methods:
            lines.append(f"{method:<22}" + "".join(f"{self.codes[method, n]:>{width + 1}}"
                                                    for n in names))
        lines.append(f"{self.sent} requests in {self.seconds:.1f} s "
                     f"({self.sent / max(self.seconds, 1e-9):.0f}/s), slowest answer "
                     f"{self.slowest_s:.2f} s; kinds: "
                     + ", ".join(f"{k} {n}" for k, n in sorted(self.kinds.items())))
        lines.append(f"{self.failed} failures")
        lines += [f"  {a.probe}: {a.problem}" for a in self.failures]
        return "\n".join(lines)


def learn(channels: Mapping[str, grpc.Channel], timeout: float = DEADLINE_S) -> Known:
    """The values most worth sending to this node and this bootstrap (valid calls)."""
    ids: set[int] = {0, 1}
    rounds: set[int] = {0, 1, 2}
    if PEER in channels:
        status = peer_pb2.PeerStatus.FromString(channels[PEER].unary_unary(
            f"/{PEER}/GetStatus")(peer_pb2.GetStatusRequest(requester="fuzz")
                                  .SerializeToString(), timeout=timeout))
        ids |= {status.node_id, *status.neighbor_ids}
        last = status.total_rounds
        rounds |= {status.round, status.round + 1, status.round + 2, last - 1, last, last + 1}
    if BOOTSTRAP in channels:
        listed = bootstrap_pb2.ListPeersResponse.FromString(channels[BOOTSTRAP].unary_unary(
            f"/{BOOTSTRAP}/ListPeers")(b"", timeout=timeout))
        ids |= {p.node_id for p in listed.peers} | {listed.expected - 1, listed.expected,
                                                    listed.expected + 1}
    return Known(ids=tuple(sorted(i for i in ids if 0 <= i < 2**32 and i not in U32_EDGES)),
                 rounds=tuple(sorted(r for r in rounds if 0 <= r < 2**64)))


def send(channel: grpc.Channel, probe: Probe, deadline: float) -> Answer:
    """One probe, its answer judged."""
    method = probe.method
    started = time.monotonic()
    replies: list[bytes] = []
    try:
        if method.streams:
            for reply in channel.unary_stream(method.path)(probe.payload, timeout=deadline):
                replies.append(reply)
        else:
            replies.append(channel.unary_unary(method.path)(probe.payload, timeout=deadline))
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""
    seconds = time.monotonic() - started
    problem = ""
    if code not in method.answers or (code is grpc.StatusCode.DEADLINE_EXCEEDED
                                      and not method.waits):
        problem = f"{code.name} is not an answer {method.name} documents: {details[:300]}"
    elif seconds > deadline + SLACK_S:
        problem = f"answered after {seconds:.2f} s, deadline {deadline} s"
    else:
        for reply in replies:
            try:
                method.response.FromString(reply)
            except Exception as exc:  # protobuf's DecodeError and friends
                problem = f"a reply ({len(reply)} bytes) does not parse: {exc}"
                break
    return Answer(probe, code, details, seconds, problem)


def fuzz(channels: Mapping[str, grpc.Channel], count: int, seed_: int = 0, *,
         workers: int = WORKERS, wait_deadline: float = WAIT_DEADLINE_S,
         deadline: float = DEADLINE_S) -> Report:
    """`count` malformed requests, to every method of the services in `channels` (PEER,
    BOOTSTRAP: a channel to each), `workers` in flight; the Report once all are answered.

    WORKERS is kept small for the bootstrap, which serves nodes + 8 streams at once (above that
    UNAVAILABLE, documented; bootstrap/server.py): a WatchAssignment waits until its deadline,
    and its coroutine ends a moment after the caller saw the deadline pass, so `workers` watches
    may briefly count twice. With 6, a 4-node run's 12 are never all taken."""
    known = learn(channels)
    methods = [m for m in METHODS if m.service in channels]
    report = Report()
    lock = threading.Lock()
    slots = threading.BoundedSemaphore(workers)

    def job(probe: Probe) -> None:
        try:
            wait = wait_deadline if probe.method.waits else deadline
            try:
                answer = send(channels[probe.method.service], probe, wait)
            except Exception:  # a bug of the driver itself: reported with its probe, not lost
                answer = Answer(probe, grpc.StatusCode.UNKNOWN, "", 0.0,
                                f"the driver failed: {traceback.format_exc(limit=3)}")
            with lock:
                report.add(answer)
        finally:
            slots.release()

    started = time.monotonic()
    with ThreadPoolExecutor(workers, thread_name_prefix="fuzz") as pool:
        pending: list[Future[None]] = []

        def submit(probe: Probe) -> None:
            slots.acquire()  # at most `workers` probes drawn ahead of their answers
            pending.append(pool.submit(job, probe))

        each(probes(methods, known), count, seed_, submit)
        for done in pending:
            done.result()
    report.seconds = time.monotonic() - started
    return report


def each(strategy: st.SearchStrategy[Probe], count: int, seed_: int,
         visit: Callable[[Probe], None]) -> None:
    """visit() each of `count` probes of `strategy`, drawn by hypothesis' engine (the module
    docstring says how). Hypothesis may end a run a few examples short (it discards draws that
    overrun its buffer); a run with the next seed makes them up."""
    seen = 0
    for attempt in range(10):
        @seed(seed_ + attempt)
        @settings(max_examples=count - seen, database=None, deadline=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(strategy)
        def one(probe: Probe) -> None:
            nonlocal seen
            if seen < count:
                seen += 1
                visit(probe)

        one()
        if seen == count:
            return
    raise RuntimeError(f"hypothesis drew {seen} probes of the {count} asked for")


# ---- the command line ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/rpc/fuzz.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", help="HOST:PORT of a live peer (crossgrad.v1.Peer)")
    parser.add_argument("--bootstrap", help="HOST:PORT of a live bootstrap")
    parser.add_argument("--count", type=int, default=10_000, help="requests (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis' seed (default 0)")
    parser.add_argument("--workers", type=int, default=WORKERS,
                        help=f"requests in flight (default {WORKERS})")
    parser.add_argument("--peer-server-name", default=None,
                        help="the name on the peer's certificate (e.g. node-0.crossgrad)")
    parser.add_argument("--bootstrap-server-name", default=None,
                        help="the name on the bootstrap's certificate (bootstrap.crossgrad)")
    add_security_flags(parser, serves=False)
    args = parser.parse_args(argv)
    if not (args.peer or args.bootstrap):
        parser.error("give --peer, --bootstrap or both")
    try:
        security = security_from_args(args, Role.CLIENT, "fuzz")
    except ConfigError as exc:
        parser.error(str(exc))
    targets = {service: (address, name) for service, address, name in (
        (PEER, args.peer, args.peer_server_name),
        (BOOTSTRAP, args.bootstrap, args.bootstrap_server_name)) if address}
    channels = {service: make_channel(address, security=security, server_name=name)
                for service, (address, name) in targets.items()}
    try:
        report = fuzz(channels, args.count, args.seed, workers=args.workers)
    finally:
        for channel in channels.values():
            channel.close()
    print(report.table())
    down = [f"{service} at {address}: {why}" for service, (address, name) in targets.items()
            for serving, why in [check(address, service, DEADLINE_S, security=security,
                                       server_name=name)] if not serving]
    for line in down:
        print(f"not serving after the fuzz: {line}")
    return 1 if report.failed or down else 0


if __name__ == "__main__":
    sys.exit(main())

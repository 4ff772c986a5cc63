"""A peer's session with the bootstrap: join, the first assignment, heartbeats, new epochs, leave.

The round loop never talks to the bootstrap itself (docs/architecture.md, "Faults":
peers do not need it between epochs). This session does, from its own thread:

    join()              Join, retried with backoff and jitter while the bootstrap is down or the
                        id is still held by this node's previous life (its lease has not expired)
    wait_assignment()   the first assignment, from WatchAssignment (cancelled by stop())
    start(progress, on_assignment)
                        a daemon thread: a heartbeat every quarter lease with the node's round,
                        loss, the neighbors it missed and the epoch of the assignment it
                        holds, on one open Heartbeats stream (a unary Heartbeat each to a
                        bootstrap without it); an answer with a newer topology epoch carries
                        the assignment
                        (from a bootstrap that does not send it, GetAssignment fetches it),
                        which goes to on_assignment.
                        A failed heartbeat is retried with exponential backoff and full jitter,
                        so peers whose bootstrap restarts do not all call at once when it is
                        back; a bootstrap that no longer knows this node (NOT_FOUND: it lost
                        its state, or the node had left) gets a Join again.
    leave(reason)       Leave, best effort, at the end

Everything the bootstrap sends is validated (bootstrap/convert.py) before it reaches the node.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from bootstrap.convert import assignment_from_proto, settings_from_proto
from bootstrap.registry import AssignmentView
from crossgrad.config import RunConfig
from crossgrad.errors import AlreadyExists, ProtocolError, Unavailable
from crossgrad.rpc import from_rpc_error, make_channel
from crossgrad.security import BOOTSTRAP_SERVER_NAME, Security
from crossgrad.v1 import bootstrap_pb2, bootstrap_pb2_grpc

log = logging.getLogger(__name__)

# Heartbeats: every quarter lease, but at least every HEARTBEAT_MAX_S and at most every
# HEARTBEAT_MIN_S. Failed calls back off from BACKOFF_BASE_S doubling up to BACKOFF_CAP_S, each
# delay drawn uniformly in [0, that] ("full jitter").
HEARTBEAT_MIN_S = 0.2
HEARTBEAT_MAX_S = 5.0
BACKOFF_BASE_S = 0.25
BACKOFF_CAP_S = 5.0
CALL_TIMEOUT_S = 5.0


class Stopped(Exception):
    """The peer was asked to stop before it started training."""


def backoff_delays(base: float = BACKOFF_BASE_S, cap: float = BACKOFF_CAP_S,
                   rng: random.Random | None = None) -> Callable[[int], float]:
    """delay(attempt) for attempt = 0, 1, ...: uniform in [0, min(cap, base * 2**attempt)]."""
    draw = rng or random.Random()
    return lambda attempt: draw.uniform(0.0, min(cap, base * 2.0 ** min(attempt, 30)))


@dataclass(frozen=True)
class Progress:
    """What a heartbeat reports: the node's round and last loss, and the neighbors it missed
    since the previous heartbeat."""

    round: int
    loss: float
    health: str
    unreachable: tuple[int, ...] = ()


class BootstrapSession:
    """This node's conversation with the bootstrap at `address`."""

    def __init__(self, address: str, node_id: int, *, join_timeout: float = 300.0,
                 security: Security | None = None) -> None:
        self.address = address
        self.node_id = node_id
        self.join_timeout = join_timeout
        self.channel = make_channel(address, security=security,
                                    server_name=BOOTSTRAP_SERVER_NAME)
        self.stub = bootstrap_pb2_grpc.BootstrapStub(self.channel)
        self.epoch = 0  # the newest epoch handed to on_assignment (or wait_assignment's)
        self.lease_seconds = 15.0
        self.failures = 0  # heartbeats failed in a row
        self._join_request: bootstrap_pb2.JoinRequest | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # refresh_soon(): heartbeat before the next beat
        self._watch: grpc.Future | None = None
        self._thread: threading.Thread | None = None
        self._delay = backoff_delays()
        self._beats: HeartbeatStream | None = None  # open by the first heartbeat
        self._streams_served = True  # False once the bootstrap answered UNIMPLEMENTED

    # ---- start-up ------------------------------------------------------------------------
    def join(self, advertise: str, samples: int, *, resumed: bool = False,
             checkpoint_round: int = 0) -> RunConfig:
        """Join (again); the run's settings. Retries while the bootstrap is unreachable or the
        id is held by this node's previous process, up to join_timeout; Stopped on stop()."""
        request = bootstrap_pb2.JoinRequest(node_id=self.node_id, address=advertise,
                                            num_samples=samples, resumed=resumed,
                                            checkpoint_round=checkpoint_round)
        deadline = _Deadline(self.join_timeout)
        attempt = 0
        while True:
            try:
                reply = self.stub.Join(request, timeout=CALL_TIMEOUT_S)
                self._join_request = request
                return settings_from_proto(reply.settings)
            except grpc.RpcError as err:
                exc = from_rpc_error(err, f"Join at bootstrap {self.address}")
            if not isinstance(exc, AlreadyExists | Unavailable) or deadline.passed():
                raise exc
            wait = min(self._delay(attempt), deadline.left())
            log.warning("node %d: %s; trying again in %.1f s", self.node_id, exc, wait)
            attempt += 1
            if self._stop.wait(wait):
                raise Stopped("stopped while joining the bootstrap")

    def wait_assignment(self) -> AssignmentView:
        """The first assignment: once every expected peer has joined (at once when the run is
        already assembled). Stopped if stop() is called meanwhile."""
        request = bootstrap_pb2.GetAssignmentRequest(node_id=self.node_id)
        stream = self.stub.WatchAssignment(request, timeout=self.join_timeout)
        self._watch = stream  # stop() cancels it: SIGTERM while waiting for the other peers
        if self._stop.is_set():
            stream.cancel()
        try:
            view = assignment_from_proto(next(iter(stream)))
        except grpc.RpcError as err:
            if self._stop.is_set():
                raise Stopped("stopped while waiting for the run to assemble") from None
            raise from_rpc_error(err, f"WatchAssignment at bootstrap {self.address}") from None
        finally:
            stream.cancel()
            self._watch = None
        self.epoch = view.epoch
        return view

    # ---- the heartbeat thread ------------------------------------------------------------
    def start(self, progress: Callable[[], Progress],
              on_assignment: Callable[[AssignmentView], None]) -> None:
        """Heartbeat from a daemon thread until stop(); on_assignment(view) for each newer epoch."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._beat, args=(progress, on_assignment),
                                        name=f"bootstrap-session-{self.node_id}", daemon=True)
        self._thread.start()

    def refresh_soon(self) -> None:
        """Heartbeat now instead of at the next beat (at most every HEARTBEAT_MIN_S): this
        node's assignment may be stale. A neighbor refused it as not a neighbor, or a node it
        does not know as a neighbor asked it for a model: one of the two has not heard of the
        newest epoch yet, and a quarter lease of rounds with a neighbor missing would follow."""
        if not self.failures:  # a failing bootstrap is retried on its own backoff
            self._wake.set()

    def _pause(self, seconds: float) -> bool:
        """Wait `seconds`, or less when refresh_soon() is called; True once stopped."""
        self._wake.wait(seconds)
        self._wake.clear()
        return self._stop.is_set()

    def _beat(self, progress: Callable[[], Progress],
              on_assignment: Callable[[AssignmentView], None]) -> None:
        wait = 0.0
        last = -math.inf
        while not self._pause(wait):
            early = HEARTBEAT_MIN_S - (time.monotonic() - last)
            if early > 0 and self._stop.wait(early):  # woken early: no faster than MIN
                return
            last = time.monotonic()
            try:
                self.heartbeat(progress(), on_assignment)
            except ProtocolError as exc:
                # Backoff capped at a quarter lease: a bootstrap back from a restart must hear
                # from every peer within the grace it gives them (two leases).
                wait = min(self._delay(self.failures), max(HEARTBEAT_MIN_S,
                                                           self.lease_seconds / 4))
                self.failures += 1
                log.warning("node %d: bootstrap %s: %s (attempt %d; next in %.1f s; training "
                            "goes on)", self.node_id, self.address, exc, self.failures, wait)
                continue
            except Exception:  # the thread must outlive any surprise: it is the node's lifeline
                log.exception("node %d: heartbeat failed unexpectedly", self.node_id)
                wait = self._delay(self.failures)
                self.failures += 1
                continue
            if self.failures:
                log.warning("node %d: bootstrap %s reachable again after %d failed heartbeats",
                            self.node_id, self.address, self.failures)
            self.failures = 0
            wait = min(HEARTBEAT_MAX_S, max(HEARTBEAT_MIN_S, self.lease_seconds / 4))

    def heartbeat(self, now: Progress, on_assignment: Callable[[AssignmentView], None]) -> None:
        """One heartbeat; hand over the assignment when the epoch moved on (the answer's, or
        one fetched from a bootstrap that does not send it)."""
        request = bootstrap_pb2.HeartbeatRequest(
            node_id=self.node_id, round=now.round, loss=now.loss, health=now.health,
            unreachable_neighbors=list(now.unreachable), assignment_epoch=self.epoch)
        try:
            reply = self._send_heartbeat(request)
        except grpc.RpcError as err:
            if err.code() is grpc.StatusCode.NOT_FOUND:
                if self._stop.is_set():
                    return  # this node is leaving: its Leave came first, and it stays gone
                if self._join_request is not None:
                    # The bootstrap does not know this node (it left, or the bootstrap lost
                    # its state): join again with what the node joined with.
                    log.warning("node %d: the bootstrap no longer knows this node; joining "
                                "again", self.node_id)
                    self._rejoin()
                    return
            raise from_rpc_error(err, f"Heartbeat at bootstrap {self.address}") from None
        self.lease_seconds = reply.lease_seconds if reply.lease_seconds > 0 else 15.0
        if reply.HasField("assignment"):  # the new one came with the answer
            self._hand_over(assignment_from_proto(reply.assignment), on_assignment)
        elif reply.topology_epoch != self.epoch:  # a bootstrap that does not send it
            self._fetch_assignment(on_assignment)

    def _send_heartbeat(self, request: bootstrap_pb2.HeartbeatRequest
                        ) -> bootstrap_pb2.HeartbeatResponse:
        """On the Heartbeats stream (opened again after any failure), or as a unary call to a
        bootstrap that does not serve the stream (UNIMPLEMENTED: an older one)."""
        if self._streams_served:
            if self._beats is None:
                self._beats = HeartbeatStream(self.stub)
            try:
                return self._beats.send(request, CALL_TIMEOUT_S)
            except grpc.RpcError as err:
                self._beats.close()
                self._beats = None
                if err.code() is not grpc.StatusCode.UNIMPLEMENTED:
                    raise
                log.info("node %d: bootstrap %s has no Heartbeats stream; heartbeating with "
                         "a call each", self.node_id, self.address)
                self._streams_served = False
        return self.stub.Heartbeat(request, timeout=CALL_TIMEOUT_S)

    def _rejoin(self) -> None:
        assert self._join_request is not None
        try:
            self.stub.Join(self._join_request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as err:
            raise from_rpc_error(err, f"Join at bootstrap {self.address}") from None

    def _fetch_assignment(self, on_assignment: Callable[[AssignmentView], None]) -> None:
        request = bootstrap_pb2.GetAssignmentRequest(node_id=self.node_id)
        try:
            view = assignment_from_proto(self.stub.GetAssignment(request,
                                                                 timeout=CALL_TIMEOUT_S))
        except grpc.RpcError as err:
            raise from_rpc_error(err, f"GetAssignment at bootstrap {self.address}") from None
        self._hand_over(view, on_assignment)

    def _hand_over(self, view: AssignmentView,
                   on_assignment: Callable[[AssignmentView], None]) -> None:
        if view.epoch != self.epoch:
            log.info("node %d: topology epoch %d -> %d: neighbors %s", self.node_id, self.epoch,
                     view.epoch, [n.node_id for n in view.neighbors])
            self.epoch = view.epoch
            on_assignment(view)

    @property
    def joined(self) -> bool:
        """Whether a Join was sent (so there is something to Leave)."""
        return self._join_request is not None

    # ---- the end -------------------------------------------------------------------------
    def stop(self) -> None:
        """End the heartbeat thread and any wait (join, first assignment)."""
        self._stop.set()
        self._wake.set()
        watch = self._watch
        if watch is not None:
            watch.cancel()

    def leave(self, reason: str) -> None:
        """Leave the run (best effort: a bootstrap that is down just logs a warning).

        The heartbeat thread is stopped and waited for first: a heartbeat still on its way
        would reach the bootstrap after the Leave, be answered NOT_FOUND and join this node
        again, and its neighbors would be assigned a node that is gone for a lease.
        """
        self._end_heartbeats()
        try:
            self.stub.Leave(bootstrap_pb2.LeaveRequest(node_id=self.node_id, reason=reason),
                            timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as err:
            log.warning("node %d: leave failed: %s", self.node_id,
                        from_rpc_error(err, f"Leave at bootstrap {self.address}"))

    def _end_heartbeats(self) -> None:
        """stop(), and wait for the heartbeat thread to end (a heartbeat in flight answered or
        timed out)."""
        self.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=CALL_TIMEOUT_S + 1)

    def close(self) -> None:
        self._end_heartbeats()
        if self._beats is not None:
            self._beats.close()
        self.channel.close()


class HeartbeatStream:
    """Heartbeats on one open Heartbeats call: send(request) is one heartbeat's round trip.

    The requests go out from a queue the call reads; an answer that does not come within the
    timeout cancels the call (a stalled bootstrap, a cut link), and send raises an error with
    code DEADLINE_EXCEEDED, as a unary Heartbeat past its deadline would. After any error the
    stream is done: open another."""

    def __init__(self, stub: bootstrap_pb2_grpc.BootstrapStub) -> None:
        self._requests: queue.SimpleQueue[bootstrap_pb2.HeartbeatRequest | None] = (
            queue.SimpleQueue())
        self._call = stub.Heartbeats(iter(self._requests.get, None))
        self._late = threading.Event()

    def send(self, request: bootstrap_pb2.HeartbeatRequest,
             timeout: float) -> bootstrap_pb2.HeartbeatResponse:
        self._requests.put(request)
        timer = threading.Timer(timeout, self._give_up)
        timer.daemon = True
        timer.start()
        try:
            return next(self._call)
        except StopIteration:  # the bootstrap ended the stream with OK: it never should
            raise _StreamEnded(grpc.StatusCode.UNAVAILABLE,
                               "the bootstrap ended the Heartbeats stream") from None
        except grpc.RpcError:
            if self._late.is_set():
                raise _StreamEnded(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   f"no answer to a heartbeat within {timeout:g} s") from None
            raise
        finally:
            timer.cancel()

    def _give_up(self) -> None:
        self._late.set()
        self._call.cancel()

    def close(self) -> None:
        self._requests.put(None)  # the request iterator ends: the client half-closes
        self._call.cancel()


class _StreamEnded(grpc.RpcError):
    """How a Heartbeats stream failed on this side: a code and details, as grpc's errors."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[()]:
        return ()


class _Deadline:
    def __init__(self, seconds: float) -> None:
        import time

        self._clock = time.monotonic
        self._end = self._clock() + seconds

    def left(self) -> float:
        return max(0.0, self._end - self._clock())

    def passed(self) -> bool:
        return self.left() <= 0.0

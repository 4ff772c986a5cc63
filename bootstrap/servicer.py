"""The Bootstrap service over gRPC: a thin shell around bootstrap.registry (docs/architecture.md,
"Bootstrap").

Each RPC hands the request's fields to the Registry, which validates them and owns every rule,
and turns the answer into a message with bootstrap.convert; crossgrad.rpc.translate_errors_async
maps the Registry's ProtocolErrors to the status codes listed in bootstrap.proto.

Leases are checked (Registry.expire) before every call that reports liveness, so an answer never
shows a peer alive whose lease ran out; the reaper thread does the same for WatchAssignment
subscribers when nobody calls at all.

Who may call what (docs/security.md): Join, Heartbeat and Leave act only on the caller's own id.
With mutual TLS that is the node its verified certificate names, and a request for another id
is refused with PERMISSION_DENIED (one node cannot evict another, nor heartbeat for a dead one);
the read-only calls (GetAssignment, WatchAssignment, ListPeers) are open to any caller the
server's gate let in (crossgrad/guard.py). Without mutual TLS node ids are claims.

The service runs on grpc.aio (crossgrad.rpc.make_aio_server): one event loop serves every call.
Registry calls run on the loop as they are: each is a lock and a SQLite statement, under a
millisecond, the durable commits of Join and Leave included (0.3 ms measured on ext4); moving them
to threads would not free the loop, since every other call waits on the same lock.

WatchAssignment is a coroutine per subscriber, not a thread, and it sends what changes for its
node: the assignment once the run is assembled, then a new one whenever the node's neighbors,
their weights or their addresses change. An epoch bump that leaves a node's assignment as it was
(most of a sparse graph when one peer leaves: in a ring, all but the two it bordered) sends that
node nothing; the epoch itself reaches every peer in its heartbeat answers. The Registry
announces each bump to `_epoch_bumped` (Registry.on_epoch) from whichever thread made it (a call
on the loop, or the reaper when a lease runs out), which hands it to the loop with
call_soon_threadsafe; there the servicer compares the whole mixing table with the one it last
saw (bootstrap.registry.changed_assignments, one array comparison) and wakes only the watchers
of the nodes whose row changed. A woken watcher reads its assignment at the current epoch, so it
never misses the newest, and sends it if it differs from the one last sent. Waking every watcher
at every bump cost the loop a thousand coroutine steps and writes per epoch, and grpc.aio accepts
each new call only after a few turns of that same loop: heartbeats waited behind the fan-out
(docs/benchmarks.md, "Busy bootstrap"). At most FANOUT_TURNS watchers build and write their
assignment at once (a dense graph can still change every row); a write that waits longer than
TURN_SECONDS (a client that does not read) gives its turn up. A client that goes away (or
whose deadline passes) has its coroutine cancelled by grpc; a stopping server wakes every watch,
and each ends with UNAVAILABLE, which tells the peer to watch again once the bootstrap is back.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
import grpc.aio

from bootstrap.convert import assignment_to_proto, peer_to_proto, settings_to_proto
from bootstrap.registry import Mixing, Registry, changed_assignments
from crossgrad.errors import NotReady, PermissionDenied, Unavailable
from crossgrad.guard import TokenBucket, refusal
from crossgrad.rpc import call_soon, translate_errors_async
from crossgrad.security import caller_of
from crossgrad.v1 import bootstrap_pb2 as pb
from crossgrad.v1 import bootstrap_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "crossgrad.v1.Bootstrap"


# Watchers that build and write their assignment at once after an epoch bump.
FANOUT_TURNS = 16
# How long one write may hold its turn: a client that stops reading (its HTTP/2 window full)
# must not hold up the fan-out to the others; its write goes on waiting without a turn.
TURN_SECONDS = 1.0
STOPPING = "the bootstrap is stopping; {} again once it is back"
# Heartbeats one Heartbeats stream may carry a second (BEATS_BURST at once): a peer beats at
# most every 0.2 s (peer/session.py); more is a misbehaving caller, whose stream then ends.
BEATS_PER_SECOND = 10.0
BEATS_BURST = 20


class BootstrapServicer(bootstrap_pb2_grpc.BootstrapServicer):
    """crossgrad.v1.Bootstrap over one Registry, on a grpc.aio server: add it with
    `add_to_server`, which also binds it to that server's event loop."""

    def __init__(self, registry: Registry, *,
                 refusals: Callable[[], dict[str, int]] = dict) -> None:
        self.registry = registry
        self.refusals = refusals  # the server's count of refused calls, for ListPeers
        self._watching = 0  # WatchAssignment streams open
        self._watching_changed = threading.Condition()  # for threads waiting on that count
        self._settings = settings_to_proto(registry.settings)  # the same in every answer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchers: dict[int, set[asyncio.Event]] = {}  # node id -> its watches' wake-ups
        self._mixing: Mixing | None = None  # the table the watchers were last woken for
        self._turns = asyncio.Semaphore(FANOUT_TURNS)
        # The Heartbeats streams' tasks waiting for their next heartbeat (not while they
        # answer one: cancelling a write in flight leaves grpc unable to send the status).
        self._beating: set[asyncio.Task[Any]] = set()
        self._stopping = False
        registry.on_epoch(self._epoch_bumped)

    @property
    def watching(self) -> int:
        """WatchAssignment streams open now."""
        return self._watching

    def wait_watching(self, count: int, timeout: float) -> bool:
        """Block until exactly `count` WatchAssignment streams are open; False after timeout.
        For another thread than the server's loop (a test, an operator's tool)."""
        with self._watching_changed:
            return self._watching_changed.wait_for(lambda: self._watching == count, timeout)

    def _count_watch(self, delta: int) -> None:
        with self._watching_changed:
            self._watching += delta
            self._watching_changed.notify_all()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Serve on `server`; called on its event loop (crossgrad.rpc.Service.register)."""
        self._loop = asyncio.get_running_loop()
        bootstrap_pb2_grpc.add_BootstrapServicer_to_server(self, server)

    @staticmethod
    def _own(node_id: int, context: grpc.aio.ServicerContext, what: str) -> int:
        """`node_id`, if the caller may act under it: with mutual TLS only its own."""
        caller = caller_of(context)
        if caller.certified and caller.node_id != node_id:
            raise PermissionDenied(f"{what} for node {node_id} refused: {caller.name} may "
                                   f"{what.lower()} only under its own id")
        return node_id

    def _epoch_bumped(self, epoch: int) -> None:
        """Registry.on_epoch, from any thread: wake the watchers on the loop."""
        if self._loop is not None:
            call_soon(self._loop, self._wake)

    def _wake(self) -> None:  # on the loop
        """Wake the watchers whose assignment changed since the last wake (all of them at
        assembly, and when the server stops)."""
        before, after = self._mixing, self.registry.mixing()
        self._mixing = after
        if self._stopping or before is None or after is None:
            nodes: Iterable[int] = list(self._watchers)
        else:
            nodes = changed_assignments(before, after).tolist()
        for node_id in nodes:
            for wake in self._watchers.get(node_id, ()):
                wake.set()

    def stop_streams(self) -> None:
        """End every WatchAssignment and Heartbeats stream with UNAVAILABLE; from any thread.
        (Left to the server's stop, they would hold it for its whole grace.)"""
        def stop() -> None:
            self._stopping = True
            self._wake()
            for task in self._beating:
                task.cancel()
        if self._loop is not None:
            call_soon(self._loop, stop)

    @translate_errors_async
    async def Join(self, request: pb.JoinRequest,
                   context: grpc.aio.ServicerContext) -> pb.JoinResponse:
        result = self.registry.join(self._own(request.node_id, context, "Join"),
                                    request.address, request.num_samples,
                                    resumed=request.resumed,
                                    checkpoint_round=request.checkpoint_round)
        return pb.JoinResponse(ready=result.ready, joined=result.joined,
                               expected=result.expected, settings=self._settings)

    @translate_errors_async
    async def Heartbeat(self, request: pb.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> pb.HeartbeatResponse:
        return self._heartbeat(request, context)

    @translate_errors_async
    async def Heartbeats(self, requests: AsyncIterator[pb.HeartbeatRequest],
                         context: grpc.aio.ServicerContext) -> None:
        """Heartbeat, a message at a time on one call, each answered as Heartbeat answers it.

        A unary call costs the bootstrap the acceptance of a new call (grpc.aio takes them one
        at a time, each a few turns of the loop), the gate's checks and a task; a message on an
        open stream, a read and a write. The gate checked this call once, as it opened; the
        caller's own id is checked at every heartbeat, and so is the stream's rate."""
        task = asyncio.current_task()
        assert task is not None
        bucket = TokenBucket(BEATS_PER_SECOND, BEATS_BURST, time.monotonic())
        try:
            self._beating.add(task)  # waiting for a heartbeat: a stop cancels the wait
            async for request in requests:
                self._beating.discard(task)
                wait = bucket.take(time.monotonic())
                if wait:
                    raise refusal(wait, f"Heartbeats: over {BEATS_PER_SECOND:g} heartbeats a "
                                  "second on one stream")
                await context.write(self._heartbeat(request, context))
                if self._stopping:  # stopped while it wrote (a write is not cancelled)
                    raise Unavailable(STOPPING.format("heartbeat"))
                self._beating.add(task)
        except asyncio.CancelledError:
            if not self._stopping:  # the client went away
                raise
            raise Unavailable(STOPPING.format("heartbeat")) from None
        finally:
            self._beating.discard(task)

    def _heartbeat(self, request: pb.HeartbeatRequest,
                   context: grpc.aio.ServicerContext) -> pb.HeartbeatResponse:
        self.registry.expire()
        epoch, lease = self.registry.heartbeat(self._own(request.node_id, context, "Heartbeat"),
                                               request.round, request.loss,
                                               request.health,
                                               unreachable=request.unreachable_neighbors)
        answer = pb.HeartbeatResponse(topology_epoch=epoch, lease_seconds=lease)
        if request.HasField("assignment_epoch") and request.assignment_epoch != epoch:
            try:  # the peer follows epochs from here: no GetAssignment after this answer
                view = self.registry.assignment(request.node_id)
            except NotReady:  # not assembled: nobody holds an assignment yet
                return answer
            answer.assignment.CopyFrom(assignment_to_proto(view, self._settings))
        return answer

    @translate_errors_async
    async def GetAssignment(self, request: pb.GetAssignmentRequest,
                            context: grpc.aio.ServicerContext) -> pb.Assignment:
        self.registry.expire()
        return assignment_to_proto(self.registry.assignment(request.node_id), self._settings)

    @translate_errors_async
    async def WatchAssignment(self, request: pb.GetAssignmentRequest,
                              context: grpc.aio.ServicerContext) -> None:
        """The current assignment once the run is assembled, then each one that differs."""
        node_id = request.node_id
        sent: tuple[object, ...] | None = None  # what was last sent: neighbors, self weight
        epoch = 0  # ... and at which epoch (for the log)
        wake = asyncio.Event()
        wakes = self._watchers.setdefault(node_id, set())
        wakes.add(wake)
        self._count_watch(1)
        try:
            while True:
                wake.clear()  # before reading: a later change sets it again
                if self._stopping:
                    raise Unavailable(STOPPING.format("watch"))
                async with self._turns:
                    try:  # a bad or unknown id fails here, before any wait
                        view = self.registry.assignment(node_id)
                    except NotReady:
                        view = None
                    write = None
                    if view is not None and (view.neighbors, view.self_weight) != sent:
                        write = await _started_write(
                            context, assignment_to_proto(view, self._settings))
                        sent, epoch = (view.neighbors, view.self_weight), view.epoch
                if write is not None:
                    await write  # a client slow to read waits for it without a turn
                await wake.wait()
        finally:  # the end of the stream, or grpc cancelled it (the client went away)
            wakes.discard(wake)
            if not wakes and self._watchers.get(node_id) is wakes:
                del self._watchers[node_id]
            self._count_watch(-1)
            log.debug("node %d stopped watching its assignment (epoch %d)", node_id, epoch)

    @translate_errors_async
    async def Leave(self, request: pb.LeaveRequest,
                    context: grpc.aio.ServicerContext) -> pb.LeaveResponse:
        self.registry.leave(self._own(request.node_id, context, "Leave"), request.reason)
        return pb.LeaveResponse()

    @translate_errors_async
    async def ListPeers(self, request: pb.ListPeersRequest,
                        context: grpc.aio.ServicerContext) -> pb.ListPeersResponse:
        self.registry.expire()
        now = self.registry.now()
        return pb.ListPeersResponse(
            peers=[peer_to_proto(p, now) for p in self.registry.peers()],
            expected=self.registry.settings.nodes,
            topology_epoch=self.registry.epoch,
            settings=self._settings,
            refusals=self.refusals(),
        )


async def _started_write(context: grpc.aio.ServicerContext,
                         message: pb.Assignment) -> asyncio.Future[None]:
    """`context.write(message)`, started and waited for up to TURN_SECONDS; the write (it may
    not be done: await it). Cancelled with the watch if that is cancelled meanwhile."""
    write = asyncio.ensure_future(context.write(message))
    try:
        await asyncio.wait((write,), timeout=TURN_SECONDS)
    except BaseException:
        write.cancel()
        raise
    return write

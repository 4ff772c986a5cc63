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

WatchAssignment is a coroutine per subscriber, not a thread. It waits on an asyncio.Event that
is set, and replaced by a fresh one, at every epoch bump: the Registry announces each bump to
`_epoch_bumped` (Registry.on_epoch) from whichever thread made it (a call on the loop, or the
reaper when a lease runs out), which hands it to the loop with call_soon_threadsafe. A woken
watcher reads its assignment at the current epoch, so it never misses the newest, and sends it
if its epoch is not the one last sent. At most FANOUT_TURNS watchers build and write their
assignment at once, so an epoch's fan-out to 1,000 streams leaves the loop free for heartbeats
in between (docs/benchmarks.md, "Busy bootstrap"); a write that waits longer than TURN_SECONDS
(a client that does not read) gives its turn up. A client that goes away (or whose deadline
passes) has its coroutine cancelled by grpc; a stopping server sets its event once more and
every watch ends with UNAVAILABLE, which tells the peer to watch again once the bootstrap is back.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

import grpc
import grpc.aio

from bootstrap.convert import assignment_to_proto, peer_to_proto, settings_to_proto
from bootstrap.registry import Registry
from crossgrad.errors import NotReady, PermissionDenied, Unavailable
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
STOPPING = "the bootstrap is stopping; watch again once it is back"


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
        self._changed = asyncio.Event()  # set at the next epoch bump (then replaced)
        self._turns = asyncio.Semaphore(FANOUT_TURNS)
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
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def stop_watches(self) -> None:
        """End every WatchAssignment stream with UNAVAILABLE; from any thread."""
        def stop() -> None:
            self._stopping = True
            self._wake()
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
        self.registry.expire()
        epoch, lease = self.registry.heartbeat(self._own(request.node_id, context, "Heartbeat"),
                                               request.round, request.loss,
                                               request.health,
                                               unreachable=request.unreachable_neighbors)
        return pb.HeartbeatResponse(topology_epoch=epoch, lease_seconds=lease)

    @translate_errors_async
    async def GetAssignment(self, request: pb.GetAssignmentRequest,
                            context: grpc.aio.ServicerContext) -> pb.Assignment:
        self.registry.expire()
        return assignment_to_proto(self.registry.assignment(request.node_id), self._settings)

    @translate_errors_async
    async def WatchAssignment(self, request: pb.GetAssignmentRequest,
                              context: grpc.aio.ServicerContext) -> None:
        """The current assignment once the run is assembled, then one per epoch change."""
        node_id = request.node_id
        sent = 0  # the epoch last sent; 0 = none (assembly makes epoch 1)
        self._count_watch(1)
        try:
            while True:
                changed = self._changed  # taken before reading: a later bump sets it
                if self._stopping:
                    raise Unavailable(STOPPING)
                async with self._turns:
                    try:  # a bad or unknown id fails here, before any wait
                        view = self.registry.assignment(node_id)
                    except NotReady:
                        view = None
                    write = None
                    if view is not None and view.epoch != sent:
                        write = await _started_write(
                            context, assignment_to_proto(view, self._settings))
                        sent = view.epoch
                if write is not None:
                    await write  # a client slow to read waits for it without a turn
                await changed.wait()
        finally:  # the end of the stream, or grpc cancelled it (the client went away)
            self._count_watch(-1)
            log.debug("node %d stopped watching its assignment (epoch %d)", node_id, sent)

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

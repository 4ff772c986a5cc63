"""The Bootstrap service over gRPC: a thin shell around bootstrap.registry (docs/architecture.md,
"Bootstrap").

Each RPC hands the request's fields to the Registry, which validates them and owns every rule,
and turns the answer into a message with bootstrap.convert; crossgrad.rpc.translate_errors maps
the Registry's ProtocolErrors to the status codes listed in bootstrap.proto.

Leases are checked (Registry.expire) before every call that reports liveness, so an answer never
shows a peer alive whose lease ran out; the reaper thread does the same for WatchAssignment
subscribers when nobody calls at all.

Who may call what (docs/security.md): Join, Heartbeat and Leave act only on the caller's own id.
With mutual TLS that is the node its verified certificate names, and a request for another id
is refused with PERMISSION_DENIED (one node cannot evict another, nor heartbeat for a dead one);
the read-only calls (GetAssignment, WatchAssignment, ListPeers) are open to any caller the
server's gate let in (crossgrad/guard.py). Without mutual TLS node ids are claims.

WatchAssignment holds one server thread per subscriber for as long as it streams, so the server
is sized for one watcher per node (bootstrap/server.py). The thread sleeps on the Registry until
the epoch changes, the client goes away (grpc's termination callback wakes it) or the server
stops; a stopping server ends every watch with UNAVAILABLE, which tells the peer to watch again
once the bootstrap is back. It does not poll: 1,000 watchers waking 4 times a second each took
the GIL and the registry's lock from the heartbeats (docs/benchmarks.md, "Busy bootstrap"); the
long `watch_poll_seconds` is only a safety net.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

import grpc

from bootstrap.convert import assignment_to_proto, peer_to_proto, settings_to_proto
from bootstrap.registry import Registry
from crossgrad.errors import NotReady, PermissionDenied, Unavailable
from crossgrad.rpc import translate_errors
from crossgrad.security import caller_of
from crossgrad.v1 import bootstrap_pb2 as pb
from crossgrad.v1 import bootstrap_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "crossgrad.v1.Bootstrap"


class BootstrapServicer(bootstrap_pb2_grpc.BootstrapServicer):
    """crossgrad.v1.Bootstrap over one Registry. `watch_poll_seconds`: how often a watch checks
    on its client even if nothing woke it (a lost termination callback)."""

    def __init__(self, registry: Registry, *, watch_poll_seconds: float = 30.0,
                 refusals: Callable[[], dict[str, int]] = dict) -> None:
        self.registry = registry
        self.refusals = refusals  # the server's count of refused calls, for ListPeers
        self._settings = settings_to_proto(registry.settings)  # the same in every answer
        self._poll = watch_poll_seconds
        self._stopping = threading.Event()

    @staticmethod
    def _own(node_id: int, context: grpc.ServicerContext, what: str) -> int:
        """`node_id`, if the caller may act under it: with mutual TLS only its own."""
        caller = caller_of(context)
        if caller.certified and caller.node_id != node_id:
            raise PermissionDenied(f"{what} for node {node_id} refused: {caller.name} may "
                                   f"{what.lower()} only under its own id")
        return node_id

    def stop_watches(self) -> None:
        """End every WatchAssignment stream (UNAVAILABLE)."""
        self._stopping.set()
        self.registry.wake()

    @translate_errors
    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        result = self.registry.join(self._own(request.node_id, context, "Join"),
                                    request.address, request.num_samples,
                                    resumed=request.resumed,
                                    checkpoint_round=request.checkpoint_round)
        return pb.JoinResponse(ready=result.ready, joined=result.joined,
                               expected=result.expected, settings=self._settings)

    @translate_errors
    def Heartbeat(self, request: pb.HeartbeatRequest,
                  context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        self.registry.expire()
        epoch, lease = self.registry.heartbeat(self._own(request.node_id, context, "Heartbeat"),
                                               request.round, request.loss,
                                               request.health,
                                               unreachable=request.unreachable_neighbors)
        return pb.HeartbeatResponse(topology_epoch=epoch, lease_seconds=lease)

    @translate_errors
    def GetAssignment(self, request: pb.GetAssignmentRequest,
                      context: grpc.ServicerContext) -> pb.Assignment:
        self.registry.expire()
        return assignment_to_proto(self.registry.assignment(request.node_id), self._settings)

    @translate_errors
    def WatchAssignment(self, request: pb.GetAssignmentRequest,
                        context: grpc.ServicerContext) -> Iterator[pb.Assignment]:
        """The current assignment once the run is assembled, then one per epoch change."""
        node_id = request.node_id
        try:  # a bad or unknown id fails here, before any wait
            view = self.registry.assignment(node_id)
        except NotReady:
            view = None
        sent = 0  # the epoch last sent; 0 = none (assembly makes epoch 1)
        ended = threading.Event()

        def end() -> None:
            ended.set()
            self.registry.wake()

        def gone() -> bool:
            return ended.is_set() or self._stopping.is_set()

        if not context.add_callback(end):
            return  # the call is already over
        while True:
            if view is not None and view.epoch != sent:
                yield assignment_to_proto(view, self._settings)
                sent = view.epoch
            if self._stopping.is_set():
                raise Unavailable("the bootstrap is stopping; watch again once it is back")
            if ended.is_set() or not context.is_active():
                log.debug("node %d stopped watching its assignment (epoch %d)", node_id, sent)
                return
            if self.registry.wait_for_change(sent, self._poll, gone) != sent:
                view = self.registry.assignment(node_id)

    @translate_errors
    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveResponse:
        self.registry.leave(self._own(request.node_id, context, "Leave"), request.reason)
        return pb.LeaveResponse()

    @translate_errors
    def ListPeers(self, request: pb.ListPeersRequest,
                  context: grpc.ServicerContext) -> pb.ListPeersResponse:
        self.registry.expire()
        now = self.registry.now()
        return pb.ListPeersResponse(
            peers=[peer_to_proto(p, now) for p in self.registry.peers()],
            expected=self.registry.settings.nodes,
            topology_epoch=self.registry.epoch,
            settings=self._settings,
            refusals=self.refusals(),
        )

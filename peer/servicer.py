"""The Peer service (crossgrad.v1.Peer): thin. Validate, call the runtime, stream, translate errors.

Who may call what (docs/security.md): GetModel and ComputeCrossGradient only the node's current
neighbors, under their own id (with mutual TLS, the node its certificate names: a request whose
requester_id disagrees is refused); GetStatus anyone the server's gate let in (crossgrad/guard.py).
A neighbor may take at most `bytes_per_round` bytes of streams per round (by default four models:
a round needs two), so that a caller cannot make a node serve its model in a loop.

Status codes (peer.proto): PERMISSION_DENIED for a requester that is not a neighbor or not who
its certificate says, RESOURCE_EXHAUSTED for one over its bytes of the round,
FAILED_PRECONDITION for a round no longer kept, INVALID_ARGUMENT for a round past the run's
last, DEADLINE_EXCEEDED when a future round (the next one, or a requester's ahead of this node)
is not reached before the call's deadline, UNAVAILABLE while the node is starting or stopping.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc

from crossgrad.errors import (
    DeadlineExceeded,
    InvalidMessage,
    NotANeighbor,
    PermissionDenied,
    StaleRound,
    TooLarge,
    Unavailable,
)
from crossgrad.rpc import translate_errors
from crossgrad.security import caller_of
from crossgrad.v1 import peer_pb2, peer_pb2_grpc
from peer.messages import (
    cross_gradient_raw,
    estimate_raw,
    model_raw,
    model_update_raw,
    replica_raw,
)
from peer.node import Node, Params
from peer.wire import checksums, frame_bytes

if TYPE_CHECKING:
    from peer.service import PeerRuntime


# The rounds in which a call waits for this node to attach its node (the run's start).
FIRST_ROUNDS = 1


class PeerServicer(peer_pb2_grpc.PeerServicer):
    def __init__(self, runtime: PeerRuntime) -> None:
        self.runtime = runtime
        # The CRC-32Cs of published models, by round: each is sent to every neighbor, and
        # its checksums would otherwise be computed again before each transfer's first byte.
        # Keyed by the snapshot object too, so a replaced snapshot is never sent with old CRCs.
        self._crcs: dict[int, tuple[Params, list[int]]] = {}
        self._crcs_lock = threading.Lock()
        # Bytes streamed to each (requester, round), checked against bytes_per_round.
        self._streamed: dict[tuple[int, int], int] = {}
        self._streamed_lock = threading.Lock()

    @staticmethod
    def _requester(claimed: int, context: grpc.ServicerContext) -> int:
        """The id the request acts under: with mutual TLS, the node the caller's verified
        certificate names, which the request must not contradict; otherwise the claim."""
        caller = caller_of(context)
        if not caller.certified:
            return claimed
        if caller.node_id is None:
            raise PermissionDenied(f"{caller.name} is not a node of this run: only its nodes fetch "
                                   "models and cross-gradients (GetStatus is open to it)")
        if claimed != caller.node_id:
            raise PermissionDenied(f"requester_id {claimed} disagrees with the caller's "
                                   f"certificate, which names node {caller.node_id}: a node "
                                   "acts only under its own id")
        return claimed

    def _charge(self, node: Node, requester: int, round_: int) -> None:
        """Refuse a requester that already took its bytes of this round (retry next round)."""
        limit = self.runtime.bytes_per_round
        with self._streamed_lock:
            for key in [k for k in self._streamed if k[1] <= round_ - node.keep_rounds]:
                del self._streamed[key]
            taken = self._streamed.get((requester, round_), 0)
        if taken >= limit:
            raise TooLarge(f"node {requester} already took {taken} bytes of round {round_} "
                           f"from node {node.id}, its limit per round ({limit}); a round needs "
                           "one model and one cross-gradient: retry in the next round")

    def _count(self, requester: int, round_: int, size: int) -> None:
        with self._streamed_lock:
            key = (requester, round_)
            self._streamed[key] = self._streamed.get(key, 0) + size

    def _model_crcs(self, node: Node, round_: int, params: Params) -> list[int]:
        with self._crcs_lock:
            cached = self._crcs.get(round_)
            if cached is not None and cached[0] is params:
                return cached[1]
            crcs = checksums(params)
            self._crcs[round_] = (params, crcs)
            for old in [r for r in self._crcs if r <= round_ - node.keep_rounds]:
                del self._crcs[old]
            return crcs

    def _node_for(self, requester: int, round_: int, wait: float) -> Node:
        """The ready node (waiting up to `wait` s for it), after checking the requester and the
        round window.

        A requester ahead of this node (round_ more than one round past this node's) is not
        refused: it is waited for, up to `wait` s, until this node gets one round short of it
        (the window in which it serves that round). Refusing at once let a group of nodes one
        slow round ahead run on without their neighbors for the rest of the run; waiting keeps
        the run in step, and a straggler still costs its neighbors at most their deadline.
        """
        started = time.monotonic()
        # At a run's start every node waits for its partners to attach: a call for the first
        # rounds waits for this node too. Asked for a later round, a node that is not ready is
        # restarting mid-run (resumed, rejoined): it answers at once, and its neighbors go on
        # without it until it has caught up, instead of each waiting out a deadline.
        node = self.runtime.wait_ready(wait if round_ <= FIRST_ROUNDS else 0.0)
        if node is None:
            raise Unavailable(f"node {self.runtime.node_id} is starting: it has no assignment "
                              "yet")
        if not node.is_neighbor(requester):
            self.runtime.count_rejected("not_a_neighbor")
            self.runtime.assignment_may_be_stale()
            raise NotANeighbor(f"node {requester} is not a neighbor of node {node.id} "
                               f"(neighbors: {list(node.assignment.neighbors)})")
        last = self.runtime.last_round()
        if round_ > last:
            self.runtime.count_rejected("past_last_round")
            raise InvalidMessage(f"round {round_} is past the last round of this run "
                                 f"({last}); node {node.id} is at round {node.round}")
        current = node.round
        if round_ > current + 1:
            left = max(0.0, wait - (time.monotonic() - started))
            if not node.wait_published(round_ - 1, left):
                why = ("it is stopping" if self.runtime.draining()
                       else f"it did not get there within {wait:.1f} s")
                raise (Unavailable if self.runtime.draining() else DeadlineExceeded)(
                    f"round {round_} is ahead of node {node.id}, which is at round "
                    f"{node.round}: {why}")
            current = node.round
        if round_ <= current - node.keep_rounds:
            raise StaleRound(f"round {round_} is stale: node {node.id} is at round {current} and "
                             f"keeps the last {node.keep_rounds} rounds")
        return node

    def _stream(self, raws: Iterator[bytes], requester: int, round_: int,
                kind: str) -> Iterator[bytes]:
        """Serialized TensorChunk messages (add_to_server registers a pass-through serializer),
        counted as they go."""
        for raw in raws:
            self.runtime.traffic.add_sent(requester, kind, frame_bytes(len(raw)))
            self._count(requester, round_, len(raw))
            yield raw

    @staticmethod
    def _remaining(context: grpc.ServicerContext, cap: float) -> float:
        left = context.time_remaining()
        return cap if left is None or math.isinf(left) else max(0.0, min(left, cap))

    @translate_errors
    def GetModel(self, request: peer_pb2.GetModelRequest,
                 context: grpc.ServicerContext) -> Iterator[bytes]:
        requester = self._requester(request.requester_id, context)
        node = self._node_for(requester, request.round,
                              self._remaining(context, self.runtime.timeout))
        self._charge(node, requester, request.round)
        if not node.wait_published(request.round, self._remaining(context, self.runtime.timeout)):
            if node.latest_published() < request.round and self.runtime.draining():
                raise Unavailable(f"node {node.id} is stopping: it will not publish round "
                                  f"{request.round}")
            raise DeadlineExceeded(f"node {node.id} had not published round {request.round} "
                                   "before the deadline")
        params = node.model(request.round)
        yield from self._stream(model_raw(node, request.round, params,
                                          crcs=self._model_crcs(node, request.round, params),
                                          chunk_bytes=self.runtime.chunk_bytes),
                                requester, request.round, "model")

    @translate_errors
    def ComputeCrossGradient(self, request: peer_pb2.CrossGradientRequest,
                             context: grpc.ServicerContext) -> Iterator[bytes]:
        requester, round_ = self._requester(request.requester_id, context), request.round
        node = self._node_for(requester, round_, self._remaining(context, self.runtime.timeout))
        self._charge(node, requester, round_)
        grads = node.cached_cross_gradient(requester, round_)
        if grads is None and self.runtime.draining():
            raise Unavailable(f"node {node.id} is stopping: it computes no more cross-gradients")
        if grads is None:
            if node.replicas is not None:  # this node's copy of the requester's replica
                params = node.replica_copy(requester, round_, self.runtime.neighborhood(),
                                           digest=request.replica_digest)
                if params is None:
                    raise Unavailable(f"node {node.id} holds no copy of node {requester}'s "
                                      f"replica of round {round_} and could not "
                                      "resynchronise it (GetReplica failed)")
            else:
                params = node.neighbor_model(requester, round_)
                if params is None:
                    params = self.runtime.fetch_model(
                        requester, round_, self._remaining(context, self.runtime.timeout))
            grads = node.cross_gradient(requester, round_, params)
        yield from self._stream(cross_gradient_raw(node, requester, round_, grads,
                                                   chunk_bytes=self.runtime.chunk_bytes),
                                requester, round_, "cross_gradient")

    def _replicas_node(self, requester: int, round_: int, context: grpc.ServicerContext,
                       what: str) -> Node:
        node = self._node_for(requester, round_, self._remaining(context, self.runtime.timeout))
        if node.replicas is None:
            raise StaleRound(f"node {node.id} keeps no model replicas: this run sends models "
                             f"dense (no --model-compressor), so there is no {what}")
        self._charge(node, requester, round_)
        return node

    def _wait_round_done(self, node: Node, round_: int, context: grpc.ServicerContext) -> None:
        """Wait until node has finished round_'s step (its update and replica exist)."""
        if not node.wait_update(round_, self._remaining(context, self.runtime.timeout)):
            if self.runtime.draining():
                raise Unavailable(f"node {node.id} is stopping: it will not finish round "
                                  f"{round_}")
            raise DeadlineExceeded(f"node {node.id} had not finished round {round_} before "
                                   "the deadline")

    @translate_errors
    def GetModelUpdate(self, request: peer_pb2.ModelUpdateRequest,
                       context: grpc.ServicerContext) -> Iterator[bytes]:
        requester, round_ = self._requester(request.requester_id, context), request.round
        node = self._replicas_node(requester, round_, context, "model update")
        self._wait_round_done(node, round_, context)
        yield from self._stream(model_update_raw(node, round_,
                                                 chunk_bytes=self.runtime.chunk_bytes),
                                requester, round_, "model_update")

    @translate_errors
    def GetReplica(self, request: peer_pb2.ReplicaRequest,
                   context: grpc.ServicerContext) -> Iterator[bytes]:
        requester, round_ = self._requester(request.requester_id, context), request.round
        node = self._replicas_node(requester, round_, context, "replica")
        if round_ > 0:  # the replica of round r exists once round r - 1's update does
            self._wait_round_done(node, round_ - 1, context)
        yield from self._stream(replica_raw(node, round_, chunk_bytes=self.runtime.chunk_bytes),
                                requester, round_, "replica")

    @translate_errors
    def GetEstimate(self, request: peer_pb2.EstimateRequest,
                    context: grpc.ServicerContext) -> Iterator[bytes]:
        requester, round_ = self._requester(request.requester_id, context), request.round
        node = self._node_for(requester, round_, self._remaining(context, self.runtime.timeout))
        if node.threepoint is None:
            raise StaleRound(f"node {node.id} keeps no cross-gradient estimates: this run does "
                             "not use --feedback ef21 or clag:Z")
        self._charge(node, requester, round_)
        yield from self._stream(estimate_raw(node, requester, round_,
                                             chunk_bytes=self.runtime.chunk_bytes),
                                requester, round_, "estimate")

    @translate_errors
    def GetStatus(self, request: peer_pb2.GetStatusRequest,
                  context: grpc.ServicerContext) -> peer_pb2.PeerStatus:
        return self.runtime.status()


def _passthrough(message: bytes | object) -> bytes:
    """Tensor streams are serialized by peer/wire.py already; anything else the usual way."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()  # type: ignore[attr-defined]


def add_to_server(servicer: PeerServicer, server: grpc.Server) -> None:
    """Register crossgrad.v1.Peer like the generated add_PeerServicer_to_server, except that
    the tensor streams go out as the bytes peer/wire.encode_raw wrote (one copy fewer)."""
    handlers = {
        "GetModel": grpc.unary_stream_rpc_method_handler(
            servicer.GetModel, request_deserializer=peer_pb2.GetModelRequest.FromString,
            response_serializer=_passthrough),
        "ComputeCrossGradient": grpc.unary_stream_rpc_method_handler(
            servicer.ComputeCrossGradient,
            request_deserializer=peer_pb2.CrossGradientRequest.FromString,
            response_serializer=_passthrough),
        **{name: grpc.unary_stream_rpc_method_handler(
            getattr(servicer, name), request_deserializer=request.FromString,
            response_serializer=_passthrough)
           for name, request in (("GetModelUpdate", peer_pb2.ModelUpdateRequest),
                                 ("GetReplica", peer_pb2.ReplicaRequest),
                                 ("GetEstimate", peer_pb2.EstimateRequest))},
        "GetStatus": grpc.unary_unary_rpc_method_handler(
            servicer.GetStatus, request_deserializer=peer_pb2.GetStatusRequest.FromString,
            response_serializer=peer_pb2.PeerStatus.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("crossgrad.v1.Peer",
                                                                          handlers),))

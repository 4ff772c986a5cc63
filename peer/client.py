"""The gRPC Neighborhood: a node's view of its neighbors over the network.

It implements the same interface as the simulator's InMemoryNeighborhood (peer/rounds.py,
Neighborhood): `models(round, neighbors)` and `cross_gradients(round, neighbors)`, each asking
all neighbors in parallel with a deadline. A neighbor that fails, times out or sends a stream
that does not validate is left out of the round (the node gives its weight to itself), logged
and counted; nothing it sent reaches the model.

What a neighbor may send is bounded twice: each message by the channel's message limit, each
whole stream by `max_model_bytes`, checked against the size the stream's header declares before
anything is allocated for it. Received tensors leave this module on the node's device
(`node.trainer.device`) with the node's dtypes: peer/wire decodes into CPU tensors, `_stream`
moves them, and nothing downstream (mixing, the QP, the gradients served from a fetched model)
needs to move them again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import grpc
import torch

from crossgrad.errors import (
    ConfigError,
    DeadlineExceeded,
    InvalidMessage,
    NotANeighbor,
    ProtocolError,
    StaleRound,
    Unavailable,
)
from crossgrad.rpc import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_MODEL_BYTES,
    from_rpc_error,
    make_channel,
    status_of,
)
from crossgrad.security import Security, node_server_name
from crossgrad.v1 import peer_pb2, peer_pb2_grpc
from peer.compression import Compressor
from peer.metrics import Traffic
from peer.node import Node, Params
from peer.replicas import Replica, Update
from peer.wire import Decoded, decode, human_bytes, specs_of

log = logging.getLogger(__name__)

T = TypeVar("T")


def check_model_fits(names: Sequence[str], params: Sequence[torch.Tensor],
                     max_model_bytes: int) -> None:
    """ConfigError when this node's own model is above its receive limit: its neighbors' models
    (the same shapes) and dense cross-gradients would all be refused, every round. Called at
    start-up, before the node serves."""
    if max_model_bytes < 1:
        raise ConfigError(f"--max-model-bytes must be positive; got {max_model_bytes}")
    total = sum(p.numel() * p.element_size() for p in params)
    if total > max_model_bytes:
        raise ConfigError(
            f"this node's model is {human_bytes(total)} ({total} bytes in {len(names)} tensors), "
            f"above --max-model-bytes {human_bytes(max_model_bytes)} ({max_model_bytes} bytes): "
            "every neighbor's model would be refused; raise --max-model-bytes to at least "
            f"{total}")


# Why a neighbor's answer was refused, by the status its error maps to (the `reason` of
# crossgrad_rejected_messages_total): it failed validation, ended early, or was too large.
REJECTED_ANSWERS = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_answer",
    grpc.StatusCode.DATA_LOSS: "truncated_answer",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "oversized_answer",
}


@dataclass
class Misses:
    """Neighbor answers that did not make it into a round: unavailable (no answer in time) or
    rejected, by reason (REJECTED_ANSWERS)."""

    unavailable: int = 0
    rejected_by: dict[str, int] = field(default_factory=dict)
    by_peer: dict[int, int] = field(default_factory=dict)

    def count(self, peer: int, rejected: str | None) -> None:
        """One miss of `peer`: unavailable when `rejected` is None, else its reason."""
        if rejected is None:
            self.unavailable += 1
        else:
            self.rejected_by[rejected] = self.rejected_by.get(rejected, 0) + 1
        self.by_peer[peer] = self.by_peer.get(peer, 0) + 1

    @property
    def rejected(self) -> int:
        return sum(self.rejected_by.values())

    @property
    def total(self) -> int:
        return self.unavailable + self.rejected


class GrpcNeighborhood:
    """Neighbors reached over gRPC. Addresses may change with a new assignment (`update`)."""

    def __init__(self, node: Node, addresses: Mapping[int, str], *, timeout: float,
                 traffic: Traffic | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
                 security: Security | None = None,
                 on_not_a_neighbor: Callable[[], None] = lambda: None) -> None:
        if max_model_bytes < 1:
            raise ConfigError(f"--max-model-bytes must be positive; got {max_model_bytes}")
        self.node = node
        self.timeout = timeout
        self.traffic = traffic or Traffic()
        self.misses = Misses()
        self.max_message_bytes = max_message_bytes
        self.max_model_bytes = max_model_bytes  # one model or cross-gradient stream, in bytes
        self.security = security  # None: plaintext (in-process tests)
        # Called when a neighbor answers that this node is not its neighbor: one of the two
        # has an older assignment (PeerRuntime asks the bootstrap at once).
        self.on_not_a_neighbor = on_not_a_neighbor
        self._lock = threading.Lock()
        self._addresses: dict[int, str] = {}
        # By (neighbor, address): with TLS a channel verifies that neighbor's certificate.
        self._channels: dict[tuple[int, str], grpc.Channel] = {}
        self._inflight: dict[tuple[int, int], futures.Future[Params]] = {}
        # Model updates by (peer, round), fetched once: the round driver and a server thread
        # bringing its copy of a requester's replica forward may both need the same one.
        self._updates: dict[tuple[int, int], futures.Future[Update]] = {}
        # Neighbors whose last call failed without an answer: the next call does not wait for
        # them to become reachable (wait_for_ready), so a dead neighbor whose host refuses
        # connections costs nothing, and one whose host is silent costs at most a deadline.
        self._suspects: set[int] = set()
        self._ahead: set[int] = set()  # rounds for which a neighbor answered "stale"
        self._waiting: set[int] = set()  # neighbors whose answer _gather waits for
        # (round, monotonic deadline): the one deadline of the round being fetched
        self._round_deadline: tuple[int, float] = (-1, 0.0)
        # (kind, peer, round): when the stream's first message arrived (perf_counter), and the
        # wait of the last gather (wait_seconds)
        self._arrivals: dict[tuple[str, int, int], float] = {}
        self._last_wait = 0.0
        # Fetch x_j^{t+1} in the background once round t's models are in, up to this round
        # (the run's last; None: never). The round loop sets it; the fetch is shared with the
        # round's own (fetch_model), so each model still crosses each link once.
        self.prefetch_until: int | None = None
        self._last_ready = 0.0  # perf_counter of the last gather's last first message
        self._pool = futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="neighbors")
        # Apart from _pool: a prefetch may wait a whole round for a neighbor to publish, and
        # must never keep the round's own calls from a thread.
        self._prefetcher = futures.ThreadPoolExecutor(max_workers=16,
                                                      thread_name_prefix="prefetch")
        self._asker = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="asking")
        self.update(addresses)

    def update(self, addresses: Mapping[int, str]) -> None:
        """Reach the neighbors at `addresses` from now on (a new assignment)."""
        with self._lock:
            self._addresses = dict(addresses)

    def addresses(self) -> dict[int, str]:
        with self._lock:
            return dict(self._addresses)

    def forget(self, peers: Sequence[int]) -> None:
        """Close the channels no current neighbor uses (after `peers` left the assignment)."""
        with self._lock:
            used = set(self._addresses.items())
            for key in [k for k in self._channels if k not in used]:
                self._channels.pop(key).close()
            self._suspects.difference_update(peers)

    def behind(self, round_: int) -> bool:
        """Whether a neighbor answered that it no longer keeps `round_` (it is ahead)."""
        with self._lock:
            found = round_ in self._ahead
            self._ahead = {r for r in self._ahead if r > round_}
            return found

    def channel(self, peer: int) -> grpc.Channel:
        with self._lock:
            address = self._addresses.get(peer)
            if address is None:
                raise ProtocolError(f"node {peer} is not a neighbor in the current assignment")
            channel = self._channels.get((peer, address))
            if channel is None:
                channel = make_channel(address, max_message_bytes=self.max_message_bytes,
                                       security=self.security,
                                       server_name=node_server_name(peer))
                self._channels[(peer, address)] = channel
        return channel

    def stub(self, peer: int) -> peer_pb2_grpc.PeerStub:
        return peer_pb2_grpc.PeerStub(self.channel(peer))

    def _raw_stream(self, peer: int, method: str,
                    serializer: Callable[[Any], bytes]) -> Callable[..., Iterator[bytes]]:
        """A tensor-stream method whose answers stay serialized bytes: peer/wire.decode reads
        data messages straight out of them (no protobuf object, no extra copy)."""
        return self.channel(peer).unary_stream(f"/crossgrad.v1.Peer/{method}",
                                               request_serializer=serializer,
                                               response_deserializer=None)

    def address(self, peer: int) -> str:
        with self._lock:
            return self._addresses.get(peer, "?")

    # ---- single calls (raise ProtocolError) ---------------------------------------------
    def _stream(self, peer: int, kind: str, round_: int,
                start: Callable[..., Iterator[bytes]], request: object,
                timeout: float | None, compressor: Compressor | None = None,
                allow_skips: bool = False) -> Decoded:
        """One tensor stream, decoded and validated, its tensors on the node's device."""
        what = f"{kind} of round {round_} from node {peer} at {self.address(peer)}"
        # wait_for_ready: a neighbor still starting (or restarting, or behind a link that is
        # coming back) is waited for, up to the deadline, instead of failing at once with
        # "connection refused"; once it failed, it is a suspect and is not waited for. (Failing
        # fast on every refused connection let a node whose channels were reconnecting after a
        # cut race through its rounds alone.)
        with self._lock:
            patient = peer not in self._suspects
        call = start(request, timeout=timeout if timeout is not None else self.timeout,
                     wait_for_ready=patient)
        try:
            decoded = decode(self._noting_arrival(call, (kind, peer, round_)),
                             specs_of(self.node.names, self.node.params), sender_id=peer,
                             round_=round_, max_total_bytes=self.max_model_bytes,
                             compressor=compressor, allow_skips=allow_skips)
        except grpc.RpcError as err:
            exc = from_rpc_error(err, what)
            with self._lock:
                if isinstance(exc, Unavailable | DeadlineExceeded):
                    self._suspects.add(peer)
                elif isinstance(exc, StaleRound):
                    self._ahead.add(round_)
            if isinstance(exc, NotANeighbor):
                self.on_not_a_neighbor()
            raise exc from None
        except ProtocolError as exc:
            call.cancel()  # type: ignore[attr-defined]  # a grpc stream is cancellable
            raise type(exc)(f"{what} rejected: {exc}") from None
        with self._lock:
            self._suspects.discard(peer)
        self.traffic.add_received(peer, kind, decoded.wire_bytes)
        self._to_device(decoded.tensors)
        return decoded

    def _noting_arrival(self, chunks: Iterator[bytes],
                        key: tuple[str, int, int]) -> Iterator[bytes]:
        """`chunks`, noting when the first one arrives: a neighbor sends its header once it has
        the answer (its model published, its cross-gradient computed), so the time before it is
        the wait for that neighbor and the time after it the transfer."""
        first = True
        for chunk in chunks:
            if first:
                first = False
                with self._lock:
                    self._arrivals[key] = time.perf_counter()
            yield chunk

    def _to_device(self, tensors: list[torch.Tensor]) -> Params:
        """The one place received tensors (models, decompressed cross-gradients) move to the
        node's device: peer/wire decodes on the CPU, while under `--device auto` on a GPU host
        the node's parameters live on the GPU, and mixing and the QP must not combine the two.

        In place, one tensor at a time: each CPU buffer is released as soon as its copy is made,
        and none outlives this call. On a CPU node `.to` returns the tensor itself (no copy).
        """
        device = self.node.trainer.device
        for k, (t, own) in enumerate(zip(tensors, self.node.params, strict=True)):
            tensors[k] = t.to(device=device, dtype=own.dtype)  # check_header: dtype is own's
        return tensors

    def fetch_model(self, peer: int, round_: int, timeout: float | None = None) -> Params:
        """x_peer^round, validated against this node's model; fetched once per (peer, round):
        the round driver and a server thread answering that peer's ComputeCrossGradient may
        both need it at the same time, and share one transfer."""
        cached = self.node.neighbor_model(peer, round_)
        if cached is not None:
            return cached
        return self._shared(self._inflight, (peer, round_), f"model of round {round_} from "
                            f"node {peer}", lambda: self._fetch_model_now(peer, round_, timeout),
                            timeout, keep=False)  # the node remembers it (remember_model)

    def _shared(self, table: dict[tuple[int, int], futures.Future[T]], key: tuple[int, int],
                what: str, fetch: Callable[[], T], timeout: float | None, *, keep: bool) -> T:
        """fetch() once per key of `table`: a second caller while it runs waits for its result
        (a DeadlineExceeded naming `what` after `timeout`). A failure is forgotten (the next
        call fetches again); a result stays in `table` when `keep` (the caller prunes it)."""
        with self._lock:
            pending = table.get(key)
            owner = pending is None
            if pending is None:
                pending = table[key] = futures.Future()
        if not owner:
            try:
                return pending.result(timeout=timeout if timeout is not None else self.timeout)
            except futures.TimeoutError:
                raise DeadlineExceeded(f"{what}: the transfer already under way did not finish "
                                       "in time") from None
        try:
            value = fetch()
        except BaseException as exc:
            pending.set_exception(exc)
            with self._lock:
                table.pop(key, None)
            raise
        pending.set_result(value)
        if not keep:
            with self._lock:
                table.pop(key, None)
        return value

    def _fetch_model_now(self, peer: int, round_: int, timeout: float | None) -> Params:
        start = self._raw_stream(peer, "GetModel", peer_pb2.GetModelRequest.SerializeToString)
        request = peer_pb2.GetModelRequest(requester_id=self.node.id, round=round_)
        params = self._stream(peer, "model", round_, start, request, timeout).tensors
        self.node.remember_model(peer, round_, params)
        return params

    def _fetch_cross_gradient_stream(self, peer: int, round_: int,
                                     timeout: float | None) -> Decoded:
        start = self._raw_stream(peer, "ComputeCrossGradient",
                                 peer_pb2.CrossGradientRequest.SerializeToString)
        node = self.node
        digest = node.own_replica(round_).digest if node.replicas is not None else 0
        request = peer_pb2.CrossGradientRequest(requester_id=node.id, round=round_,
                                                replica_digest=digest)
        # the run's cross-gradient compressor, if any (error feedback, or EF21 / CLAG)
        compressor = (node.feedback.compressor if node.feedback is not None else
                      node.threepoint.compressor if node.threepoint is not None else None)
        return self._stream(peer, "cross_gradient", round_, start, request, timeout,
                            compressor, allow_skips=node.threepoint is not None)

    def fetch_cross_gradient(self, peer: int, round_: int, timeout: float | None = None) -> Params:
        """grad F_peer(x_me^round; B_peer^round), computed at the peer."""
        return self._fetch_cross_gradient_stream(peer, round_, timeout).tensors

    def fetch_estimate_update(self, peer: int, round_: int,
                              timeout: float | None = None) -> Update:
        """Under EF21 / CLAG: the peer's cross-gradient message for this node's estimates."""
        decoded = self._fetch_cross_gradient_stream(peer, round_, timeout)
        return Update(peer, round_, decoded.base_digest, decoded.tensors, decoded.crcs,
                      decoded.skipped)

    def fetch_model_update(self, peer: int, round_: int,
                           timeout: float | None = None) -> Update:
        """Under replicas: q_peer^round, decoded with the run's model compressor; fetched once
        (a failed fetch is forgotten, so that it can be retried)."""
        with self._lock:
            for old in [k for k in self._updates if k[1] < round_ - 2]:
                del self._updates[old]
        return self._shared(self._updates, (peer, round_), f"model update of round {round_} "
                            f"from node {peer}",
                            lambda: self._fetch_model_update_now(peer, round_, timeout),
                            timeout, keep=True)

    def _fetch_model_update_now(self, peer: int, round_: int, timeout: float | None) -> Update:
        replicas = self.node.replicas
        assert replicas is not None
        start = self._raw_stream(peer, "GetModelUpdate",
                                 peer_pb2.ModelUpdateRequest.SerializeToString)
        request = peer_pb2.ModelUpdateRequest(requester_id=self.node.id, round=round_)
        decoded = self._stream(peer, "model_update", round_, start, request, timeout,
                               replicas.compressor)
        return Update(peer, round_, decoded.base_digest, decoded.tensors, decoded.crcs)

    def _fetch_dense_state(self, peer: int, kind: str, method: str, round_: int,
                           request: Any, timeout: float | None) -> Replica:
        start = self._raw_stream(peer, method, type(request).SerializeToString)
        decoded = self._stream(peer, kind, round_, start, request, timeout)
        if decoded.base_digest == 0:
            raise InvalidMessage(f"{kind} of round {round_} from node {peer}: the stream "
                                 "names no digest (StreamHeader.base_digest)")
        return Replica(decoded.tensors, round_, decoded.base_digest)

    def fetch_replica(self, peer: int, round_: int, timeout: float | None = None) -> Replica:
        """Under replicas: the peer's dense replica at the start of round_, for a resync."""
        request = peer_pb2.ReplicaRequest(requester_id=self.node.id, round=round_)
        return self._fetch_dense_state(peer, "replica", "GetReplica", round_, request, timeout)

    def fetch_estimate(self, peer: int, round_: int, timeout: float | None = None) -> Replica:
        """Under EF21 / CLAG: the peer's dense estimates for this node after round_."""
        request = peer_pb2.EstimateRequest(requester_id=self.node.id, round=round_)
        return self._fetch_dense_state(peer, "estimate", "GetEstimate", round_, request,
                                       timeout)

    # ---- the Neighborhood interface ------------------------------------------------------
    def _gather(self, round_: int, neighbors: Sequence[int], kind: str,
                fetch: Callable[[int, int], T]) -> dict[int, T]:
        with self._lock:
            self._waiting = set(neighbors)
        started = time.perf_counter()
        ended: dict[int, float] = {}

        def timed(j: int) -> T:
            try:
                return fetch(j, round_)
            finally:
                ended[j] = time.perf_counter()

        jobs = {j: self._pool.submit(timed, j) for j in neighbors}
        for j, job in jobs.items():
            job.add_done_callback(partial(self._answered, j))
        out: dict[int, T] = {}
        for j, job in jobs.items():
            try:
                out[j] = job.result()
            except Exception as exc:  # a neighbor's answer must never end this node's round
                if not isinstance(exc, ProtocolError):
                    log.exception("node %d round %d: unexpected error on node %d's answer",
                                  self.node.id, round_, j)
                    exc = InvalidMessage(f"node {j}'s answer could not be used: "
                                         f"{type(exc).__name__}: {exc}")
                _, code = status_of(exc)
                self.misses.count(j, REJECTED_ANSWERS.get(code))
                log.warning("node %d round %d: %s", self.node.id, round_, exc)
        self._note_wait(started, kind, round_, ended)
        return out

    def _answered(self, peer: int, job: futures.Future[Any]) -> None:
        with self._lock:
            self._waiting.discard(peer)

    def waiting(self) -> list[int]:
        """Neighbors whose answer the round under way still waits for (PeerStatus.waiting_on)."""
        with self._lock:
            return sorted(self._waiting)

    def _note_wait(self, started: float, kind: str, round_: int,
                   ended: Mapping[int, float]) -> None:
        """The gather's wait: until the last neighbor's first message (a neighbor that never
        sent one, until its call ended; an answer already at hand, none)."""
        with self._lock:
            ready = [min(max(self._arrivals.pop((kind, j, round_), started), started), end)
                     for j, end in ended.items()]
            for key in [k for k in self._arrivals if k[2] < round_]:
                del self._arrivals[key]  # fetched for a server thread, never gathered
            self._last_ready = max(ready, default=started)
            self._last_wait = self._last_ready - started

    def wait_seconds(self) -> float | None:
        """Of the last models() or cross_gradients() call, the seconds before the last
        neighbor's first message (peer/rounds.py, RoundPhases)."""
        with self._lock:
            return self._last_wait

    def models(self, round_: int, neighbors: Sequence[int]) -> dict[int, Params]:
        """x_j^round from each neighbor; starts the round's deadline (see cross_gradients).

        Each model, as it arrives, starts the node computing that neighbor's cross-gradient
        (Node.prepare_cross_gradient); once all are in, the next round's are prefetched."""
        with self._lock:
            self._round_deadline = (round_, time.monotonic() + self.timeout)

        def fetch(peer: int, r: int) -> Params:
            params = self.fetch_model(peer, r)
            self.node.prepare_cross_gradient(peer, r, params)
            return params

        out = self._gather(round_, neighbors, "model", fetch)
        self._prefetch(round_ + 1, sorted(out))
        return out

    def _prefetch(self, round_: int, neighbors: Sequence[int]) -> None:
        """Fetch x_j^round of each neighbor in the background: a neighbor's server answers as
        soon as it publishes it, while this node may still be in its round before, and this
        node starts on that neighbor's cross-gradient of round at once. Not across
        an announced change of neighbors, nor past prefetch_until. A failure is forgotten: the
        round fetches again (and a dead neighbor still costs it at most its deadline)."""
        last = self.prefetch_until
        if last is None or round_ > last or self.node.upcoming:
            return
        for j in neighbors:
            if self.node.neighbor_model(j, round_) is None:
                self._prefetcher.submit(self._prefetch_one, j, round_)

    def _prefetch_one(self, peer: int, round_: int) -> None:
        try:
            params = self.fetch_model(peer, round_)
            self.node.prepare_cross_gradient(peer, round_, params)
        except Exception as exc:  # the round's own fetch tries again, and reports it
            log.debug("node %d: prefetching node %d's model of round %d: %s", self.node.id,
                      peer, round_, exc)

    def cross_gradients(self, round_: int, neighbors: Sequence[int]) -> dict[int, Params]:
        """g_ij from each neighbor, within what is left of the round's deadline: a neighbor
        that sent its model just in time and then stalls must not cost a second deadline."""
        with self._lock:
            started_round, deadline = self._round_deadline
        left = deadline - time.monotonic() if started_round == round_ else self.timeout

        def fetch(peer: int, r: int) -> Params:
            if left <= 0:
                raise DeadlineExceeded(f"cross-gradient of round {r} from node {peer}: the "
                                       f"round's deadline ({self.timeout:g} s) passed while "
                                       "its models were fetched")
            return self.fetch_cross_gradient(peer, r, left)

        return self._gather(round_, neighbors, "cross_gradient", fetch)

    def start_cross_gradients(self, round_: int, neighbors: Sequence[int],
                              ) -> futures.Future[dict[int, Params]]:
        """cross_gradients in the background: the round asks while it computes its own
        gradient, and the answers cross the wire meanwhile (Node.run_round)."""
        return self._asker.submit(self.cross_gradients, round_, neighbors)

    def last_ready(self) -> float:
        """When (time.perf_counter) the last neighbor of the last gather began to answer."""
        with self._lock:
            return self._last_ready

    def estimate_updates(self, round_: int, neighbors: Sequence[int]) -> dict[int, Update]:
        """Under EF21 / CLAG: cross_gradients, as the messages for this node's estimates."""
        with self._lock:
            started_round, deadline = self._round_deadline
        left = deadline - time.monotonic() if started_round == round_ else self.timeout

        def fetch(peer: int, r: int) -> Update:
            if left <= 0:
                raise DeadlineExceeded(f"cross-gradient of round {r} from node {peer}: the "
                                       f"round's deadline ({self.timeout:g} s) has passed")
            return self.fetch_estimate_update(peer, r, left)

        return self._gather(round_, neighbors, "cross_gradient", fetch)

    # ---- state both ends hold: one neighbor at a time, or all at once (peer/replicas.py) -----
    def _each(self, round_: int, neighbors: Sequence[int], fetch: Callable[[int, int], T],
              ) -> dict[int, T]:
        """fetch(j, round_) for every neighbor, in parallel; the ones that failed are logged,
        counted and absent. Called from the round driver and from server threads alike, so
        it leaves the round's bookkeeping (waiting, the wait phase) alone."""
        jobs = {j: self._pool.submit(fetch, j, round_) for j in neighbors}
        out: dict[int, T] = {}
        for j, job in jobs.items():
            try:
                out[j] = job.result()
            except ProtocolError as exc:
                _, code = status_of(exc)
                self.misses.count(j, REJECTED_ANSWERS.get(code))
                log.warning("node %d round %d: %s", self.node.id, round_, exc)
        return out

    def model_updates(self, round_: int, neighbors: Sequence[int]) -> dict[int, Update]:
        return self._each(round_, neighbors, self.fetch_model_update)

    def replicas(self, round_: int, neighbors: Sequence[int]) -> dict[int, Replica]:
        return self._each(round_, neighbors, self.fetch_replica)

    def estimates(self, round_: int, neighbors: Sequence[int]) -> dict[int, Replica]:
        return self._each(round_, neighbors, self.fetch_estimate)

    def status(self, peer: int, timeout: float = 5.0) -> peer_pb2.PeerStatus:
        request = peer_pb2.GetStatusRequest(requester=f"node {self.node.id}")
        try:
            return self.stub(peer).GetStatus(request, timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err, f"GetStatus of node {peer}") from None

    def close(self) -> None:
        for pool in (self._pool, self._prefetcher, self._asker):
            pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()

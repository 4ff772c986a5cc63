"""The one server factory, the one channel factory, and the one mapping of errors to status codes.

Every crossgrad process is a long-lived gRPC server (a peer or the bootstrap) and a client of
others. What they share about the transport lives here, so that every server gets the same
message limits, keepalive policy, health service and reflection, and every channel the same
limits and a keepalive that the servers permit (docs/architecture.md, "The contract" and
"Faults"; docs/conventions.md, "One server factory, one channel factory"):

    server = make_server("0.0.0.0:50051",
                         [Service("crossgrad.v1.Peer", lambda s: add_PeerServicer_to_server(p, s))])
    ...                          # load the checkpoint, join the bootstrap: health says NOT_SERVING
    server.set_serving()         # now neighbors and `grpcurl` health checks see SERVING
    install_signal_handlers(stop_event.set)
    ...
    server.stop(grace=5.0)       # NOT_SERVING first, then drain in-flight calls

Two kinds of server, one interface (RunningServer). make_server is grpc's synchronous server, a
thread per call, for the peers: their streams compute and send, and a thread each is what they
cost anyway. make_aio_server is the same server on grpc.aio, one event loop in a thread of its
own, for the bootstrap, whose streams (a WatchAssignment per node, a thousand of them) mostly
wait: there a thread per stream cost the heartbeats a second at every epoch change
(docs/benchmarks.md, "Busy bootstrap"). Both get the same options, gate (crossgrad/guard.py),
malformed-request check, stream limit, health, reflection and error translation: the decisions
are made once, in code both share, and only how a call is ended differs (context.abort, or
`await context.abort`; guard.Abort carries the decision).

Errors cross the wire at one boundary each way (docs/conventions.md, "One exception tree, one
mapping to status codes"). Servicer methods raise the ProtocolError classes of crossgrad.errors;
`translate_errors` (`translate_errors_async` on grpc.aio) turns them into status codes with the
table STATUS, and anything unexpected into INTERNAL. Clients turn a grpc.RpcError back into the
same classes with `from_rpc_error`. Two classes share FAILED_PRECONDITION (StaleRound, NotReady),
so the server also names the class in the trailing metadata key ERROR_CLASS_KEY; a client trusts
that name only when it agrees with the status code.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from types import FrameType
from typing import Any, TypeVar, cast

import grpc
import grpc.aio
from google.protobuf import descriptor_pool
from grpc_health.v1 import _async as aio_health
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from crossgrad import guard
from crossgrad.errors import (
    AlreadyExists,
    ConfigError,
    DeadlineExceeded,
    InvalidMessage,
    NotANeighbor,
    NotFound,
    NotReady,
    PermissionDenied,
    ProtocolError,
    StaleRound,
    TooLarge,
    TruncatedStream,
    Unauthenticated,
    Unavailable,
)
from crossgrad.security import Security

log = logging.getLogger(__name__)

# Send and receive limit of every message. Tensors are streamed in DEFAULT_CHUNK_BYTES pieces,
# so the limit only bounds what one malformed or hostile message can make a node allocate.
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
DEFAULT_CHUNK_BYTES = 1 << 20
# Receive limit of one whole tensor stream (a model or a cross-gradient), checked against the
# size its header declares, before any tensor is allocated: it bounds what a neighbor can make
# this node allocate for one answer. A dense stream is exactly as large as the node's own model
# (the header must match it, peer/wire.py), so the limit only has to sit above the largest model
# a run will use: 8 GiB lets a 2 GB float32 model (500M parameters) and its cross-gradients
# through with room to spare, and stays below what one answer should ever take of a host's
# memory. A larger model needs a larger limit on every node (--max-model-bytes).
DEFAULT_MAX_MODEL_BYTES = 8 << 30

# Keepalive: a neighbor that vanishes without closing its connection (power loss, a network
# partition) is noticed within time + timeout on an idle connection, not only at the next
# deadline. Clients ping more often than servers but never more often than servers accept
# (CLIENT_KEEPALIVE_TIME_MS >= SERVER_MIN_PING_INTERVAL_MS), or a server would answer GOAWAY
# "too_many_pings" and drop the connection.
SERVER_KEEPALIVE_TIME_MS = 60_000
SERVER_KEEPALIVE_TIMEOUT_MS = 20_000
SERVER_MIN_PING_INTERVAL_MS = 10_000
CLIENT_KEEPALIVE_TIME_MS = 30_000
CLIENT_KEEPALIVE_TIMEOUT_MS = 10_000

MAX_RECONNECT_BACKOFF_MS = 1_000
# Threads of every server's pool that streams may not take. A stream holds its thread for as
# long as it lasts: a GetModel waiting for the next round to be published, a cross-gradient
# being computed, a Health/Watch for the whole run. (The bootstrap's WatchAssignment streams are
# coroutines of make_aio_server, which holds no thread per call.) If streams could take
# every thread, health checks, GetStatus and heartbeats would queue behind them for seconds
# (a node with 8 neighbors serves 16 streams each round); with this many kept, a unary call
# always finds a thread (tests/rpc/test_liveness_rpc.py, docs/benchmarks.md "Liveness").
RESERVED_UNARY_WORKERS = 8
# Threads of a server's pool by default: up to 56 streams at once. Threads start only when
# calls need them, so a generous pool costs nothing on a quiet node.
DEFAULT_MAX_WORKERS = 64

# Trailing metadata naming the ProtocolError class of a failed call (lower case: HTTP/2 header).
ERROR_CLASS_KEY = "crossgrad-error"
# Status details travel in a trailer; a bounded length keeps them under the metadata limits.
MAX_DETAILS_CHARS = 2000

STATUS: dict[type[ProtocolError], grpc.StatusCode] = {
    InvalidMessage: grpc.StatusCode.INVALID_ARGUMENT,
    TruncatedStream: grpc.StatusCode.DATA_LOSS,
    TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    StaleRound: grpc.StatusCode.FAILED_PRECONDITION,
    NotReady: grpc.StatusCode.FAILED_PRECONDITION,
    NotANeighbor: grpc.StatusCode.PERMISSION_DENIED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# Client side: the class for each code. The codes no crossgrad server sends on purpose mean the
# call did not get through (a crashed or draining node, a broken connection, another version of
# the contract): the round logic treats them all as an unavailable neighbor.
_CLASS_OF_CODE: dict[grpc.StatusCode, type[ProtocolError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidMessage,
    grpc.StatusCode.OUT_OF_RANGE: InvalidMessage,
    grpc.StatusCode.DATA_LOSS: TruncatedStream,
    grpc.StatusCode.RESOURCE_EXHAUSTED: TooLarge,
    grpc.StatusCode.FAILED_PRECONDITION: StaleRound,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}
_HINTS: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.UNAVAILABLE: " (is the node running and reachable at that address? With TLS: "
                                 "do both sides use certificates of the same CA, and does this "
                                 "side present one where the server requires it?)",
    grpc.StatusCode.UNIMPLEMENTED: " (does the node run the same crossgrad.v1 contract?)",
    grpc.StatusCode.RESOURCE_EXHAUSTED: " (over a limit of the server: see its message)",
}
_UNSPECIFIED_HOSTS = ("0.0.0.0", "[::]", "::", "*")

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


@dataclass(frozen=True)
class Service:
    """One service a server offers: its full name (for health and reflection) and how to add it.

    `register` is the generated add_*Servicer_to_server bound to a servicer, e.g.
    `lambda s: peer_pb2_grpc.add_PeerServicer_to_server(servicer, s)`.
    """

    name: str
    register: Callable[[grpc.Server], None]


class RunningServer:
    """A started server: its bound port, a local address to reach it, its health, a clean stop.

    Health starts NOT_SERVING for "" and every service, because a node that is still loading its
    checkpoint or joining the bootstrap must not be picked by a health check or a neighbor.
    This one is a synchronous server (a thread pool, make_server); AioRunningServer has the same
    interface over grpc.aio (make_aio_server).
    """

    def __init__(self, server: grpc.Server, executor: futures.ThreadPoolExecutor | None,
                 port: int, address: str, health_servicer: health.HealthServicer,
                 service_names: Sequence[str], security: Security,
                 refusals: guard.Refusals) -> None:
        self._server = server
        self._executor = executor
        self.port = port
        self.address = address
        self.health = health_servicer
        self.service_names = tuple(service_names)
        self.security = security
        self.refusals = refusals  # calls refused (auth, limits), by status code name

    def set_serving(self, serving: bool = True) -> None:
        """Report SERVING (or NOT_SERVING) for the server ("") and every service at once."""
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        self._set_health(("", *self.service_names), status)
        log.info("server at %s is %s", self.address, "serving" if serving else "not serving")

    def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, then let in-flight calls finish for up to `grace` seconds.

        Health goes first so that watchers (neighbors, orchestrators) learn of the drain while
        the server still answers. enter_graceful_shutdown also ignores any later set_serving(),
        so a round driver racing with the stop cannot flip health back to SERVING.
        """
        self._enter_graceful_shutdown()
        log.info("stopping server at %s (grace %.1f s)", self.address, grace)
        self._shutdown(grace)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server stops; True if `timeout` passed first (grpc's convention)."""
        return bool(self._server.wait_for_termination(timeout))

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # the mechanics, which AioRunningServer does on its event loop

    def _set_health(self, names: Sequence[str], status: int) -> None:
        for name in names:
            self.health.set(name, status)

    def _enter_graceful_shutdown(self) -> None:
        self.health.enter_graceful_shutdown()

    def _shutdown(self, grace: float) -> None:
        self._server.stop(grace).wait()
        if self._executor is not None:
            self._executor.shutdown(wait=False)


class EventLoopThread:
    """An asyncio event loop running in a daemon thread of its own, for a grpc.aio server
    behind a synchronous interface: `run` a coroutine on it from any other thread and wait
    for its result, `call_soon` a function on it from any thread, `close` it once."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._closing = False
        self._lock = threading.Lock()  # no coroutine is handed to a loop that is stopping
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:  # what asyncio.run does at the end: nothing is left pending, nobody waits
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    @property
    def closed(self) -> bool:
        return self._closing

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coroutine` on the loop and return its result (raise its exception); from any
        thread but the loop's own. RuntimeError once the loop is closed."""
        with self._lock:
            if self._closing or threading.current_thread() is self._thread:
                coroutine.close()
                raise RuntimeError("the event loop is closed" if self._closing else
                                   "EventLoopThread.run on its own loop would wait for itself")
            future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def call_soon(self, callback: Callable[[], object]) -> bool:
        """call_soon(self.loop, callback)."""
        return call_soon(self.loop, callback)

    def close(self) -> None:
        """Stop the loop (cancelling what is left on it) and wait for its thread to end."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()


def call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> bool:
    """Call `callback` on `loop`, soon, from any thread; False (and nothing called) once the
    loop is closed, so a thread that outlives a server's loop may still notify it."""
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:  # the loop is closed
        return False
    return True


class AioRunningServer(RunningServer):
    """RunningServer over a grpc.aio server whose event loop runs in a thread of its own
    (EventLoopThread): health, stop and wait_for_termination are callable from any thread, and
    run their part on the loop. `loop` is that thread, for a servicer that needs it."""

    def __init__(self, server: grpc.aio.Server, loop: EventLoopThread, port: int, address: str,
                 health_servicer: aio_health.HealthServicer, service_names: Sequence[str],
                 security: Security, refusals: guard.Refusals) -> None:
        super().__init__(server, None, port, address, health_servicer, service_names, security,
                         refusals)
        self.loop = loop
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    def stop(self, grace: float = 5.0) -> None:
        """As RunningServer.stop; once stopped, the event loop is closed: a second stop does
        nothing."""
        with self._stop_lock:
            if not self._stopped.is_set():
                super().stop(grace)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return not self._stopped.wait(timeout)

    def __enter__(self) -> AioRunningServer:
        return self

    def _set_health(self, names: Sequence[str], status: int) -> None:
        async def set_all() -> None:
            for name in names:
                await self.health.set(name, status)
        try:
            self.loop.run(set_all())
        except RuntimeError:
            if not self.loop.closed:
                raise  # a stopped server stays NOT_SERVING, as RunningServer's: nothing to do

    def _enter_graceful_shutdown(self) -> None:
        self.loop.run(self.health.enter_graceful_shutdown())

    def _shutdown(self, grace: float) -> None:
        try:
            self.loop.run(self._server.stop(grace))
        finally:
            self.loop.close()
            self._stopped.set()


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """The channel arguments of every crossgrad server."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", SERVER_KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        # The name grpc reads (GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS). Under any
        # other name grpc keeps its 5-minute default, counts each 30 s client ping as a strike
        # and, after two, closes the connection with GOAWAY "too_many_pings": every stream that
        # stays quiet for 90 s (a WatchAssignment while the run assembles) would die with it.
        ("grpc.http2.min_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_pings_without_data", 0),
        # Off, so that a second server on a taken port fails loudly instead of sharing it.
        ("grpc.so_reuseport", 0),
    ]


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """The channel arguments of every crossgrad client channel."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", CLIENT_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", CLIENT_KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # The round logic decides what a failed call means (leave the neighbor out, retry next
        # round); transparent retries would hide failures and double its deadlines.
        ("grpc.enable_retries", 0),
        # After a peer or the bootstrap was down, grpc's reconnect backoff grows to 120 s by
        # default: a bootstrap back after 20 s could then be reached a lease too late (every
        # peer expired), a returning neighbor rounds too late. Capped well below a lease.
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]


class _Malformed:
    """Stands in for a request that did not parse, so the handler can answer it properly."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class _RejectMalformedRequests(guard.Interceptor):
    """A request that is not valid protobuf gets INVALID_ARGUMENT (peer.proto), not grpc's
    default INTERNAL "Exception deserializing request!", and the method never sees it. On a
    request stream (the bootstrap's Heartbeats) the first such message ends the call the same
    way: the check raises inside the method's loop over its requests, and translate_errors
    answers the Abort."""

    def rewrap(self, handler: Any, details: grpc.HandlerCallDetails, *, aio: bool) -> Any:
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        method = getattr(details, "method", "?")

        def deserialize(raw: bytes) -> Any:
            try:
                return parse(raw)
            except Exception as exc:  # protobuf raises DecodeError and friends
                return _Malformed(exc)

        def check(request: Any) -> Any:
            if isinstance(request, _Malformed):
                log.info("%s: rejected a request that is not valid protobuf (%s)", method,
                         request.error)
                raise guard.Abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"the request to {method} is not a valid protobuf message "
                                  f"({type(request.error).__name__}); use the crossgrad.v1 "
                                  "messages (grpcurl: describe the method)")
            return request

        if handler.request_streaming:
            return _checked_request_stream(handler, check, deserialize, aio=aio)

        @contextlib.contextmanager
        def parsed(request: Any, context: grpc.ServicerContext) -> Iterator[None]:
            check(request)
            yield

        return guard.wrap_handler(handler, parsed, aio=aio, request_deserializer=deserialize)


def _checked_request_stream(handler: Any, check: Callable[[Any], Any],
                            deserialize: Callable[[bytes], Any], *, aio: bool) -> Any:
    """`handler` (request-streaming) whose method iterates its requests through `check`."""
    serializers = {"request_deserializer": deserialize,
                   "response_serializer": handler.response_serializer}
    behavior = handler.stream_stream or handler.stream_unary
    if aio:
        async def checked_async(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for request in requests:
                yield check(request)

        if inspect.isasyncgenfunction(behavior):
            async def generated(requests: Any, context: grpc.aio.ServicerContext
                                ) -> AsyncIterator[Any]:
                async for item in behavior(checked_async(requests), context):
                    yield item
            wrapped: Callable[..., Any] = generated
        else:
            async def awaited(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                return await behavior(checked_async(requests), context)
            wrapped = awaited
    else:
        def plain(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            return behavior((check(request) for request in requests), context)
        wrapped = plain
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(wrapped, **serializers)
    return grpc.stream_unary_rpc_method_handler(wrapped, **serializers)


def _stream_limit(limit: int) -> guard.GuardInterceptor:
    """At most `limit` streams (request- or response-streaming calls) at once.

    On a synchronous server each holds a thread: the pool's other threads are then free for
    unary calls whatever the streams do. A stream over the limit is answered UNAVAILABLE at
    once: queued, it would wait for a stream to end, which may be the whole run, and its
    caller's deadline would pass anyway.
    """
    slots = threading.BoundedSemaphore(limit)

    @contextlib.contextmanager
    def admit(context: grpc.ServicerContext, method: str, stream: bool) -> Iterator[None]:
        if not stream:
            yield
            return
        if not slots.acquire(blocking=False):
            log.warning("%s: refused a stream: %d streams in flight already", method, limit)
            raise guard.Abort(grpc.StatusCode.UNAVAILABLE,
                              f"{method}: this server already serves {limit} streams, its "
                              "limit; retry when one ends")
        try:
            yield
        finally:
            slots.release()

    return guard.GuardInterceptor(admit)


def _interceptors(security: Security, limits: guard.CallerLimits | None,
                  refusals: guard.Refusals, streams: int) -> list[guard.Interceptor]:
    """What every server puts in front of its services, outermost first: the gate of
    crossgrad/guard.py, the malformed-request check, the stream limit."""
    gate: list[guard.Interceptor] = [guard.accounting(refusals),
                                     guard.caller_limits(limits or guard.CallerLimits())]
    if not security.insecure:
        gate.append(guard.authentication(security))
    return [*gate, _RejectMalformedRequests(), _stream_limit(streams)]


def _check_services(services: Sequence[Service]) -> list[str]:
    """The services' names, each a service of the default descriptor pool (ConfigError)."""
    names = [service.name for service in services]
    for name in names:
        try:
            descriptor_pool.Default().FindServiceByName(name)
        except KeyError:
            raise ConfigError(f"service {name!r} is not a known gRPC service; give its full "
                              f"name (e.g. 'crossgrad.v1.Peer') and import its generated "
                              f"module") from None
    return names


def _register(server: Any, services: Sequence[Service], health_servicer: Any) -> None:
    """The services, health and reflection, on a synchronous or a grpc.aio server."""
    for service in services:
        service.register(server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*(s.name for s in services), health.SERVICE_NAME, reflection.SERVICE_NAME), server)


def _bind(server: Any, bind: str, security: Security) -> int:
    """Listen on `bind` with `security`'s credentials; the port (ConfigError if none)."""
    reason = "no port bound"
    credentials = security.server_credentials()
    try:
        port = (server.add_insecure_port(bind) if credentials is None
                else server.add_secure_port(bind, credentials))
    except RuntimeError as exc:  # recent grpc raises; older versions returned 0
        port, reason = 0, str(exc)
    if not port:
        raise ConfigError(f"cannot listen on {bind}: the port is taken or the host is not an "
                          f"address of this machine (grpc: {reason.rstrip('.')}). Pick a free "
                          f"port, or port 0 for any free one")
    return int(port)


def _started(running: RunningServer, bind: str, host: str) -> RunningServer:
    running.refusals.server = f"server at {host}:{running.port}"
    log.info("listening on %s (%s), services %s; %s", bind, running.address,
             ", ".join(running.service_names) or "-", running.security.describe())
    return running


def _local_address(host: str, port: int) -> str:
    return f"{'127.0.0.1' if host in _UNSPECIFIED_HOSTS else host}:{port}"


def make_server(bind: str, services: Sequence[Service], *,
                max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                max_workers: int = DEFAULT_MAX_WORKERS,
                security: Security | None = None,
                limits: guard.CallerLimits | None = None) -> RunningServer:
    """Start a server on `bind` ("127.0.0.1:0", "0.0.0.0:50051") with health and reflection.

    The pool has `max_workers` threads, of which streams may hold at most
    `max_workers - RESERVED_UNARY_WORKERS`: one stream more is answered UNAVAILABLE at once
    rather than queued, and unary calls never wait behind streams.

    `security` decides the transport (crossgrad/security.py): TLS or mutual TLS, the token,
    or plaintext. None is plaintext, for in-process tests only: the commands always pass the
    Security the user chose (`--insecure` is never implied). Every call then passes the gate of
    crossgrad/guard.py: authentication, the per-caller `limits` (default CallerLimits()), and
    the count of refusals in `RunningServer.refusals`.

    Raises ConfigError for a malformed bind address, an unknown service name, a pool with no
    room for streams, or a port that cannot be bound.
    """
    host = _host_of(bind)
    _check_message_bytes(max_message_bytes)
    if max_workers <= RESERVED_UNARY_WORKERS:
        raise ConfigError(f"max_workers must exceed the {RESERVED_UNARY_WORKERS} threads kept "
                          f"for unary calls, so that streams get some; got {max_workers}")
    names = _check_services(services)
    security = security or Security.plaintext()
    refusals = guard.Refusals(f"server at {bind}")
    executor = futures.ThreadPoolExecutor(max_workers, thread_name_prefix="crossgrad-rpc")
    server = grpc.server(executor, options=server_options(max_message_bytes),
                         interceptors=_interceptors(security, limits, refusals,
                                                    max_workers - RESERVED_UNARY_WORKERS))
    health_servicer = health.HealthServicer()
    for name in ("", *names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    _register(server, services, health_servicer)
    try:
        port = _bind(server, bind, security)
    except ConfigError:
        executor.shutdown(wait=False)
        raise
    server.start()
    return _started(RunningServer(server, executor, port, _local_address(host, port),
                                  health_servicer, names, security, refusals), bind, host)


def make_aio_server(bind: str, services: Sequence[Service], *,
                    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                    max_streams: int = DEFAULT_MAX_WORKERS - RESERVED_UNARY_WORKERS,
                    security: Security | None = None,
                    limits: guard.CallerLimits | None = None) -> AioRunningServer:
    """make_server on grpc.aio: the same options, gate, health, reflection and errors, served
    by one event loop in a daemon thread of its own instead of a thread per call.

    For a server whose streams mostly wait (the bootstrap's WatchAssignment, one per node): a
    waiting stream is a suspended coroutine, not a thread, and waking a thousand of them is a
    thousand callbacks on one loop, not a thousand threads contending for the GIL. Its methods
    must be coroutine (or async generator) functions (translate_errors_async), and must not
    block the loop for long. Each `Service.register` runs on that loop, so a servicer may take
    its loop there (asyncio.get_running_loop()).

    At most `max_streams` streams are served at once (one more is answered UNAVAILABLE); with
    no thread per stream this only bounds what the streams may hold. The returned server has
    RunningServer's interface, callable from any thread.

    Raises ConfigError as make_server.
    """
    host = _host_of(bind)
    _check_message_bytes(max_message_bytes)
    if max_streams < 1:
        raise ConfigError(f"max_streams must be positive; got {max_streams}")
    names = _check_services(services)
    security = security or Security.plaintext()
    refusals = guard.Refusals(f"server at {bind}")
    interceptors = [guard.AioInterceptor(interceptor) for interceptor
                    in _interceptors(security, limits, refusals, max_streams)]

    async def start() -> tuple[grpc.aio.Server, aio_health.HealthServicer, int]:
        server = grpc.aio.server(options=server_options(max_message_bytes),
                                 interceptors=interceptors)
        health_servicer = aio_health.HealthServicer()
        for name in ("", *names):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        _register(server, services, health_servicer)
        port = _bind(server, bind, security)
        await server.start()
        return server, health_servicer, port

    loop = EventLoopThread(f"crossgrad-aio-{bind}")
    try:
        server, health_servicer, port = loop.run(start())
    except BaseException:
        loop.close()
        raise
    return cast(AioRunningServer, _started(
        AioRunningServer(server, loop, port, _local_address(host, port), health_servicer, names,
                         security, refusals), bind, host))


def make_channel(address: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 security: Security | None = None, server_name: str | None = None
                 ) -> grpc.Channel:
    """A channel to `address` (host:port) with crossgrad's limits and keepalive.

    With TLS (`security`, crossgrad/security.py) the server's certificate must be signed by the
    CA and name `server_name` (a node's is node-ID.crossgrad, the bootstrap's
    bootstrap.crossgrad, whatever address they are reached at), or, without one, the host of
    `address`. None is plaintext, for in-process tests: commands pass what the user chose.
    """
    options: list[tuple[str, int | str]] = [*channel_options(max_message_bytes)]
    credentials = (security or Security.plaintext()).channel_credentials()
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(address, credentials, options=options)


def status_of(exc: ProtocolError) -> tuple[type[ProtocolError], grpc.StatusCode]:
    """The table class `exc` is an instance of, and its code (UNKNOWN for a bare ProtocolError)."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return cls, STATUS[cls]
    return ProtocolError, grpc.StatusCode.UNKNOWN


def translate_errors(method: F) -> F:
    """Decorate a servicer method (unary or server-streaming) so errors become status codes.

    ProtocolError -> its STATUS code, ConfigError -> INVALID_ARGUMENT, anything else ->
    INTERNAL with a short message, the traceback going to the log: a bad request must never
    take the node down or leak its internals to a peer. A call the method already aborted with
    context.abort keeps its code. The context is the method's last positional argument (or
    `context=`), as grpc calls it. For a grpc.aio servicer: translate_errors_async.
    """
    where = method.__qualname__
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from method(*args, **kwargs)
            except Exception as exc:
                context = _context_of(args, kwargs)
                _translation(context, exc, where).end(context)
        return cast(F, stream)

    @functools.wraps(method)
    def unary(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except Exception as exc:
            context = _context_of(args, kwargs)
            _translation(context, exc, where).end(context)
    return cast(F, unary)


def translate_errors_async(method: F) -> F:
    """translate_errors for a grpc.aio servicer's coroutine method (unary, or a stream that
    writes with `await context.write`): the same codes, details and trailers, answered with
    `await context.abort`. A cancelled call (its client gone) is no error: it is left alone."""
    if not inspect.iscoroutinefunction(method):
        raise TypeError(f"translate_errors_async: {method.__qualname__} is not a coroutine "
                        "function (async def); a synchronous servicer takes translate_errors")
    where = method.__qualname__

    @functools.wraps(method)
    async def awaited(*args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        except Exception as exc:
            context = _context_of(args, kwargs)
            await _translation(context, exc, where).end_async(context)
    return cast(F, awaited)


def from_rpc_error(err: grpc.RpcError, what: str) -> ProtocolError:
    """The ProtocolError for a failed call; `what` names it ("GetModel from node 3 at HOST:PORT").

    Raise it `from err`. UNAVAILABLE, CANCELLED, UNKNOWN, INTERNAL and any code no crossgrad
    server sends on purpose become Unavailable: the call did not get a usable answer.
    """
    code = _call_attr(err, "code") or grpc.StatusCode.UNKNOWN
    details = _call_attr(err, "details") or "no details"
    cls = _CLASS_OF_CODE.get(code, Unavailable)
    named = dict(_call_attr(err, "trailing_metadata") or ()).get(ERROR_CLASS_KEY)
    for candidate, candidate_code in STATUS.items():
        if candidate.__name__ == named and candidate_code == code:
            cls = candidate
    return cls(f"{what} failed with {code.name}: {details}{_HINTS.get(code, '')}")


def install_signal_handlers(on_stop: Callable[[], None]) -> None:
    """Call `on_stop` once on the first SIGTERM or SIGINT, to drain instead of dying mid-round.

    After the first signal SIGINT gets its previous handler back, so a second Ctrl-C interrupts
    a drain that hangs. `on_stop` runs in the main thread between two bytecodes, so it should
    only set an event. Python lets only the main thread install handlers: RuntimeError otherwise.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_signal_handlers must be called from the main thread")
    previous_sigint = signal.getsignal(signal.SIGINT)
    stopping = threading.Event()

    def handle(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stopping.is_set():
            log.warning("%s again: already stopping", name)
            return
        stopping.set()
        signal.signal(signal.SIGINT,
                      previous_sigint if previous_sigint is not None else signal.SIG_DFL)
        log.warning("%s: stopping (a second SIGINT interrupts)", name)
        on_stop()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def _translation(context: grpc.ServicerContext, exc: Exception, where: str) -> guard.Abort:
    """How translate_errors ends a call whose method raised `exc`, logged; re-raises `exc` for a
    call the method aborted itself (context.abort), which keeps its code and details."""
    if isinstance(exc, guard.Abort):  # the method's own refusal (a stream over its rate)
        log.info("%s refused a call: %s", where, exc)
        return exc
    if isinstance(exc, ProtocolError):
        cls, code = status_of(exc)
        log.info("%s rejected a call: %s: %s", where, code.name, exc)
        metadata = tuple(context.trailing_metadata() or ())
        return guard.Abort(code, _bounded(str(exc)),
                           (*metadata, (ERROR_CLASS_KEY, cls.__name__)))
    if isinstance(exc, ConfigError):
        log.info("%s rejected a call: INVALID_ARGUMENT: %s", where, exc)
        return guard.Abort(grpc.StatusCode.INVALID_ARGUMENT, _bounded(str(exc)))
    if isinstance(exc, grpc.aio.AbortError) or context.code() not in (None, grpc.StatusCode.OK):
        raise exc  # the method called context.abort itself: keep its code and details
    log.error("unexpected error in %s", where, exc_info=exc)
    return guard.Abort(grpc.StatusCode.INTERNAL,
                       f"internal error in {where} ({type(exc).__name__}); the server logged "
                       f"it and keeps serving")


def _context_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> grpc.ServicerContext:
    if "context" in kwargs:
        return kwargs["context"]
    if not args:
        raise TypeError("translate_errors: the decorated method got no context argument")
    return args[-1]


def _call_attr(err: grpc.RpcError, name: str) -> Any:
    """err.code() and friends: grpc.RpcError declares none of them, grpc's call errors have all."""
    getter = getattr(err, name, None)
    return getter() if callable(getter) else None


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_DETAILS_CHARS else text[: MAX_DETAILS_CHARS - 3] + "..."


def _check_message_bytes(max_message_bytes: int) -> None:
    if max_message_bytes <= 0:
        raise ConfigError(f"max_message_bytes must be positive, got {max_message_bytes}")


def _host_of(bind: str) -> str:
    host, sep, port = bind.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"bind address {bind!r} is not HOST:PORT; e.g. 127.0.0.1:0 (any free "
                          f"port, local only) or 0.0.0.0:50051 (every interface)")
    return host

"""The gate in front of every crossgrad server: who may call, how much, and what was refused.

crossgrad.rpc.make_server (and make_aio_server) puts three interceptors in front of the services,
outermost first:

    Accounting     every refusal (UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED), wherever
                   it was decided (here or in a servicer), gets one log line and a count in
                   `Refusals`, which GetStatus and ListPeers report
    CallerLimits   per caller: requests per second (a token bucket) and concurrent streams;
                   excess is RESOURCE_EXHAUSTED with a retry hint
    Authenticate   with TLS, a call must come with a certificate naming a crossgrad identity
                   (mutual TLS) and/or the shared token; health and reflection stay open

What a servicer may do with whom (GetModel only for the caller's neighbors, Join only under the
caller's own id) is decided in the servicers, with the identity from crossgrad.security.caller_of.
A TLS handshake that fails (a certificate from another CA, no client certificate where mutual TLS
is on, a plaintext client) never becomes a call: grpc refuses the connection and logs it itself.

One gate for both kinds of server. A guard decides, as a context manager around the call, and
refuses by raising Abort (code, details, trailers); it never touches the transport. Only the
mechanics differ: on a synchronous server (the peers) an Interceptor answers an Abort with
context.abort around a function or generator; on a grpc.aio server (the bootstrap), wrapped in
AioInterceptor, with `await context.abort` around a coroutine or async generator.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import grpc.aio

from crossgrad.errors import ConfigError
from crossgrad.security import Caller, CallerKind, Security, caller_of

log = logging.getLogger(__name__)

# Calls any caller who completed the handshake may make: orchestrators' probes and grpcurl.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
           grpc.StatusCode.RESOURCE_EXHAUSTED)
# The standard trailer telling a client how long to wait before it retries (gRPC A6).
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
# Callers not seen for this long are forgotten, so connections that come and go (each one a
# caller without mutual TLS) do not grow the table without bound.
IDLE_FORGET_SECONDS = 60.0
FORGET_ABOVE = 1024


@dataclass(frozen=True)
class CallerLimits:
    """What one caller may ask of a server. A neighbor needs two streams and a handful of calls
    per round (GetModel, ComputeCrossGradient, a catch-up fetch); the defaults leave it ample room
    at 100 rounds a second while bounding what a misbehaving caller can hold."""

    streams: int = 8  # concurrent streams (GetModel, ComputeCrossGradient, WatchAssignment)
    rate: float = 200.0  # calls per second, sustained
    burst: int = 400  # calls at once after a quiet spell

    def __post_init__(self) -> None:
        if self.streams < 1 or self.rate <= 0 or self.burst < 1:
            raise ValueError(f"caller limits must be positive: {self}")


class Refusals:
    """Counts of refused calls by status code name, thread-safe; `server` names the server in
    the log lines (its address, once bound)."""

    def __init__(self, server: str = "a server") -> None:
        self.server = server
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, code: grpc.StatusCode) -> None:
        with self._lock:
            self._counts[code.name] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class Abort(Exception):
    """The end of a call decided before (a gate's refusal) or after (an error the method raised,
    crossgrad.rpc.translate_errors) its method ran: the status code, the details and the trailing
    metadata it is answered with.

    The decision is the same for every kind of server; only answering it differs, hence two
    ways: `end` on a synchronous server's context, `end_async` on a grpc.aio one's.
    """

    def __init__(self, code: grpc.StatusCode, details: str,
                 trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailers = trailers

    def end(self, context: grpc.ServicerContext) -> NoReturn:
        """Answer the call (context.abort raises); never returns."""
        if self.trailers:
            context.set_trailing_metadata(self.trailers)
        context.abort(self.code, self.details)
        raise AssertionError("context.abort returned")  # it always raises

    async def end_async(self, context: grpc.aio.ServicerContext) -> NoReturn:
        """Answer a grpc.aio call (its context.abort raises AbortError); never returns."""
        if self.trailers:
            context.set_trailing_metadata(self.trailers)
        await context.abort(self.code, self.details)
        raise AssertionError("context.abort returned")


# guard(context, method, streaming): entered before the call, left when it ends; it refuses a
# call by raising Abort as it is entered.
Guard = Callable[[grpc.ServicerContext, str, bool],
                contextlib.AbstractContextManager[None]]
# around(request, context): the same for one call, with its request (a stream's iterator).
Around = Callable[[Any, grpc.ServicerContext], contextlib.AbstractContextManager[None]]


class Interceptor(grpc.ServerInterceptor):
    """A server interceptor that serves synchronous and grpc.aio servers alike: `rewrap`
    decides what happens around a method's calls, once for both; `intercept_service` applies it
    on a synchronous server, `AioInterceptor(self)` on a grpc.aio one.

    `rewrap` must depend on the handler and the method's name alone: what it returns is kept
    and reused for every later call of that method with that handler (`rewrapped`). Building
    the wrappers anew for each call cost a bootstrap under 1,000 heartbeats a second some 6-8%
    of a core (docs/benchmarks.md, "Busy bootstrap")."""

    _made: dict[tuple[str, bool], tuple[Any, Any]] | None = None  # (method, aio) -> in, out

    def rewrap(self, handler: Any, details: grpc.HandlerCallDetails, *, aio: bool) -> Any:
        raise NotImplementedError

    def rewrapped(self, handler: Any, details: grpc.HandlerCallDetails, *, aio: bool) -> Any:
        """rewrap(handler, details), made once per method and handler. An unknown method
        (no handler) is not kept: callers may name any number of them."""
        if handler is None:
            return self.rewrap(handler, details, aio=aio)
        if self._made is None:
            self._made = {}
        key = (getattr(details, "method", "?"), aio)
        made = self._made.get(key)
        if made is None or made[0] is not handler:
            made = self._made[key] = (handler, self.rewrap(handler, details, aio=aio))
        return made[1]

    def intercept_service(self, continuation: Callable[[Any], Any],
                          details: grpc.HandlerCallDetails) -> Any:
        return self.rewrapped(continuation(details), details, aio=False)


class AioInterceptor(grpc.aio.ServerInterceptor):
    """An Interceptor on a grpc.aio server: the same decisions, awaited mechanics."""

    def __init__(self, interceptor: Interceptor) -> None:
        self.interceptor = interceptor

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        return self.interceptor.rewrapped(await continuation(details), details, aio=True)


def wrap_handler(handler: Any, around: Around, *, aio: bool,
                 request_deserializer: Callable[[bytes], Any] | None = None) -> Any:
    """`handler` (a grpc.RpcMethodHandler) with every call run inside `around(request,
    context)`, unary and streaming calls alike (a stream's `around` is left when the stream
    ends or is cancelled); an Abort raised as `around` is entered answers the call instead.
    `aio`: the handler is a grpc.aio server's (its behaviors coroutines or async generators).
    `request_deserializer` replaces the handler's."""
    wrap = _wrap_aio if aio else _wrap_sync
    serializers = {"request_deserializer": request_deserializer or handler.request_deserializer,
                   "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary, around, stream=False), **serializers)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            wrap(handler.unary_stream, around, stream=True), **serializers)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary, around, stream=False), **serializers)
    return grpc.stream_stream_rpc_method_handler(
        wrap(handler.stream_stream, around, stream=True), **serializers)


def _wrap_sync(behavior: Callable[..., Any], around: Around, *,
               stream: bool) -> Callable[..., Any]:
    if stream:
        def streamed(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:  # grpc closes the generator when the call ends or is cancelled
                with around(request, context):
                    yield from behavior(request, context)
            except Abort as refused:
                refused.end(context)
        return streamed

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            with around(request, context):
                return behavior(request, context)
        except Abort as refused:
            refused.end(context)
    return unary


def _wrap_aio(behavior: Callable[..., Any], around: Around, *,
              stream: bool) -> Callable[..., Any]:
    """grpc.aio runs a coroutine function as it is (a stream's writes with context.write) and
    iterates an async generator function; so the wrapper is whichever the behavior is."""
    if inspect.isasyncgenfunction(behavior):
        async def generated(request: Any, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[Any]:
            try:  # a cancelled call raises CancelledError here, leaving `around`
                with around(request, context):
                    async for item in behavior(request, context):
                        yield item
            except Abort as refused:
                await refused.end_async(context)
        return generated
    if not inspect.iscoroutinefunction(behavior):
        raise TypeError(f"{behavior!r} is not a coroutine or async generator function; a "
                        "grpc.aio server's methods must be (async def)")

    async def awaited(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            with around(request, context):
                return await behavior(request, context)
        except Abort as refused:
            await refused.end_async(context)
    return awaited


class GuardInterceptor(Interceptor):
    """Runs `guard(context, method, streaming)` around every call of the methods it applies
    to, for unary and streaming calls alike (a stream's guard ends when the stream does)."""

    def __init__(self, guard: Guard, *, applies: Callable[[str], bool] = lambda m: True) -> None:
        self.guard = guard
        self.applies = applies

    def rewrap(self, handler: Any, details: grpc.HandlerCallDetails, *, aio: bool) -> Any:
        method = getattr(details, "method", "?")
        if handler is None or not self.applies(method):
            return handler
        guard = self.guard
        streaming = bool(handler.request_streaming or handler.response_streaming)
        return wrap_handler(handler, lambda request, context: guard(context, method, streaming),
                            aio=aio)


def accounting(refusals: Refusals) -> GuardInterceptor:
    """Count and log every refused call, whoever refused it. (On grpc.aio, whose abort sends
    the status at once, the caller may see the refusal a moment before it is counted.)"""

    @contextlib.contextmanager
    def guard(context: grpc.ServicerContext, method: str, stream: bool) -> Iterator[None]:
        try:
            yield
        except Exception:
            code = context.code()
            if code in REFUSED:
                refusals.add(code)
                details = context.details() or b""
                if isinstance(details, bytes):  # grpc keeps them encoded
                    details = details.decode("utf-8", "replace")
                log.warning("%s refused %s from %s: %s: %s", refusals.server, method,
                            caller_of(context), code.name, details)
            raise

    return GuardInterceptor(guard)


def authentication(security: Security) -> GuardInterceptor:
    """With TLS: a certificate that names a crossgrad identity (mutual TLS) and/or the token."""

    @contextlib.contextmanager
    def guard(context: grpc.ServicerContext, method: str, stream: bool) -> Iterator[None]:
        caller = caller_of(context)
        if security.mutual and caller.kind in (CallerKind.ANONYMOUS, CallerKind.UNNAMED):
            raise Abort(grpc.StatusCode.UNAUTHENTICATED,
                        f"{method}: {caller} is not a crossgrad identity: this server uses "
                        "mutual TLS and accepts certificates that name crossgrad://node/ID, "
                        "crossgrad://bootstrap or crossgrad://client/NAME (`crossgrad certs`)")
        if security.token is not None and not security.token_matches(
                dict(context.invocation_metadata() or ())):
            raise Abort(grpc.StatusCode.UNAUTHENTICATED,
                        f"{method}: missing or wrong token: send 'authorization: Bearer "
                        "TOKEN' (crossgrad reads it from --token-file or CROSSGRAD_TOKEN)")
        yield

    return GuardInterceptor(guard, applies=lambda method: not method.startswith(OPEN_PREFIXES))


class TokenBucket:
    """`rate` tokens a second, at most `burst` kept (full at the start); a call or message
    spends one."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now  # when the tokens were last counted

    def refill(self, now: float) -> bool:
        """Count the tokens earned since the last refill; whether one is there to spend."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.tokens >= 1.0

    def wait(self) -> float:
        """Seconds until a token is there (as of the last refill)."""
        return max(0.0, (1.0 - self.tokens) / self.rate)

    def take(self, now: float) -> float:
        """Spend a token: 0.0, or (none there, none spent) the seconds until one is."""
        if not self.refill(now):
            return self.wait()
        self.tokens -= 1.0
        return 0.0


def refusal(wait: float, why: str) -> Abort:
    """RESOURCE_EXHAUSTED, with the standard retry hint: come back in `wait` seconds."""
    return Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{why}; retry in {wait:.2f} s",
                 ((RETRY_PUSHBACK_KEY, str(max(1, round(wait * 1e3)))),))


class _Allowance:
    """One caller's token bucket and stream count."""

    def __init__(self, limits: CallerLimits, now: float) -> None:
        self.bucket = TokenBucket(limits.rate, limits.burst, now)
        self.streams = 0


def caller_limits(limits: CallerLimits,
                  clock: Callable[[], float] = time.monotonic) -> GuardInterceptor:
    """RESOURCE_EXHAUSTED, with a retry hint, for a caller over its rate or its streams."""
    table: dict[str, _Allowance] = {}
    lock = threading.Lock()

    def forget_idle(now: float) -> None:
        for key in [k for k, a in table.items()
                    if a.streams == 0 and now - a.bucket.stamp > IDLE_FORGET_SECONDS]:
            del table[key]

    @contextlib.contextmanager
    def guard(context: grpc.ServicerContext, method: str, stream: bool) -> Iterator[None]:
        caller: Caller = caller_of(context)
        key = caller.key()
        now = clock()
        with lock:
            if len(table) > FORGET_ABOVE:
                forget_idle(now)
            allowance = table.get(key)
            if allowance is None:
                allowance = table[key] = _Allowance(limits, now)
            over_rate = not allowance.bucket.refill(now)
            over_streams = stream and allowance.streams >= limits.streams
            if not (over_rate or over_streams):
                allowance.bucket.tokens -= 1.0
                allowance.streams += stream
        if over_rate:
            raise refusal(allowance.bucket.wait(),
                          f"{method}: {caller} is over its {limits.rate:g} calls per second")
        if over_streams:
            raise refusal(1.0, f"{method}: {caller} already holds {limits.streams} streams, "
                          "its limit; retry when one ends")
        try:
            yield
        finally:
            if stream:
                with lock:
                    allowance.streams -= 1

    return GuardInterceptor(guard, applies=lambda method: not method.startswith(OPEN_PREFIXES))


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """The per-caller limits of a server (docs/security.md, "Refusals")."""
    defaults = CallerLimits()
    group = parser.add_argument_group("limits per caller (docs/security.md)")
    group.add_argument("--max-streams-per-caller", type=int, default=defaults.streams,
                       help=f"concurrent streams one caller may hold (default {defaults.streams})")
    group.add_argument("--max-calls-per-second", type=float, default=defaults.rate,
                       help=f"calls per second one caller may make, sustained (default "
                       f"{defaults.rate:g}; bursts up to twice that)")


def limits_from_args(args: argparse.Namespace) -> CallerLimits:
    try:
        return CallerLimits(streams=args.max_streams_per_caller,
                            rate=args.max_calls_per_second,
                            burst=max(1, round(2 * args.max_calls_per_second)))
    except ValueError:
        raise ConfigError("--max-streams-per-caller and --max-calls-per-second must be "
                          f"positive; got {args.max_streams_per_caller} and "
                          f"{args.max_calls_per_second}") from None

"""crossgrad/rpc.py against real servers on 127.0.0.1:0: limits, health, reflection, status codes.

The servicer is the generated PeerServicer with canned behavior: GetStatus (unary) and GetModel
(server-streaming) raise what the request asks for, so that every ProtocolError class is checked
on both kinds of method, through the wire, with its exact status code and message. The tests on
the `server` fixture run twice: on make_server, and on make_aio_server with the same behavior
from coroutines (AioCannedPeer), whose mechanics differ and whose answers must not.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from crossgrad import errors, rpc
from crossgrad.v1 import peer_pb2, peer_pb2_grpc, tensor_pb2

from harness import PEER, Open, Serve, peer_service, rpc_error

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
ERRORS = list(rpc.STATUS)  # GetModel(round=i) raises ERRORS[i] after one chunk
UNEXPECTED_ROUND = len(ERRORS)  # GetModel raises a RuntimeError
GOOD_ROUND = 1000  # GetModel streams two chunks


def message_of(cls: type[errors.ProtocolError]) -> str:
    return f"expected round 5, got round 2; ask again ({cls.__name__})"


class CannedPeer(peer_pb2_grpc.PeerServicer):
    """A Peer whose answers are chosen by the request: see the module docstring."""

    @rpc.translate_errors
    def GetStatus(self, request: peer_pb2.GetStatusRequest, context: Any) -> peer_pb2.PeerStatus:
        kind, _, arg = request.requester.partition(":")
        if kind == "raise":
            cls = getattr(errors, arg)
            raise cls(message_of(cls))
        if kind == "config":
            raise errors.ConfigError("bad setting: margin must be positive")
        if kind == "boom":
            raise RuntimeError("secret internal state")
        if kind == "abort":
            context.abort(grpc.StatusCode.NOT_FOUND, "aborted by the method itself")
        if kind == "big":
            return peer_pb2.PeerStatus(node_id=7, address="y" * int(arg))
        return peer_pb2.PeerStatus(node_id=7, address=request.requester, state="TRAINING")

    @rpc.translate_errors
    def GetModel(self, request: peer_pb2.GetModelRequest,
                 context: Any) -> Iterator[tensor_pb2.TensorChunk]:
        yield tensor_pb2.TensorChunk(header=tensor_pb2.StreamHeader(sender_id=7,
                                                                    round=request.round))
        if request.round < len(ERRORS):
            cls = ERRORS[request.round]
            raise cls(message_of(cls))
        if request.round == UNEXPECTED_ROUND:
            raise ZeroDivisionError("secret internal state")
        yield tensor_pb2.TensorChunk(data=b"\x00" * 16)


class AioCannedPeer(peer_pb2_grpc.PeerServicer):
    """CannedPeer's answers from coroutines, for grpc.aio: a stream writes its chunks."""

    @rpc.translate_errors_async
    async def GetStatus(self, request: peer_pb2.GetStatusRequest,
                        context: Any) -> peer_pb2.PeerStatus:
        if request.requester == "abort:":
            await context.abort(grpc.StatusCode.NOT_FOUND, "aborted by the method itself")
        status: peer_pb2.PeerStatus = CannedPeer.GetStatus.__wrapped__(  # type: ignore[attr-defined]
            self, request, context)
        return status

    @rpc.translate_errors_async
    async def GetModel(self, request: peer_pb2.GetModelRequest, context: Any) -> None:
        for chunk in CannedPeer.GetModel.__wrapped__(self, request, context):  # type: ignore[attr-defined]
            await context.write(chunk)


@pytest.fixture(params=["sync", "aio"])
def server(serve: Serve, request: pytest.FixtureRequest) -> rpc.RunningServer:
    aio = request.param == "aio"
    running = serve([peer_service(AioCannedPeer() if aio else CannedPeer())], aio=aio)
    running.set_serving()
    return running


@pytest.fixture
def stub(server: rpc.RunningServer, channel: Open) -> peer_pb2_grpc.PeerStub:
    return peer_pb2_grpc.PeerStub(channel(server.address))


def test_port_zero_binds_a_real_port(server: rpc.RunningServer,
                                     stub: peer_pb2_grpc.PeerStub) -> None:
    assert 0 < server.port < 65536
    assert server.address == f"127.0.0.1:{server.port}"
    assert stub.GetStatus(peer_pb2.GetStatusRequest(requester="t"), timeout=5).node_id == 7


def test_unspecified_host_gives_a_loopback_address(serve: Serve) -> None:
    running = serve([peer_service(CannedPeer())], bind="0.0.0.0:0")
    assert running.address == f"127.0.0.1:{running.port}"


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])
def test_health_is_not_serving_until_set_serving(serve: Serve, channel: Open, aio: bool) -> None:
    running = serve([peer_service(AioCannedPeer() if aio else CannedPeer())], aio=aio)
    health = health_pb2_grpc.HealthStub(channel(running.address))

    def status(service: str) -> int:
        return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    assert status("") == NOT_SERVING and status(PEER) == NOT_SERVING
    running.set_serving()
    assert status("") == SERVING and status(PEER) == SERVING
    running.set_serving(False)
    assert status("") == NOT_SERVING and status(PEER) == NOT_SERVING


def test_reflection_lists_and_describes_every_service(server: rpc.RunningServer,
                                                      channel: Open) -> None:
    database = ProtoReflectionDescriptorDatabase(channel(server.address))
    assert set(database.get_services()) == {
        PEER, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    peer = DescriptorPool(database).FindServiceByName(PEER)
    assert {m.name for m in peer.methods} == {"GetModel", "ComputeCrossGradient", "GetStatus",
                                              "GetModelUpdate", "GetReplica", "GetEstimate"}


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_each_protocol_error_reaches_the_client_with_its_code(
        stub: peer_pb2_grpc.PeerStub, cls: type[errors.ProtocolError]) -> None:
    unary = rpc_error(lambda: stub.GetStatus(
        peer_pb2.GetStatusRequest(requester=f"raise:{cls.__name__}"), timeout=5))
    assert unary.code() == rpc.STATUS[cls]
    assert unary.details() == message_of(cls)
    mapped = rpc.from_rpc_error(unary, "GetStatus from node 7")
    assert type(mapped) is cls
    assert str(mapped) == f"GetStatus from node 7 failed with {rpc.STATUS[cls].name}: " \
                          f"{message_of(cls)}{rpc._HINTS.get(rpc.STATUS[cls], '')}"

    chunks: list[tensor_pb2.TensorChunk] = []
    streamed = rpc_error(lambda: chunks.extend(stub.GetModel(
        peer_pb2.GetModelRequest(requester_id=1, round=ERRORS.index(cls)), timeout=5)))
    assert len(chunks) == 1 and chunks[0].HasField("header")  # what came before the error
    assert streamed.code() == rpc.STATUS[cls]
    assert streamed.details() == message_of(cls)
    assert type(rpc.from_rpc_error(streamed, "GetModel from node 7")) is cls


def test_config_error_is_invalid_argument(stub: peer_pb2_grpc.PeerStub) -> None:
    err = rpc_error(lambda: stub.GetStatus(peer_pb2.GetStatusRequest(requester="config:"),
                                              timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "bad setting: margin must be positive"


def test_a_direct_context_abort_keeps_its_code(stub: peer_pb2_grpc.PeerStub) -> None:
    err = rpc_error(lambda: stub.GetStatus(peer_pb2.GetStatusRequest(requester="abort:"),
                                              timeout=5))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "aborted by the method itself"


def test_unexpected_error_is_internal_logged_and_the_server_keeps_serving(
        stub: peer_pb2_grpc.PeerStub, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="crossgrad.rpc")
    unary = rpc_error(lambda: stub.GetStatus(peer_pb2.GetStatusRequest(requester="boom:"),
                                                timeout=5))
    streamed = rpc_error(lambda: list(stub.GetModel(
        peer_pb2.GetModelRequest(round=UNEXPECTED_ROUND), timeout=5)))
    for err, exc_type in ((unary, RuntimeError), (streamed, ZeroDivisionError)):
        assert err.code() == grpc.StatusCode.INTERNAL
        assert exc_type.__name__ in err.details()
        assert "secret" not in err.details()  # internals stay in the log
    logged = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert [type(e) for e in logged] == [RuntimeError, ZeroDivisionError]

    assert stub.GetStatus(peer_pb2.GetStatusRequest(requester="after"), timeout=5).node_id == 7
    chunks = list(stub.GetModel(peer_pb2.GetModelRequest(round=GOOD_ROUND), timeout=5))
    assert [c.WhichOneof("part") for c in chunks] == ["header", "data"]


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])
def test_request_above_the_server_limit_is_resource_exhausted(serve: Serve, channel: Open,
                                                              aio: bool) -> None:
    running = serve([peer_service(AioCannedPeer() if aio else CannedPeer())],
                    max_message_bytes=1024, aio=aio)
    stub = peer_pb2_grpc.PeerStub(channel(running.address))
    err = rpc_error(lambda: stub.GetStatus(peer_pb2.GetStatusRequest(requester="x" * 2048),
                                              timeout=5))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert type(rpc.from_rpc_error(err, "GetStatus")) is errors.TooLarge
    assert stub.GetStatus(peer_pb2.GetStatusRequest(requester="x" * 512), timeout=5).node_id == 7


def test_answer_above_the_client_limit_is_resource_exhausted(server: rpc.RunningServer,
                                                             channel: Open) -> None:
    stub = peer_pb2_grpc.PeerStub(channel(server.address, max_message_bytes=1024))
    err = rpc_error(lambda: stub.GetStatus(peer_pb2.GetStatusRequest(requester="big:2048"),
                                              timeout=5))  # the request fits, the answer not
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


class FakeRpcError(grpc.RpcError):
    """What grpc raises, without a server: code, details and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self._code, self._metadata = code, metadata

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "the details"

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


@pytest.mark.parametrize(("code", "cls"), [
    (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidMessage),
    (grpc.StatusCode.DATA_LOSS, errors.TruncatedStream),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.TooLarge),
    (grpc.StatusCode.FAILED_PRECONDITION, errors.StaleRound),
    (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied),
    (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthenticated),
    (grpc.StatusCode.NOT_FOUND, errors.NotFound),
    (grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyExists),
    (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded),
    (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
    (grpc.StatusCode.CANCELLED, errors.Unavailable),
    (grpc.StatusCode.UNKNOWN, errors.Unavailable),
    (grpc.StatusCode.INTERNAL, errors.Unavailable),
    (grpc.StatusCode.UNIMPLEMENTED, errors.Unavailable),
])
def test_from_rpc_error_maps_each_code_to_a_class(code: grpc.StatusCode,
                                                  cls: type[errors.ProtocolError]) -> None:
    mapped = rpc.from_rpc_error(FakeRpcError(code), "GetModel from node 3 at 127.0.0.1:5001")
    assert type(mapped) is cls
    assert str(mapped).startswith(
        f"GetModel from node 3 at 127.0.0.1:5001 failed with {code.name}: the details")


def test_from_rpc_error_trusts_the_class_name_only_when_it_agrees_with_the_code() -> None:
    named = ((rpc.ERROR_CLASS_KEY, "NotReady"),)
    precondition = FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION, named)
    assert type(rpc.from_rpc_error(precondition, "GetAssignment")) is errors.NotReady
    unavailable = FakeRpcError(grpc.StatusCode.UNAVAILABLE, named)
    assert type(rpc.from_rpc_error(unavailable, "GetAssignment")) is errors.Unavailable


def test_an_unreachable_node_is_unavailable(serve: Serve, channel: Open) -> None:
    gone = serve([peer_service(CannedPeer())])
    gone.stop(grace=0)
    stub = peer_pb2_grpc.PeerStub(channel(gone.address))
    err = rpc_error(lambda: stub.GetStatus(peer_pb2.GetStatusRequest(), timeout=5))
    mapped = rpc.from_rpc_error(err, f"GetStatus at {gone.address}")
    assert type(mapped) is errors.Unavailable
    assert gone.address in str(mapped) and "UNAVAILABLE" in str(mapped)


def test_a_taken_port_is_a_config_error(server: rpc.RunningServer) -> None:
    with pytest.raises(errors.ConfigError, match=re.escape(f"127.0.0.1:{server.port}")):
        rpc.make_server(f"127.0.0.1:{server.port}", [peer_service(CannedPeer())])


@pytest.mark.parametrize("bind", ["50051", "127.0.0.1", ":50051", "127.0.0.1:port", "h:70000"])
def test_a_malformed_bind_address_is_a_config_error(bind: str) -> None:
    with pytest.raises(errors.ConfigError, match="HOST:PORT"):
        rpc.make_server(bind, [peer_service(CannedPeer())])


def test_an_unknown_service_name_is_a_config_error() -> None:
    with pytest.raises(errors.ConfigError, match=re.escape("'crossgrad.v1.Peers'")):
        rpc.make_server("127.0.0.1:0", [rpc.Service("crossgrad.v1.Peers", lambda s: None)])


def test_stop_reports_not_serving_before_shutting_down(server: rpc.RunningServer,
                                                       channel: Open) -> None:
    health = health_pb2_grpc.HealthStub(channel(server.address))
    watch = health.Watch(health_pb2.HealthCheckRequest(service=PEER), timeout=10)
    assert next(watch).status == SERVING
    stopper = threading.Thread(target=server.stop, kwargs={"grace": 0.5})
    stopper.start()
    assert next(watch).status == NOT_SERVING  # seen while the server still answers
    stopper.join()
    with pytest.raises(grpc.RpcError):
        next(watch)  # then the server went away
    assert server.wait_for_termination(timeout=1) is False
    server.set_serving()  # a late set_serving cannot flip a stopped server back
    if not isinstance(server, rpc.AioRunningServer):  # whose health servicer is async
        assert server.health.Check(health_pb2.HealthCheckRequest(service=PEER), None).status \
            == NOT_SERVING


def test_a_request_that_is_not_protobuf_is_invalid_argument(server: rpc.RunningServer,
                                                            channel: Open) -> None:
    call = channel(server.address).unary_unary(f"/{PEER}/GetStatus")
    err = rpc_error(lambda: call(b"\xff\xff\xff", timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a valid protobuf message" in (err.details() or "")


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])
def test_an_interceptor_builds_a_methods_wrappers_once(serve: Serve, channel: Open,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       aio: bool) -> None:
    """Wrappers are kept per method (guard.Interceptor.rewrapped), not built for every call;
    a method the server does not have is not kept, since a caller may name any number."""
    built: list[str] = []
    rewrap = rpc._RejectMalformedRequests.rewrap

    def counted(self: Any, handler: Any, details: Any, *, aio: bool) -> Any:
        built.append(details.method)
        return rewrap(self, handler, details, aio=aio)
    monkeypatch.setattr(rpc._RejectMalformedRequests, "rewrap", counted)
    running = serve([peer_service(AioCannedPeer() if aio else CannedPeer())], aio=aio)
    running.set_serving()
    opened = channel(running.address)
    stub = peer_pb2_grpc.PeerStub(opened)
    for _ in range(5):
        assert stub.GetStatus(peer_pb2.GetStatusRequest(requester="t"), timeout=5).node_id == 7
    missing = opened.unary_unary(f"/{PEER}/NoSuchMethod")
    for _ in range(3):
        assert rpc_error(lambda: missing(b"", timeout=5)).code() == grpc.StatusCode.UNIMPLEMENTED
    assert built.count(f"/{PEER}/GetStatus") == 1
    assert built.count(f"/{PEER}/NoSuchMethod") == 3


def test_an_aio_server_takes_only_coroutines() -> None:
    with pytest.raises(TypeError, match="not a coroutine function"):
        rpc.translate_errors_async(CannedPeer.GetStatus)


@pytest.fixture
def saved_signal_handlers() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.mark.usefixtures("saved_signal_handlers")
def test_signal_handlers_call_on_stop_once_and_give_sigint_back() -> None:
    sigint_before = signal.getsignal(signal.SIGINT)
    calls: list[str] = []
    rpc.install_signal_handlers(lambda: calls.append("stop"))
    signal.raise_signal(signal.SIGTERM)
    signal.raise_signal(signal.SIGTERM)
    assert calls == ["stop"]
    assert signal.getsignal(signal.SIGINT) is sigint_before  # a second Ctrl-C interrupts


def test_signal_handlers_only_from_the_main_thread() -> None:
    raised: list[BaseException] = []

    def install() -> None:
        try:
            rpc.install_signal_handlers(lambda: None)
        except RuntimeError as exc:
            raised.append(exc)

    thread = threading.Thread(target=install)
    thread.start()
    thread.join()
    assert len(raised) == 1 and "main thread" in str(raised[0])

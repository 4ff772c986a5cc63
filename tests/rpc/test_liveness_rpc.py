"""A server stays answerable: unary calls never queue behind streams, and the keepalive
settings are ones grpc reads (crossgrad/rpc.py; the load figures are in docs/benchmarks.md);
a peer's stream limit is its --max-streams (peer/service.py).

The streams are grpc.health.v1.Health/Watch calls, which every crossgrad server offers and which
hold their thread until the caller goes away, as a GetModel waiting for the next round does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crossgrad import rpc
from crossgrad.errors import ConfigError
from peer.service import DEFAULT_MAX_STREAMS, PeerOptions, PeerRuntime

from harness import Open, Serve

STREAMS = 2  # the stream limit of the servers below
SERVING = health_pb2.HealthCheckResponse.SERVING


def watch(stub: health_pb2_grpc.HealthStub) -> Iterator[health_pb2.HealthCheckResponse]:
    """A Health/Watch stream whose first answer has come: it holds a server thread now."""
    stream = stub.Watch(health_pb2.HealthCheckRequest(), timeout=30)
    assert next(stream).status == SERVING
    return stream


@pytest.fixture
def stub(serve: Serve, channel: Open) -> health_pb2_grpc.HealthStub:
    server = serve([], max_workers=rpc.RESERVED_UNARY_WORKERS + STREAMS)
    server.set_serving()
    return health_pb2_grpc.HealthStub(channel(server.address))


def test_unary_calls_are_answered_while_streams_hold_every_thread_they_may(
        stub: health_pb2_grpc.HealthStub) -> None:
    streams = [watch(stub) for _ in range(STREAMS)]
    # As many unary calls at once as there are threads kept for them, each within a short
    # deadline: they run on the kept threads, not after a stream ends (these never would).
    calls = [stub.Check.future(health_pb2.HealthCheckRequest(), timeout=5)
             for _ in range(rpc.RESERVED_UNARY_WORKERS)]
    assert [call.result().status for call in calls] == [SERVING] * len(calls)
    for stream in streams:
        stream.cancel()


def test_a_stream_over_the_limit_is_refused_at_once(stub: health_pb2_grpc.HealthStub) -> None:
    streams = [watch(stub) for _ in range(STREAMS)]
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        watch(stub)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"already serves {STREAMS} streams" in caught.value.details()
    assert time.monotonic() - started < 5  # refused, not queued until the 30 s deadline
    for stream in streams:
        stream.cancel()


def test_an_ended_stream_gives_its_thread_back(stub: health_pb2_grpc.HealthStub) -> None:
    for _ in range(3):  # fill, end every stream, fill again: no slot is lost on the way
        streams = [watch(stub)]
        deadline = time.monotonic() + 10
        while len(streams) < STREAMS:  # the server sees a cancel a moment after the client
            try:
                streams.append(watch(stub))
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() < deadline, "a cancelled stream kept its thread"
        for stream in streams:
            stream.cancel()


def test_a_pool_with_no_room_for_streams_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="must exceed the 8 threads kept for unary calls"):
        rpc.make_server("127.0.0.1:0", [], max_workers=rpc.RESERVED_UNARY_WORKERS)


def test_a_peer_serves_max_streams_streams_at_once_and_refuses_the_next(channel: Open) -> None:
    """--max-streams sizes the peer's pool (PeerRuntime.serve): that many streams, and the
    threads kept for unary calls on top."""
    runtime = PeerRuntime(PeerOptions(node_id=0, bootstrap="unused:1", max_streams=3))
    server = runtime.serve()
    try:
        server.set_serving()
        stub = health_pb2_grpc.HealthStub(channel(server.address))
        streams = [watch(stub) for _ in range(3)]
        with pytest.raises(grpc.RpcError) as caught:
            watch(stub)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "already serves 3 streams" in caught.value.details()
        calls = [stub.Check.future(health_pb2.HealthCheckRequest(), timeout=5)
                 for _ in range(rpc.RESERVED_UNARY_WORKERS)]
        assert [call.result().status for call in calls] == [SERVING] * len(calls)
        for stream in streams:
            stream.cancel()
    finally:
        server.stop(0)


def test_by_default_a_peer_serves_64_neighbors_two_streams_each() -> None:
    assert PeerOptions(node_id=0, bootstrap="unused:1").max_streams == DEFAULT_MAX_STREAMS
    assert DEFAULT_MAX_STREAMS >= 2 * 64
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="--max-streams must be positive"):
            PeerOptions(node_id=0, bootstrap="unused:1", max_streams=bad)


def test_every_server_and_channel_argument_is_one_grpc_reads() -> None:
    """grpc ignores an argument name it does not know, silently. One misspelt keepalive name
    left the server at its 5-minute default, and it closed every connection quiet for 90 s
    (GOAWAY "too_many_pings"). grpc's core library holds each name it reads as a string."""
    import grpc._cython.cygrpc as core

    library = Path(core.__file__).read_bytes()
    names = {name for name, _ in rpc.server_options() + rpc.channel_options()}
    assert sorted(n for n in names if n.encode() + b"\0" not in library) == []

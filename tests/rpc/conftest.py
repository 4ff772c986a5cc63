"""Fixtures for tests against real servers on 127.0.0.1:0 (STYLE.md habit 11).

`serve` starts servers through the one server factory and stops them after the test; `channel`
opens channels through the one channel factory and closes them. Ports are never fixed: use
`server.address` or `server.port`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import pytest

from crossgrad import rpc

ServeFn = Callable[..., rpc.RunningServer]
ChannelFn = Callable[..., grpc.Channel]


@pytest.fixture
def serve() -> Iterator[ServeFn]:
    """serve(services, **make_server_kwargs) -> a server on 127.0.0.1:0, stopped at teardown."""
    started: list[rpc.RunningServer] = []

    def start(services: Sequence[rpc.Service], **kwargs: Any) -> rpc.RunningServer:
        server = rpc.make_server("127.0.0.1:0", services, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(grace=0)


@pytest.fixture
def channel() -> Iterator[ChannelFn]:
    """channel(address, **make_channel_kwargs) -> a channel, closed at teardown."""
    opened: list[grpc.Channel] = []

    def open_channel(address: str, **kwargs: Any) -> grpc.Channel:
        ch = rpc.make_channel(address, **kwargs)
        opened.append(ch)
        return ch

    yield open_channel
    for ch in opened:
        ch.close()

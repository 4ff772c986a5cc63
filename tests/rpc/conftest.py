"""Fixtures for tests against real servers on 127.0.0.1:0 (docs/conventions.md, "Tests mirror
the layers"), thin wrappers of tests/rpc/harness.py.

`cluster` is a Cluster that stops everything it started when the test ends; `run_certs` the
certificates of a 4-node run (a CA, nodes 0-3, the bootstrap, a client), made once; `serve` starts
servers through the one server factory and `channel` opens channels through the one channel
factory, both on that cluster. Ports are never fixed: use `server.address` or `server.port`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from crossgrad.certs import Made, make_run_certificates

from harness import Cluster, Open, Serve

CERT_NODES = 4  # enough for a ring in which node 2 is not node 0's neighbor


@pytest.fixture(scope="session")
def run_certs(tmp_path_factory: pytest.TempPathFactory) -> Made:
    return make_run_certificates(tmp_path_factory.mktemp("certs"), CERT_NODES)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with Cluster() as started:
        yield started


@pytest.fixture
def serve(cluster: Cluster) -> Serve:
    """serve(services, **make_server_kwargs) -> a server on 127.0.0.1:0, stopped at teardown."""
    return cluster.serve


@pytest.fixture
def channel(cluster: Cluster) -> Open:
    """channel(address, **make_channel_kwargs) -> a channel, closed at teardown."""
    return cluster.channel

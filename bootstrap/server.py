"""Start the bootstrap: a Registry, its servicer, and a server from crossgrad.rpc.make_aio_server.

    server = serve(settings, "0.0.0.0:50050", state_path="bootstrap.sqlite", lease_seconds=15)
    install_signal_handlers(stop.set); stop.wait(); server.stop(grace=5)

The CLI owns flags, logging and signals; this module only wires the pieces and decides the order
of starting and stopping. The server is grpc.aio on an event loop of its own thread (one loop for
every call and every WatchAssignment stream, bootstrap/servicer.py) behind the same synchronous
interface as every other crossgrad server, so `serve` and `stop` are plain calls. The server
reports SERVING only once the registry is open (its state resumed, its topology built) and the
reaper runs; stopping ends the watches first (so the grace period is not spent on streams that
never finish by themselves), drains the unary calls, and only then closes the registry, so no call
sees a closed database and the reaper stops writing before another process may open the same
state file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from bootstrap.exporter import BootstrapCollector
from bootstrap.registry import Registry
from bootstrap.servicer import SERVICE_NAME, BootstrapServicer
from crossgrad.config import RunConfig
from crossgrad.exporter import MetricsEndpoint, metrics_host
from crossgrad.guard import CallerLimits
from crossgrad.rpc import AioRunningServer, Service, make_aio_server
from crossgrad.security import Security

log = logging.getLogger(__name__)

# Streams per node (its Heartbeats and a WatchAssignment), and beyond those, the streams the
# server takes at once: room for probes and for a peer's new stream while its old one is still
# being torn down.
STREAMS_PER_NODE = 2
SPARE_STREAMS = 8


class BootstrapServer(AioRunningServer):
    """An AioRunningServer that also ends the streams before the drain and closes the registry
    after it. AioRunningServer has no stop hook, so this takes over the started server's
    parts."""

    def __init__(self, running: AioRunningServer, registry: Registry,
                 servicer: BootstrapServicer) -> None:
        super().__init__(running._server, running.loop, running.port, running.address,
                         running.health, running.service_names, running.security,
                         running.refusals)
        self.registry = registry
        self.servicer = servicer
        self.metrics: MetricsEndpoint | None = None  # /metrics, when asked for (serve)

    def stop(self, grace: float = 5.0) -> None:
        self.servicer.stop_streams()
        try:
            super().stop(grace)
        finally:
            try:
                if self.metrics is not None:  # it reads the registry: stopped first
                    self.metrics.stop()
            finally:
                self.registry.close()


def serve(settings: RunConfig, bind: str, state_path: str | Path | None,
          lease_seconds: float, *, security: Security | None = None,
          limits: CallerLimits | None = None,
          metrics_port: int | None = None) -> BootstrapServer:
    """Open (or resume) the run's registry at state_path (None: in memory, lost on exit) and
    serve crossgrad.v1.Bootstrap on `bind`; the server is started and SERVING when this returns.

    `security` and `limits` as crossgrad.rpc.make_aio_server (None: plaintext, default limits).
    `metrics_port`: serve Prometheus metrics over HTTP on that port of the host of `bind` (0:
    any free port; None: none), as `server.metrics`.
    Raises ConfigError for a state file of another run, a bad topology or an unusable bind.
    """
    registry = Registry(settings, state_path, lease_seconds=lease_seconds)
    servicer = BootstrapServicer(registry)
    try:
        running = make_aio_server(bind, [Service(SERVICE_NAME, servicer.add_to_server)],
                                  max_streams=STREAMS_PER_NODE * settings.nodes + SPARE_STREAMS,
                                  security=security, limits=limits)
    except BaseException:
        registry.close()
        raise
    servicer.refusals = running.refusals.snapshot
    registry.start_reaper()
    server = BootstrapServer(running, registry, servicer)
    if metrics_port is not None:
        try:
            server.metrics = MetricsEndpoint(metrics_host(bind), metrics_port,
                                             [BootstrapCollector(registry, running.refusals)])
        except BaseException:
            server.stop(grace=0)
            raise
    server.set_serving()
    log.info("bootstrap serving on %s for %d nodes (%s), state %s, lease %g s, epoch %d",
             running.address, settings.nodes, settings.topology, state_path or "in memory",
             lease_seconds, registry.epoch)
    return server

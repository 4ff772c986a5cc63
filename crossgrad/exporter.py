"""The Prometheus endpoint of one process (`--metrics-port`): its own HTTP server and its own
CollectorRegistry, so several peers in one process (tests) never share a metric.

Nothing is counted twice: the collectors (peer/exporter.py, bootstrap/exporter.py) read the
counters the process keeps anyway (traffic, misses, refusals, the registry) when Prometheus
scrapes, and build the families with the helpers below. prometheus-client is imported here and
in those two modules only. docs/metrics.md lists every metric.

    endpoint = MetricsEndpoint("0.0.0.0", 9100, [collector])   # serving /metrics now
    endpoint.stop()
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from crossgrad.errors import ConfigError
from crossgrad.guard import REFUSED, Refusals

log = logging.getLogger(__name__)

# Hosts of a --bind that mean every interface, as the HTTP server spells them.
_EVERY_INTERFACE = {"*": "0.0.0.0", "[::]": "::"}

Labels = tuple[str, ...]


def metrics_host(bind: str) -> str:
    """The host part of a --bind HOST:PORT as the HTTP server takes it: the metrics endpoint
    listens on the same interfaces as the gRPC server (brackets off an IPv6 address)."""
    host = bind.rpartition(":")[0] or "0.0.0.0"
    host = _EVERY_INTERFACE.get(host, host)
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


class MetricsEndpoint:
    """/metrics over HTTP on `host:port` (port 0: any free port, tests), serving `collectors`;
    started by the constructor, on a daemon thread."""

    def __init__(self, host: str, port: int, collectors: Iterable[Collector]) -> None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"--metrics-port must be in 0..65535 (0: no metrics); got {port}")
        # auto_describe off: the collectors are read at scrape time only, never at register.
        self.registry = CollectorRegistry(auto_describe=False)
        for collector in collectors:
            self.registry.register(collector)
        try:
            self._server, self._thread = start_http_server(port, host, self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; "
                              "choose another --metrics-port") from None
        self.port = int(self._server.server_port)
        shown = f"[{host}]" if ":" in host else host
        self.address = f"{shown}:{self.port}"
        log.info("metrics at http://%s/metrics", self.address)

    def stop(self) -> None:
        """Stop serving and release the port (a scrape under way finishes first)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


# ---- families, from plain numbers ----------------------------------------------------------
def counter(name: str, doc: str, labels: Sequence[str],
            values: Mapping[Labels, float]) -> CounterMetricFamily:
    """NAME_total{labels...} per entry of `values` (label values -> count)."""
    family = CounterMetricFamily(name, doc, labels=list(labels))
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


def gauge(name: str, doc: str, labels: Sequence[str],
          values: Mapping[Labels, float]) -> GaugeMetricFamily:
    """NAME{labels...} per entry of `values`; NaN values (not measured yet) are left out."""
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    for key, value in sorted(values.items()):
        if not math.isnan(value):
            family.add_metric(list(key), value)
    return family


def histogram(name: str, doc: str, labels: Sequence[str],
              tallies: Mapping[Labels, tuple[Sequence[float], Sequence[int], float]]
              ) -> HistogramMetricFamily:
    """NAME_bucket, NAME_sum and NAME_count per entry of `tallies`: (bounds, counts, sum) with
    counts per bucket, not cumulative, the last one above every bound (peer.metrics.Tally)."""
    family = HistogramMetricFamily(name, doc, labels=list(labels))
    for key, (bounds, counts, total) in sorted(tallies.items()):
        cumulative, buckets = 0, []
        for bound, count in zip([*map(float, bounds), math.inf], counts, strict=True):
            cumulative += count
            buckets.append((_le(bound), cumulative))
        family.add_metric(list(key), buckets, total)
    return family


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def refused_calls(refusals: Refusals) -> CounterMetricFamily:
    """crossgrad_refused_calls_total{code}: calls a server refused (crossgrad/guard.py,
    REFUSED: unauthenticated, not permitted, over a per-caller limit), by gRPC status code."""
    return counter("crossgrad_refused_calls", "Calls refused (UNAUTHENTICATED, "
                   "PERMISSION_DENIED, RESOURCE_EXHAUSTED), by gRPC status code", ["code"],
                   {(code,): n for code, n in
                    ({code.name: 0 for code in REFUSED} | refusals.snapshot()).items()})

"""The bootstrap's Prometheus metrics, read from its registry at scrape time
(crossgrad/exporter.py; docs/metrics.md lists them).

The registry already holds every peer's state and last reported round and the topology epoch;
the bootstrap's server counts the calls it refused. A scrape reads them under the registry's
lock, as ListPeers does.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import Metric

from bootstrap.registry import PeerState, Registry
from crossgrad.exporter import gauge, refused_calls
from crossgrad.guard import Refusals


class BootstrapCollector:
    """The metrics of one bootstrap: its registry and its server's refusals."""

    def __init__(self, registry: Registry, refusals: Refusals) -> None:
        self.registry = registry
        self.refusals = refusals

    def collect(self) -> Iterator[Metric]:
        peers = self.registry.peers()
        yield gauge("crossgrad_live_peers", "Peers in the run now (joined or active, lease "
                    "alive)", [], {(): sum(p.live for p in peers)})
        yield gauge("crossgrad_expected_peers", "Peers the run was started for (--nodes)", [],
                    {(): self.registry.settings.nodes})
        yield gauge("crossgrad_topology_epoch", "The topology epoch: 1 at assembly, one more "
                    "each time the set of live peers changes", [], {(): self.registry.epoch})
        states: dict[tuple[str, ...], float] = {(s.value,): 0 for s in PeerState}
        for p in peers:
            states[(p.state.value,)] += 1
        yield gauge("crossgrad_peers", "Peers the bootstrap knows, by state", ["state"], states)
        yield gauge("crossgrad_peer_round", "The round each peer last reported in a heartbeat",
                    ["node"], {(str(p.node_id),): p.round for p in peers})
        yield refused_calls(self.refusals)

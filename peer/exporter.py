"""A peer's Prometheus metrics, read from its runtime at scrape time (crossgrad/exporter.py).

Every value comes from what the peer keeps for GetStatus and its run records anyway: the
traffic counters (peer/metrics.py, Traffic), the neighbors' misses (peer/client.py), the
requests it refused (PeerRuntime.rejected), the calls its server refused (crossgrad/guard.py),
the round loop's state and round times (peer/loop.py). The round loop does no extra work for a
scrape. docs/metrics.md lists the metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import Metric

from crossgrad.exporter import counter, gauge, histogram, refused_calls
from peer.client import REJECTED_ANSWERS
from peer.metrics import KINDS, Tally
from peer.rounds import PHASES

if TYPE_CHECKING:
    from peer.service import PeerRuntime

# The reasons crossgrad_rejected_messages_total always lists (at 0 until one happens): the
# requests a peer refuses (peer/servicer.py) and the answers it refuses (peer/client.py).
REJECTED_REASONS = ("not_a_neighbor", "past_last_round", *REJECTED_ANSWERS.values())


class PeerCollector:
    """The metrics of one PeerRuntime (registered with its MetricsEndpoint)."""

    def __init__(self, runtime: PeerRuntime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        runtime = self.runtime
        node, hood, loop = runtime.node, runtime.hood, runtime.loop
        yield from self._traffic()
        yield gauge("crossgrad_round", "The round this node is at (rounds completed)", [],
                    {(): node.round if node is not None else 0})
        yield gauge("crossgrad_topology_epoch", "The topology epoch of this node's assignment",
                    [], {(): node.assignment.epoch if node is not None else 0})
        yield gauge("crossgrad_test_accuracy", "Test-set accuracy of this node's model at its "
                    "last evaluation", [], {(): loop.last_accuracy} if loop is not None else {})
        yield gauge("crossgrad_train_loss", "Training loss of this node's last round", [],
                    {(): loop.last_loss} if loop is not None else {})
        stats = node.algorithm.stats if node is not None else {}
        yield counter("crossgrad_qp_fallbacks", "CGA quadratic programs that fell back to the "
                      "previous duals or the plain gradient", [],
                      {(): stats.get("qp_fallbacks", 0)})
        yield counter("crossgrad_missed_answers", "Neighbor answers left out of a round (no "
                      "answer in time, or refused)", [], {(): hood.misses.total if hood else 0})
        rejected = dict.fromkeys(REJECTED_REASONS, 0) | runtime.rejected()
        yield counter("crossgrad_rejected_messages", "Neighbors' requests and answers this "
                      "node refused, by reason", ["reason"],
                      {(reason,): n for reason, n in rejected.items()})
        yield counter("crossgrad_catch_ups", "Jumps to the neighbors' round from their models",
                      [], {(): loop.catch_ups.count if loop is not None else 0})
        yield counter("crossgrad_resyncs", "Replicas and EF21/CLAG estimates resynchronised from "
                      "a neighbor's dense state after a missed update", [],
                      {(): node.resyncs if node is not None else 0})
        threepoint = node.threepoint if node is not None else None
        yield counter("crossgrad_cross_gradient_tensors", "Under EF21/CLAG: cross-gradient "
                      "tensors this node sent or skipped (clag), by outcome", ["outcome"],
                      {("sent",): threepoint.sent, ("skipped",): threepoint.skips}
                      if threepoint is not None else {})
        if runtime.server is not None:
            yield refused_calls(runtime.server.refusals)
        yield from self._round_times()

    def _traffic(self) -> Iterator[Metric]:
        """Bytes per (peer, kind), every current neighbor and kind listed (at 0 before the
        first message), from one Traffic view so that the two families agree."""
        node = self.runtime.node
        links = self.runtime.traffic.per_link()
        for j in node.assignment.neighbors if node is not None else ():
            links.setdefault(j, {k: (0, 0) for k in KINDS})
        for name, side, what in (("crossgrad_bytes_sent", 0, "sent to"),
                                 ("crossgrad_bytes_received", 1, "received from")):
            yield counter(name, f"Bytes {what} a peer, by message kind, framing included",
                          ["peer", "kind"],
                          {(str(peer), kind): pair[side]
                           for peer, kinds in links.items() for kind, pair in kinds.items()})

    def _round_times(self) -> Iterator[Metric]:
        loop = self.runtime.loop
        rounds: dict[tuple[str, ...], Tally] = {}
        phases: dict[tuple[str, ...], Tally] = {}
        if loop is not None:
            rounds[()] = loop.times.rounds()
            observed = loop.times.phases()
            phases = {(name,): observed[name] for name in PHASES if name in observed}
        yield histogram("crossgrad_round_seconds", "Time of one round", [], rounds)
        yield histogram("crossgrad_round_phase_seconds", "Time of one round's phases: compute, "
                        "wait (for the neighbors to answer), transfer, qp, mix", ["phase"],
                        phases)

"""Run-level measures (docs/algorithms.md, "Evaluation") and the JSON-lines metrics file."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch

Params = list[torch.Tensor]


def flatten(params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).to("cpu", torch.float64) for p in params])  # (d,)


def average(models: Sequence[Params]) -> Params:
    """x_bar, the plain average of the nodes' models, per tensor."""
    return [torch.stack([m[k] for m in models]).mean(dim=0) for k in range(len(models[0]))]


def consensus_distance(models: Sequence[Params]) -> float:
    """mean_i ||x_i - x_bar|| / ||x_bar||: 0 when every node holds the same model."""
    flat = torch.stack([flatten(m) for m in models])  # (n, d)
    mean = flat.mean(dim=0)  # (d,)
    return float((flat - mean).norm(dim=1).mean() / mean.norm().clamp_min(1e-30))


def digest(params: Sequence[torch.Tensor]) -> str:
    """SHA-256 over the raw bytes of every tensor in order: equal digests, bit-identical models."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class MetricsWriter:
    """Appends one JSON object per line; flushed after every record so a crash loses nothing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# The message kinds a node counts: GetModel and ComputeCrossGradient streams. Reports list
# these always (zeros where none crossed, as for cross-gradients under dpsgd), then any other.
KINDS = ("model", "cross_gradient")

Pair = tuple[int, int]  # (sent, received) bytes


class Traffic:
    """Bytes sent and received per (peer, message kind), counted from what crosses the wire.

    Each message counts its serialized size plus its gRPC and HTTP/2 framing (peer/wire.py,
    frame_bytes); TCP/IP headers are not counted. Thread safe: servers count from many threads.
    Each view (per peer, per kind, per peer and kind) is taken under the lock, so its parts add
    up to one moment's totals; a report that shows several should derive them from one
    per_link() view (kind_totals, pair_sum), as GetStatus does, so that they agree.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent: dict[tuple[int, str], int] = {}
        self.received: dict[tuple[int, str], int] = {}

    def add_sent(self, peer: int, kind: str, nbytes: int) -> None:
        with self._lock:
            self.sent[(peer, kind)] = self.sent.get((peer, kind), 0) + nbytes

    def add_received(self, peer: int, kind: str, nbytes: int) -> None:
        with self._lock:
            self.received[(peer, kind)] = self.received.get((peer, kind), 0) + nbytes

    def totals(self) -> tuple[int, int]:
        with self._lock:
            return sum(self.sent.values()), sum(self.received.values())

    def per_peer(self) -> dict[int, Pair]:
        """{peer: (sent, received)} over all kinds."""
        return {p: pair_sum(kinds.values()) for p, kinds in self.per_link().items()}

    def per_link(self) -> dict[int, dict[str, Pair]]:
        """{peer: {kind: (sent, received)}}, peers and kinds sorted; every peer lists KINDS."""
        with self._lock:
            peers = sorted({p for p, _ in self.sent} | {p for p, _ in self.received})
            kinds = _kinds(self.sent, self.received)
            return {p: {k: (self.sent.get((p, k), 0), self.received.get((p, k), 0))
                        for k in kinds} for p in peers}

    def per_kind(self) -> dict[str, Pair]:
        """{kind: (sent, received)} over all peers, kinds sorted; KINDS always listed."""
        return kind_totals(self.per_link())

    def snapshot(self) -> dict[str, dict[str, int]]:
        """{"sent" | "received": {"PEER:KIND": bytes}}: every counter, for summary.json."""
        with self._lock:
            return {"sent": {f"{p}:{k}": n for (p, k), n in self.sent.items()},
                    "received": {f"{p}:{k}": n for (p, k), n in self.received.items()}}


def kind_totals(per_link: dict[int, dict[str, Pair]]) -> dict[str, Pair]:
    """{kind: (sent, received)} summed over the links of a Traffic.per_link() view, kinds
    sorted, KINDS always listed: a report built from one view adds up whichever way it is read."""
    kinds = sorted(set(KINDS).union(k for link in per_link.values() for k in link))
    return {k: pair_sum(link.get(k, (0, 0)) for link in per_link.values()) for k in kinds}


def kinds_json(per_kind: dict[str, Pair]) -> dict[str, dict[str, int]]:
    """A per_kind() view as metrics.jsonl and summary.json write it:
    {kind: {"sent": bytes, "received": bytes}}."""
    return {k: {"sent": s, "received": r} for k, (s, r) in per_kind.items()}


def pair_sum(pairs: Iterable[Pair]) -> Pair:
    """(sum of sent, sum of received)."""
    sent = received = 0
    for s, r in pairs:
        sent, received = sent + s, received + r
    return sent, received


def _kinds(*counters: dict[tuple[int, str], int]) -> list[str]:
    return sorted(set(KINDS).union(k for counter in counters for _, k in counter))


# Upper bounds (s) of the round-time histograms: a round of the digits MLP on loopback takes
# milliseconds, one of a large model over a slow link minutes.
ROUND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                 30.0, 60.0, 120.0, 300.0)


class Tally(NamedTuple):
    """One histogram: counts[b] observations in (bounds[b-1], bounds[b]], the last count above
    every bound (so len(counts) == len(bounds) + 1), and the sum of the observations."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float


class RoundTimes:
    """Histograms of a peer's round times and of their parts (peer.rounds.RoundPhases), kept by
    the round loop and read by a metrics scrape from another thread (peer/exporter.py)."""

    def __init__(self, bounds: Sequence[float] = ROUND_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {}
        self._totals: dict[str, float] = {}

    def observe(self, seconds: float, phases: Mapping[str, float]) -> None:
        """One round: its time (under "round") and each phase's."""
        with self._lock:
            for name, value in (("round", seconds), *((f"phase:{k}", v)
                                                      for k, v in phases.items())):
                counts = self._counts.setdefault(name, [0] * (len(self.bounds) + 1))
                counts[_bucket(self.bounds, value)] += 1
                self._totals[name] = self._totals.get(name, 0.0) + value

    def rounds(self) -> Tally:
        """The round times."""
        return self._tally("round")

    def phases(self) -> dict[str, Tally]:
        """{phase: its times}, for the phases observed so far."""
        with self._lock:
            names = [n.removeprefix("phase:") for n in self._counts if n.startswith("phase:")]
        return {name: self._tally(f"phase:{name}") for name in names}

    def _tally(self, name: str) -> Tally:
        with self._lock:
            counts = self._counts.get(name, [0] * (len(self.bounds) + 1))
            return Tally(self.bounds, tuple(counts), self._totals.get(name, 0.0))


def _bucket(bounds: Sequence[float], value: float) -> int:
    """The index of the first bound >= value (len(bounds) above them all)."""
    for b, bound in enumerate(bounds):
        if value <= bound:
            return b
    return len(bounds)

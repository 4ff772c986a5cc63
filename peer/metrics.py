"""Run-level measures (ALGORITHMS.md, "Evaluation") and the JSON-lines metrics file."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

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


class Traffic:
    """Bytes sent and received per (peer, message kind), counted from what crosses the wire.

    Each message counts its serialized size plus its gRPC and HTTP/2 framing (peer/wire.py,
    frame_bytes); TCP/IP headers are not counted. Thread safe: servers count from many threads.
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

    def per_peer(self) -> dict[int, tuple[int, int]]:
        """{peer: (sent, received)} over all kinds."""
        with self._lock:
            out: dict[int, tuple[int, int]] = {}
            for (peer, _), n in self.sent.items():
                s, r = out.get(peer, (0, 0))
                out[peer] = (s + n, r)
            for (peer, _), n in self.received.items():
                s, r = out.get(peer, (0, 0))
                out[peer] = (s, r + n)
            return out

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {"sent": {f"{p}:{k}": n for (p, k), n in self.sent.items()},
                    "received": {f"{p}:{k}": n for (p, k), n in self.received.items()}}

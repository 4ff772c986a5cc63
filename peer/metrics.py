"""Run-level measures (ALGORITHMS.md, "Evaluation") and the JSON-lines metrics file."""

from __future__ import annotations

import hashlib
import json
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

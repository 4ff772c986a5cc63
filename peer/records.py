"""The run directory: one writer, one schema, for a simulation and for a deployed peer.

    config.json     the effective configuration
    metrics.jsonl   one JSON object per line, by "kind":
                    round   a node's round (peer.node.RoundRecord fields, its time split in
                            "phases", plus what the writer adds: bytes on the wire for a
                            deployed peer; docs/metrics.md)
                    eval    a test-set evaluation (round, accuracy, loss; the simulator adds the
                            average model and the consensus distance)
                    event   something that changed the run: assignment (new topology epoch),
                            catch_up, resume, alone, checkpoint_skipped ...
    summary.json    final figures
    model.pt / models.pt   the final parameters (torch.load(..., weights_only=True))

Lines are flushed one by one (peer.metrics.MetricsWriter), so a killed process loses nothing it
recorded; a resumed peer appends to the same metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from crossgrad.config import RunConfig
from peer.metrics import MetricsWriter
from peer.rounds import RoundRecord


class RunRecorder:
    """Writes the files of one run directory (see the module docstring)."""

    def __init__(self, out: Path, config: RunConfig) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(config.to_json())
        self._metrics = MetricsWriter(out / "metrics.jsonl")

    def round(self, record: RoundRecord, **extra: Any) -> None:
        self._metrics.write({"kind": "round", **dataclasses.asdict(record), **extra})

    def evaluation(self, round_: int, **fields: Any) -> None:
        self._metrics.write({"kind": "eval", "round": round_, **fields})

    def event(self, event: str, round_: int, **fields: Any) -> None:
        self._metrics.write({"kind": "event", "event": event, "round": round_, **fields})

    def finish(self, summary: dict[str, Any], models: object, models_file: str) -> None:
        """Save the final parameters under models_file and summary.json."""
        torch.save(models, self.out / models_file)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))

    def close(self) -> None:
        self._metrics.close()

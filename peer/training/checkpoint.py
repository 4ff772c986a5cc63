"""Checkpoints: a node's whole state in one integrity-checked file, written atomically.

A checkpoint holds what a node needs to continue its run exactly where it stopped: x_i, the
algorithm's memory (momentum, CGA's previous duals, the comp* self-gradient residuals), the
sender-side error-feedback residuals, the round, the torch CPU RNG state (Node.state_dict), with
the topology epoch of its assignment and the effective configuration. The batches and every
seeded draw derive from (seed, node, round, purpose) (docs/algorithms.md, "Determinism"), so a run
resumed from a checkpoint continues bit for bit as if it had never stopped.

File format (node-<id>-round-<round:09d>.ckpt):

    CROSSGRAD-CHECKPOINT 1\\n
    {"epoch": .., "length": .., "node_id": .., "round": .., "run_id": "..", "sha256": ".."}\\n
    <payload: torch.save({"node_id", "round", "epoch", "run_id", "config", "state"})>

The header's sha256 and length cover the payload; the payload repeats the header's fields, so a
damaged header is caught too. The payload is read with torch.load(weights_only=True): it holds
only tensors, dicts, lists, numbers, strings and None, never a pickled object.

Writing: a temp file in the same directory, flush + fsync, os.replace to the final name, fsync
of the directory: a crash at any point leaves either the old set of checkpoints or the new one,
plus at most a temp file that nothing reads. Reading (`latest`): the newest checkpoint that
verifies; each one that does not is reported in one log line (file and reason) and the previous
one is tried.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bootstrap.registry import shared_settings
from crossgrad.config import RunConfig
from crossgrad.errors import DataError

log = logging.getLogger(__name__)

# The default of --checkpoint-every. A save costs 12-76 ms here (fsync-bound for small models;
# docs/benchmarks.md, "Checkpoints"); a deployed peer's round, its exchanges with its neighbors
# included, takes 70 ms and more (digits/mlp, 5 peers on 2 cores) and a save at this interval
# then costs under 0.5% of round time, under 2% for every default model. Only the simulator's
# rounds (a few ms, no network) are short enough to need K ~ 200; it saves only when asked.
DEFAULT_EVERY = 50
MAGIC = b"CROSSGRAD-CHECKPOINT 1\n"
MAX_HEADER = 4096  # bytes: the JSON header line is about 200
_NAME = re.compile(r"node-(\d+)-round-(\d{9,})\.ckpt")


class CheckpointError(DataError):
    """A checkpoint that cannot be written, read or used (one line: the file and the reason)."""


@dataclass(frozen=True)
class Checkpoint:
    """One node's saved state and what it belongs to."""

    node_id: int
    round: int  # the node's round when saved: the next round it will run
    epoch: int  # topology epoch of its assignment
    run_id: str  # run_identity(config): which run this belongs to
    config: dict[str, Any]  # the effective RunConfig as dataclasses.asdict
    state: dict[str, Any]  # Node.state_dict()


def run_identity(config: RunConfig) -> str:
    """SHA-256 (hex) of the settings every node of a run shares (all but data_dir and device):
    equal for the nodes of one run and for a restart of it, different for any other run."""
    text = json.dumps(shared_settings(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def file_name(node_id: int, round_: int) -> str:
    return f"node-{node_id}-round-{round_:09d}.ckpt"


def encode(checkpoint: Checkpoint) -> bytes:
    """The file's bytes: magic line, JSON header line, payload."""
    meta = {"node_id": int(checkpoint.node_id), "round": int(checkpoint.round),
            "epoch": int(checkpoint.epoch), "run_id": str(checkpoint.run_id)}
    buffer = io.BytesIO()
    torch.save({**meta, "config": dict(checkpoint.config), "state": checkpoint.state}, buffer)
    payload = buffer.getvalue()
    header = {**meta, "length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload


def decode(data: bytes) -> Checkpoint:
    """A Checkpoint from a file's bytes; CheckpointError (the reason, one line) if they do not
    verify."""
    if not data.startswith(MAGIC):
        raise CheckpointError("not a crossgrad checkpoint (the first line is not "
                              f"{MAGIC.decode().strip()!r})")
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER)
    if end < 0:
        raise CheckpointError("truncated or damaged header (no end of line)")
    try:
        header = json.loads(data[len(MAGIC):end])
        length, checksum = int(header["length"]), str(header["sha256"])
    except (ValueError, KeyError, TypeError):
        raise CheckpointError("damaged header (not the expected JSON)") from None
    payload = data[end + 1:]
    if len(payload) != length:
        raise CheckpointError(f"truncated: the header declares a {length}-byte payload, the "
                              f"file holds {len(payload)}")
    if hashlib.sha256(payload).hexdigest() != checksum:
        raise CheckpointError("checksum mismatch: the payload is damaged")
    try:
        body = torch.load(io.BytesIO(payload), weights_only=True)
    # The payload passed its checksum, so only a file written by something else gets here;
    # torch.load raises many kinds of errors (UnpicklingError, RuntimeError, ...) with
    # multi-line messages: all of them mean the same to the caller.
    except Exception as exc:
        raise CheckpointError(f"payload not readable ({type(exc).__name__})") from None
    if not isinstance(body, dict) or not isinstance(body.get("state"), dict):
        raise CheckpointError("payload is not a checkpoint (no state)")
    fields = ("node_id", "round", "epoch", "run_id")
    if any(body.get(k) != header.get(k) for k in fields):
        raise CheckpointError("header and payload disagree on "
                              f"{[k for k in fields if body.get(k) != header.get(k)]}")
    if body["state"].get("round") != body["round"]:
        raise CheckpointError(f"the state is at round {body['state'].get('round')!r}, the "
                              f"header says {body['round']}")
    if not all(isinstance(body[k], int) for k in ("node_id", "round", "epoch")) or not (
            isinstance(body["run_id"], str) and isinstance(body.get("config"), dict)):
        raise CheckpointError("payload fields of the wrong types (expected integer node_id, "
                              "round and epoch, a string run_id and a config table)")
    return Checkpoint(node_id=body["node_id"], round=body["round"], epoch=body["epoch"],
                      run_id=body["run_id"], config=body["config"], state=body["state"])


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _one_line(text: str) -> str:
    return " ".join(text.split())


class CheckpointStore:
    """The checkpoints of one node in one directory: save, list, and find the latest usable."""

    def __init__(self, directory: Path, node_id: int, keep: int = 2) -> None:
        if keep < 1:
            raise CheckpointError(f"keep must be at least 1 checkpoint; got {keep}")
        self.directory = Path(directory)
        self.node_id = int(node_id)
        self.keep = int(keep)

    def _rounds(self) -> list[tuple[int, Path]]:
        """(round, path) of this node's checkpoint files, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.glob(f"node-{self.node_id}-round-*.ckpt"):
            match = _NAME.fullmatch(path.name)
            if match and int(match.group(1)) == self.node_id:
                found.append((int(match.group(2)), path))
        return sorted(found)

    def paths(self) -> list[Path]:
        """This node's checkpoint files, oldest first (temp files are never listed)."""
        return [path for _, path in self._rounds()]

    def save(self, checkpoint: Checkpoint) -> Path:
        """Write atomically, then keep only the newest `keep` checkpoints of this node.

        Files of this node at a later round than the one saved are removed as well: they belong
        to a future the run abandoned when it resumed from an earlier checkpoint (the newer
        one did not verify), and would otherwise crowd out the ones that do.
        """
        if checkpoint.node_id != self.node_id:
            raise CheckpointError(f"the store of node {self.node_id} was given node "
                                  f"{checkpoint.node_id}'s checkpoint")
        final = self.directory / file_name(self.node_id, checkpoint.round)
        data = encode(checkpoint)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{final.name}.",
                                       suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            _fsync_directory(self.directory)
        except OSError as exc:
            raise CheckpointError(f"cannot write checkpoint {final}: {exc.strerror or exc}; "
                                  "free some space or choose another checkpoint directory"
                                  ) from None
        self._prune(checkpoint.round)
        return final

    def _prune(self, saved: int) -> None:
        rounds = self._rounds()
        older = [path for r, path in rounds if r < saved]
        doomed = older[:max(0, len(older) - (self.keep - 1))]
        doomed += [path for r, path in rounds if r > saved]
        doomed += list(self.directory.glob(f".node-{self.node_id}-round-*.tmp"))  # crashed saves
        for path in doomed:
            try:
                path.unlink()
            except OSError as exc:  # a file we cannot remove costs space, not correctness
                log.warning("node %d: cannot remove old checkpoint %s: %s", self.node_id, path,
                            exc.strerror)

    def read(self, path: Path) -> Checkpoint:
        """The checkpoint in `path`, verified and of this node (CheckpointError otherwise)."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise CheckpointError(f"unreadable: {exc.strerror or exc}") from None
        checkpoint = decode(data)
        if checkpoint.node_id != self.node_id:
            raise CheckpointError(f"holds node {checkpoint.node_id}'s state, not node "
                                  f"{self.node_id}'s")
        match = _NAME.fullmatch(Path(path).name)
        if match and int(match.group(2)) != checkpoint.round:
            raise CheckpointError(f"holds round {checkpoint.round}, its name says "
                                  f"{int(match.group(2))}")
        return checkpoint

    def latest(self, run_id: str | None = None, *,
               accept: Callable[[Checkpoint], object] | None = None) -> Checkpoint | None:
        """The newest checkpoint that verifies (and belongs to run `run_id` when given).

        Each one that does not is reported in ONE warning line (file and reason, no traceback)
        and the previous one is tried; None when none is usable. `accept`, when given, is called
        with each candidate that verified; a DataError it raises (CheckpointError included)
        rejects the candidate the same way. Node.load_state_dict fits: it checks every tensor
        against the node's model and changes nothing unless all of them match.
        """
        for round_, path in reversed(self._rounds()):
            try:
                checkpoint = self.read(path)
                if run_id is not None and checkpoint.run_id != run_id:
                    raise CheckpointError(f"belongs to another run (run id "
                                          f"{checkpoint.run_id[:12]}, this run "
                                          f"{run_id[:12]}: different settings)")
                if accept is not None:
                    accept(checkpoint)
            except DataError as exc:
                log.warning("node %d: checkpoint %s (round %d) skipped: %s; trying an older one",
                            self.node_id, path, round_, _one_line(str(exc)))
                continue
            return checkpoint
        return None


# ---- checking a state against the node's model (Node.load_state_dict, Algorithm.check_state)
def check_tensor(name: str, value: object, like: torch.Tensor) -> None:
    """CheckpointError unless `value` is a tensor of like's shape and dtype."""
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{name}: expected a tensor, found {type(value).__name__}")
    if value.shape != like.shape or value.dtype != like.dtype:
        raise CheckpointError(f"{name}: expected {tuple(like.shape)} {like.dtype}, found "
                              f"{tuple(value.shape)} {value.dtype} (a checkpoint of another "
                              "model?)")


def check_tensors(name: str, value: object, like: Sequence[torch.Tensor]) -> None:
    """CheckpointError unless `value` is a list of tensors shaped as `like`, one per tensor."""
    if not isinstance(value, (list, tuple)) or len(value) != len(like):
        count = len(value) if isinstance(value, (list, tuple)) else type(value).__name__
        raise CheckpointError(f"{name}: expected a list of {len(like)} tensors, found {count}")
    for k, (v, l) in enumerate(zip(value, like, strict=True)):
        check_tensor(f"{name}[{k}]", v, l)


def check_residuals(name: str, value: object, like: Sequence[torch.Tensor]) -> None:
    """CheckpointError unless `value` is an ErrorFeedback.state_dict() whose residual of
    (link, tensor k) is shaped as like[k]."""
    if not isinstance(value, dict):
        raise CheckpointError(f"{name}: expected a table of residuals, found "
                              f"{type(value).__name__}")
    for key, residual in value.items():
        link, _, index = str(key).rpartition(".")
        if not (link.lstrip("-").isdigit() and index.isdigit() and int(index) < len(like)):
            raise CheckpointError(f"{name}: key {key!r}, expected 'LINK.INDEX' with INDEX "
                                  f"below {len(like)}")
        check_tensor(f"{name}[{key!r}]", residual, like[int(index)])


def to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it (in dicts, lists, tuples) copied to `device`."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, copy=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def make_checkpoint(config: RunConfig, node_id: int, epoch: int,
                    state: dict[str, Any]) -> Checkpoint:
    """A Checkpoint of `state` (Node.state_dict()) in the run of `config`."""
    return Checkpoint(node_id=node_id, round=int(state["round"]), epoch=epoch,
                      run_id=run_identity(config), config=asdict(config), state=state)

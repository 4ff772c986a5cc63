"""Three-point compressors for cross-gradients: EF21 and CLAG (`--feedback ef21|clag:Z`).

Richtarik, Sokolov, Fatkhullin, Sasha, Gorbunov, Li, Burlachenko, Zhao (ICML 2022, "3PC:
three point compressors"), section 3 (EF21) and section 4 (CLAG, lazy aggregation), as
docs/algorithms.md, "Three-point compressors for cross-gradients", writes them for crossgrad.

Sender l and receiver i of a cross-gradient g = g_il[p] both keep h = h_li[p], their shared
estimate of it (zeros at first). Per round and tensor:

    ef21     c = C(g - h); both ends h <- h + D(c); the receiver uses h
    clag:Z   as ef21 when ||g - h||^2 > Z ||g - y||^2 (y: the sender's g of the previous round on
             this link and tensor, zeros at first), else a skip: nothing is sent, h stays
    ef       classic error feedback (peer/compression/feedback.py): not this module

Both ends apply the same decoded tensor D(c) to the same h with the same operation, so their
estimates stay equal bit for bit (a test checks it after every round). A skip reaches the
receiver as a zero delta (`delta` below) and adds nothing on either end. With Z = 0 a skip happens
only when g == h exactly, where ef21 would send C(0) = 0: clag:0 is ef21 bit for bit.

State per (link, tensor index): the sender's h and y for each requester it serves, and the
receiver's h for each neighbor it hears from; all three tables go into checkpoints. Per link and
side, a digest of the estimates (peer/compression/digests.py): a message names the digest of the
sender's estimates it builds on, and a receiver holding another one (it missed a message)
resynchronises from the sender's dense estimates instead of applying it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from crossgrad.errors import ConfigError, DataError, InvalidMessage
from peer.compression.base import Compressed, Compressor
from peer.compression.digests import INITIAL_DIGEST
from peer.compression.feedback import compress_contractive

Key = tuple[int, int]  # (link, tensor index)

FEEDBACK_FORMS = ("ef", "ef21", "clag:Z")


@dataclass(frozen=True)
class FeedbackRule:
    """A parsed `--feedback` value: kind "ef", "ef21" or "clag"; threshold Z for clag."""

    kind: str
    threshold: float = 0.0

    @property
    def three_point(self) -> bool:
        """EF21 or CLAG: estimates on both ends, the self-gradient used exact."""
        return self.kind != "ef"


def parse_feedback(spec: str) -> FeedbackRule:
    """`ef`, `ef21` or `clag:Z` (Z a finite number >= 0); ConfigError otherwise."""
    name, colon, arg = spec.strip().partition(":")
    if name in ("ef", "ef21") and not colon:
        return FeedbackRule(name)
    if name == "clag" and colon:
        try:
            z = float(arg)
        except ValueError:
            z = math.nan
        if math.isfinite(z) and z >= 0:
            return FeedbackRule("clag", z)
        raise ConfigError(f"--feedback {spec}: Z must be a finite number >= 0 (clag:0 is ef21; "
                          "larger Z skips more messages), e.g. clag:1")
    raise ConfigError(f"--feedback {spec!r} is not known; expected one of "
                      f"{', '.join(FEEDBACK_FORMS)}")


def _squared_norm(x: torch.Tensor) -> float:
    return float(torch.sum(x.double() * x.double()))


class ThreePoint:
    """EF21 / CLAG state of one node, sender and receiver side, one estimate per key.

    Thread-safe as ErrorFeedback: one lock guards the tables; tensors are replaced, never
    modified in place, so state_dict reads a consistent snapshot.
    """

    def __init__(self, compressor: Compressor, rule: FeedbackRule) -> None:
        if not rule.three_point:
            raise ConfigError("ThreePoint needs --feedback ef21 or clag:Z (ef is ErrorFeedback)")
        self.compressor = compressor
        self.rule = rule
        self._sent: dict[Key, torch.Tensor] = {}  # sender's h per (requester, index)
        self._last: dict[Key, torch.Tensor] = {}  # sender's y: its previous g
        self._received: dict[Key, torch.Tensor] = {}  # receiver's h per (sender, index)
        self._digests: dict[tuple[str, int], int] = {}  # ("sent"|"received", link): digest
        self.skips = 0  # tensors the sender did not send (clag)
        self.sent = 0  # tensors the sender sent
        self._lock = threading.Lock()

    def send(self, link: int, index: int, g: torch.Tensor, *,
             seed: int) -> tuple[Compressed | None, torch.Tensor, torch.Tensor]:
        """Sender side for cross-gradient g to `link`: (record or None for a skip, the delta the
        receiver adds (zeros for a skip), the new estimate h)."""
        key = (int(link), int(index))
        g = g.detach()
        with self._lock:
            h = self._sent.get(key)
            y = self._last.get(key)
        h = torch.zeros_like(g) if h is None else h
        diff = g - h  # g - h
        skip = False
        if self.rule.kind == "clag":
            moved = g if y is None else g - y  # g - y, y = 0 at start
            skip = _squared_norm(diff) <= self.rule.threshold * _squared_norm(moved)
        record: Compressed | None = None
        if skip:
            delta = torch.zeros_like(g)
        else:
            record = compress_contractive(self.compressor, diff, seed=seed)
            try:
                delta = self.compressor.decompress(record, device=g.device).to(g.dtype)
            except InvalidMessage as e:  # a NaN or Inf in g: nothing is updated
                raise InvalidMessage(f"{self.rule.kind} for link {key[0]}, tensor {key[1]}: the "
                                     f"compressed tensor would be refused: {e}") from e
        h = h + delta  # the same operation as the receiver's (receive)
        with self._lock:
            self._sent[key] = h
            self._last[key] = g.clone()
            if skip:
                self.skips += 1
            else:
                self.sent += 1
        return record, delta, h

    def receive(self, link: int, index: int, delta: torch.Tensor) -> torch.Tensor:
        """Receiver side: h <- h + delta for the estimate of `link`'s tensor; the new h."""
        key = (int(link), int(index))
        with self._lock:
            h = self._received.get(key)
        if h is not None and (h.shape != delta.shape or h.dtype != delta.dtype):
            raise InvalidMessage(f"{self.rule.kind} update from node {key[0]}, tensor {key[1]}: "
                                 f"{tuple(delta.shape)} {delta.dtype}, the estimate is "
                                 f"{tuple(h.shape)} {h.dtype}")
        h = (torch.zeros_like(delta) if h is None else h) + delta
        with self._lock:
            self._received[key] = h
        return h

    def digest(self, side: str, link: int) -> int:
        """The digest of a link's estimates on one side ("sent" or "received")."""
        with self._lock:
            return self._digests.get((side, int(link)), INITIAL_DIGEST)

    def set_digest(self, side: str, link: int, digest: int) -> None:
        with self._lock:
            self._digests[(side, int(link))] = int(digest)

    def resync(self, link: int, estimates: list[torch.Tensor], digest: int) -> None:
        """The receiver's estimates of `link` replaced by the sender's dense ones."""
        with self._lock:
            for k, h in enumerate(estimates):
                self._received[(int(link), k)] = h
            self._digests[("received", int(link))] = int(digest)

    def estimate(self, side: str, link: int, index: int) -> torch.Tensor | None:
        """A copy of the sender's ("sent") or receiver's ("received") estimate of a key."""
        table = self._sent if side == "sent" else self._received
        with self._lock:
            h = table.get((int(link), int(index)))
        return None if h is None else h.clone()

    def reset(self, link: int | None = None) -> None:
        """Forget both ends' estimates of `link` (all links when None): a neighbor that left."""
        with self._lock:
            for table in (self._sent, self._last, self._received):
                for key in [k for k in table if link is None or k[0] == int(link)]:
                    del table[key]
            for dkey in [k for k in self._digests if link is None or k[1] == int(link)]:
                del self._digests[dkey]

    def state_dict(self) -> dict[str, object]:
        """{"sent"|"last"|"received": {"LINK.INDEX": tensor}, "skips": n, "sent_count": n}."""
        with self._lock:
            tables = {"sent": dict(self._sent), "last": dict(self._last),
                      "received": dict(self._received)}
            counts = {"skips": self.skips, "sent_count": self.sent}
            digests = {f"{side}.{link}": d for (side, link), d in self._digests.items()}
        return {**{name: {f"{l}.{k}": t.clone() for (l, k), t in table.items()}
                      for name, table in tables.items()}, **counts, "digests": digests}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Replace every estimate by those of `state` (all or nothing: DataError if malformed)."""
        tables: dict[str, dict[Key, torch.Tensor]] = {}
        for name in ("sent", "last", "received"):
            table = state.get(name, {})
            if not isinstance(table, Mapping):
                raise DataError(f"{self.rule.kind} state: {name!r} is not a table")
            tables[name] = {}
            for key, tensor in table.items():
                link, dot, index = str(key).rpartition(".")
                if not (dot and link.lstrip("-").isdigit() and index.isdigit()):
                    raise DataError(f"{self.rule.kind} state: key {key!r}, expected 'LINK.INDEX'")
                if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                    raise DataError(f"{self.rule.kind} state: {key!r} is not a floating tensor")
                tables[name][(int(link), int(index))] = tensor.detach().clone()
        skips, sent = state.get("skips", 0), state.get("sent_count", 0)
        if not isinstance(skips, int) or not isinstance(sent, int):
            raise DataError(f"{self.rule.kind} state: counts must be integers")
        saved = state.get("digests", {})  # absent in checkpoints of older versions
        digests: dict[tuple[str, int], int] = {}
        for key, value in (saved.items() if isinstance(saved, Mapping) else ()):
            side, _, link = str(key).partition(".")
            if side not in ("sent", "received") or not link.isdigit() or \
                    not isinstance(value, int):
                raise DataError(f"{self.rule.kind} state: digest {key!r}={value!r}, expected "
                                "'sent.LINK' or 'received.LINK' and an integer")
            digests[(side, int(link))] = value
        with self._lock:
            self._sent, self._last, self._received = (
                tables["sent"], tables["last"], tables["received"])
            self._digests = digests
            self.skips, self.sent = skips, sent

    def __repr__(self) -> str:
        return (f"ThreePoint({self.compressor.spec!r}, {self.rule.kind}, "
                f"{len(self._sent)} sent, {len(self._received)} received)")

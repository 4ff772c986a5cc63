"""Error feedback: a wrapper that remembers what a compressor dropped and sends it later.

For each (link, tensor index) the wrapper keeps a residual e (zeros at first) and compresses
    c = C(e + x);    e <- e + x - D(c)
where D is the compressor's own decoding, i.e. exactly what the receiver reconstructs. This is
EF-SGD (Karimireddy, Rebjock, Stich and Jaggi, ICML 2019, algorithm 2) without the learning rate
inside the memory, as docs/algorithms.md writes it for compcga/compngc: the sender keeps one memory
per (neighbor, tensor) for the cross-gradients it serves, and a node compresses its own
self-gradient through a separate link (any id that is not a neighbor's, e.g. its own id) with its
own memory. Invariant (tested): D(c) + e_new == x + e_old up to one rounding of the subtraction.

State (what a checkpoint saves): the residual tensors only, one per key, on the device and with
the dtype of the tensors compressed through them. A residual whose shape, dtype or device no
longer matches its tensor (the model changed) is refused with ConfigError; `reset(link)` forgets a
neighbor that left. Thread-safe: one lock per key serializes the compress calls of that key (links
proceed in parallel: torch and numpy release the GIL), and a global lock guards the tables; a
residual is replaced, never modified in place, so `state_dict` reads a consistent snapshot.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch

from crossgrad.errors import ConfigError, DataError, InvalidMessage
from peer.compression.base import Compressed, Compressor, make

Key = tuple[int, int]  # (link, tensor index)


def compress_contractive(compressor: Compressor, x: torch.Tensor, *, seed: int) -> Compressed:
    """C(x), made contractive: what error feedback and EF21 / CLAG (threepoint.py) compress with.

    An unbiased compressor with variance omega ||x||^2 (QSGD) is not contractive, and error
    feedback then diverges (seen: qsgd:7 on digits). C(x) / (1 + omega) is contractive (Stich &
    Karimireddy 2020, remark on unbiased compressors); QSGD commutes with the scaling, so
    compressing the scaled input sends exactly that.
    """
    omega = getattr(compressor, "omega", None)
    scaled = x if omega is None else x / (1.0 + omega(x.numel()))
    return compressor.compress(scaled, seed=seed)


class ErrorFeedback:
    """Error feedback around `compressor` (a Compressor or a spec), one residual per key."""

    def __init__(self, compressor: Compressor | str) -> None:
        self.compressor = make(compressor) if isinstance(compressor, str) else compressor
        self._residuals: dict[Key, torch.Tensor] = {}
        self._key_locks: dict[Key, threading.Lock] = {}
        self._lock = threading.Lock()

    def compress(self, link: int, index: int, x: torch.Tensor, *, seed: int) -> Compressed:
        """c = C(e + x) for the residual e of (link, index); then e <- e + x - D(c)."""
        key = (int(link), int(index))
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                old = self._residuals.get(key)
            x = x.detach()
            if old is not None and (old.shape != x.shape or old.dtype != x.dtype
                                    or old.device != x.device):
                raise ConfigError(
                    f"error feedback for link {key[0]}, tensor {key[1]}: the residual is "
                    f"{tuple(old.shape)} {old.dtype} on {old.device}, the tensor "
                    f"{tuple(x.shape)} {x.dtype} on {x.device}; reset the link when the model "
                    "changes")
            corrected = x if old is None else old + x  # e + x
            c = compress_contractive(self.compressor, corrected, seed=seed)
            try:
                sent = self.compressor.decompress(c, device=x.device)  # what the receiver gets
            except InvalidMessage as e:  # a NaN or Inf in x (or in e): nothing is updated
                raise InvalidMessage(f"error feedback for link {key[0]}, tensor {key[1]}: the "
                                     f"compressed tensor would be refused: {e}") from e
            residual = corrected - sent
            with self._lock:
                self._residuals[key] = residual
        return c

    def residual(self, link: int, index: int) -> torch.Tensor | None:
        """A copy of the residual of (link, index), or None before its first compress."""
        with self._lock:
            e = self._residuals.get((int(link), int(index)))
        return None if e is None else e.clone()

    def tracked(self) -> list[Key]:
        """The (link, index) pairs holding a residual, sorted."""
        with self._lock:
            return sorted(self._residuals)

    def reset(self, link: int | None = None) -> None:
        """Forget every residual of `link` (all links when None)."""
        with self._lock:
            for key in [k for k in self._residuals if link is None or k[0] == int(link)]:
                del self._residuals[key]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The residuals as {"LINK.INDEX": tensor} (copies), for a checkpoint."""
        with self._lock:
            items = list(self._residuals.items())
        return {f"{link}.{index}": e.clone() for (link, index), e in items}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace every residual by those of `state` (all or nothing: DataError if malformed)."""
        residuals: dict[Key, torch.Tensor] = {}
        for name, tensor in state.items():
            link, dot, index = str(name).rpartition(".")
            try:
                key = (int(link), int(index))
            except ValueError:
                key = None
            if not dot or key is None:
                raise DataError(f"error-feedback state: key {name!r}, expected 'LINK.INDEX' "
                                "(two integers)")
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                raise DataError(f"error-feedback state: {name!r} is not a floating tensor")
            residuals[key] = tensor.detach().clone()
        with self._lock:
            self._residuals = residuals

    def __len__(self) -> int:
        with self._lock:
            return len(self._residuals)

    def __repr__(self) -> str:
        return f"ErrorFeedback({self.compressor.spec!r}, {len(self)} residuals)"

"""The cyclic garbage collector, paced for a long-lived server.

CPython collects its youngest generation when allocations outnumber deallocations of tracked
objects by 700, and counts any deallocation, of objects of any age, against the allocations. A
server that holds a pending read on each of 1,000 streams and renews each read every second frees
as much as it allocates: the count stays low while the young generation fills with every stream's
fresh read (17,000 objects at 1,000 peers on grpc.aio), so the collections that do come find it
full, stop everything for 10-20 ms about once a second, and hand the survivors to the old
generations in lumps, whose own passes then stopped a bootstrap for 110-130 ms every few
seconds (docs/benchmarks.md, "Busy bootstrap").

`PacedCollector` takes the timing over: automatic collection off, the two young generations
collected every `young_seconds` (each pass then finds only what the last interval made, about a
millisecond's work at that load), and a full collection every `full_seconds`. Garbage in cycles
is freed within `young_seconds` if it is young, within `full_seconds` if it lived longer; what
refcounting frees (nearly everything) is freed at once, as always.
"""

from __future__ import annotations

import gc
import logging
import threading
import time

log = logging.getLogger(__name__)

YOUNG_SECONDS = 0.1
FULL_SECONDS = 60.0


class PacedCollector:
    """Collects from a daemon thread of its own, from start() until stop(); collection is off
    meanwhile, and on again after stop() if it was on before start()."""

    def __init__(self, young_seconds: float = YOUNG_SECONDS,
                 full_seconds: float = FULL_SECONDS) -> None:
        if not 0 < young_seconds <= full_seconds:
            raise ValueError(f"need 0 < young_seconds <= full_seconds; got {young_seconds} and "
                             f"{full_seconds}")
        self.young_seconds = young_seconds
        self.full_seconds = full_seconds
        self.passes = [0, 0]  # young, full: how many this collector made
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._was_enabled = False

    def start(self) -> PacedCollector:
        if self._thread is not None:
            raise RuntimeError("this PacedCollector was started already")
        self._was_enabled = gc.isenabled()
        gc.disable()
        self._thread = threading.Thread(target=self._run, name="paced-gc", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self._was_enabled:
            gc.enable()

    def __enter__(self) -> PacedCollector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        full_at = time.monotonic() + self.full_seconds
        while not self._stop.wait(self.young_seconds):
            try:
                if time.monotonic() >= full_at:
                    gc.collect(2)
                    self.passes[1] += 1
                    full_at = time.monotonic() + self.full_seconds
                else:
                    gc.collect(1)
                    self.passes[0] += 1
            except Exception:  # a finalizer's error: log it, keep collecting
                log.exception("garbage collection failed")

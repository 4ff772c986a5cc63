"""Epoch changes delivered to many waiting threads, a few at a time.

Every WatchAssignment stream holds a server thread (the synchronous gRPC server has no other way
to stream), and every one of them sleeps until the topology epoch changes. Waking them all at
once, as a condition's notify_all does, makes 1,000 threads runnable together at 1,000 peers:
they queue for the GIL and the registry's lock, and a Heartbeat or GetAssignment arriving then
waits behind all of them (p99 0.85 s while epochs changed, against 45 ms in the steady state;
docs/benchmarks.md, "Busy bootstrap"). A Fanout instead hands out *turns*: when the epoch
changes, every waiting watch is queued, and at most `width` of them are woken; each gives its
turn back once it has read its assignment, and the next in the queue is woken then. Unary calls
compete with a handful of threads, not with every subscriber, and the epoch still reaches every
watch, in the order they began to wait.

    watch = fanout.watch()
    try:
        epoch = watch.wait(seen, timeout)   # blocks; a new epoch comes with a turn
        ...read the assignment...
        watch.done()                        # the turn goes to the next watch
    finally:
        watch.close()

A watch that is cancelled (its client went away) or times out wakes on its own, without a turn.
Closing the Fanout wakes every watch, and wait() then raises Unavailable.
"""

from __future__ import annotations

import threading
from collections import deque

from crossgrad.errors import Unavailable

# Watches woken at once: enough to keep the cores busy while one waits for the registry's lock,
# few enough that a unary call finds the GIL within a few switch intervals.
WIDTH = 4


class Fanout:
    """The current epoch, and the watches waiting for it to change."""

    def __init__(self, epoch: int = 0, width: int = WIDTH) -> None:
        if width < 1:
            raise ValueError(f"a fanout needs a width of at least 1; got {width}")
        self.width = width
        self._lock = threading.Lock()
        self._epoch = epoch
        self._closed = False
        self._asleep: dict[Watch, None] = {}  # waiting for a change (insertion-ordered)
        self._queue: deque[Watch] = deque()  # the epoch changed: waiting for a turn
        self._turns = 0  # watches holding a turn

    @property
    def epoch(self) -> int:
        return self._epoch

    def watch(self) -> Watch:
        return Watch(self)

    def publish(self, epoch: int) -> None:
        """The epoch is now `epoch`: queue every sleeping watch for a turn, wake the first few."""
        with self._lock:
            self._epoch = epoch
            self._queue.extend(self._asleep)
            self._asleep.clear()
            self._grant()

    def close(self) -> None:
        """Wake every watch for good; their wait() raises Unavailable. Idempotent."""
        with self._lock:
            self._closed = True
            for watch in (*self._asleep, *self._queue):
                watch._event.set()
            self._asleep.clear()
            self._queue.clear()

    def waiting(self) -> int:
        """Watches asleep or queued (for tests and metrics)."""
        with self._lock:
            return len(self._asleep) + len(self._queue)

    def _grant(self) -> None:  # lock held
        while self._turns < self.width and self._queue:
            watch = self._queue.popleft()
            watch._turn = True
            self._turns += 1
            watch._event.set()

    def _give_back(self, watch: Watch) -> None:  # lock held
        if watch._turn:
            watch._turn = False
            self._turns -= 1
            self._grant()

    def _forget(self, watch: Watch) -> None:  # lock held
        self._asleep.pop(watch, None)
        if watch in self._queue:  # only after a timeout or a cancel: rare, so O(n) is fine
            self._queue.remove(watch)


class Watch:
    """One subscriber's place in a Fanout. wait() and done() are for the subscriber's own
    thread; cancel() for any other (grpc's termination callback)."""

    def __init__(self, fanout: Fanout) -> None:
        self._fanout = fanout
        self._event = threading.Event()
        self._turn = False
        self.cancelled = False

    def wait(self, seen: int, timeout: float | None) -> int:
        """Block until the epoch differs from `seen` and this watch has a turn (the epoch is
        returned, and the turn held until done() or the next wait), or until cancel() or
        timeout (`seen` is returned, no turn). Unavailable once the fanout is closed."""
        fanout = self._fanout
        with fanout._lock:
            fanout._give_back(self)
            if fanout._closed:
                raise Unavailable("the bootstrap is stopping; watch again once it is back")
            if self.cancelled:
                return seen
            self._event.clear()
            if fanout._epoch != seen:
                fanout._queue.append(self)
                fanout._grant()
            else:
                fanout._asleep[self] = None
        self._event.wait(timeout)
        with fanout._lock:
            if fanout._closed:
                fanout._give_back(self)
                raise Unavailable("the bootstrap is stopping; watch again once it is back")
            if self._turn:
                return fanout._epoch
            fanout._forget(self)
            return seen

    def done(self) -> None:
        """Give the turn back (if this watch holds one): the next queued watch is woken."""
        with self._fanout._lock:
            self._fanout._give_back(self)

    def cancel(self) -> None:
        """Wake this watch without a turn (its client went away); its next wait() returns at
        once."""
        with self._fanout._lock:
            self.cancelled = True
            self._event.set()

    def close(self) -> None:
        """Leave the fanout: give back any turn, drop out of the queue."""
        with self._fanout._lock:
            self._fanout._give_back(self)
            self._fanout._forget(self)

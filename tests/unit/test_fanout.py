"""bootstrap.fanout: epoch changes reach every watch, at most `width` of them awake at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from bootstrap.fanout import Fanout, Watch
from crossgrad.errors import Unavailable

TIMEOUT = 10.0


def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the watches"
        time.sleep(0.001)


class Subscriber:
    """A thread that waits for the epoch to leave `seen`, records it, and holds its turn until
    released."""

    def __init__(self, fanout: Fanout, seen: int, woke: list[tuple[int, int]], index: int,
                 timeout: float | None = TIMEOUT) -> None:
        self.watch = fanout.watch()
        self.release = threading.Event()
        self.result: int | BaseException | None = None

        def run() -> None:
            try:
                self.result = self.watch.wait(seen, timeout)
                if self.result != seen:
                    woke.append((index, self.result))
                    self.release.wait(TIMEOUT)
                self.watch.done()
            except Unavailable as exc:
                self.result = exc
            finally:
                self.watch.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()


def holding(subscribers: list[Subscriber]) -> list[int]:
    return [i for i, s in enumerate(subscribers) if s.watch._turn]


def test_a_change_wakes_width_watches_then_one_per_turn_given_back_in_order() -> None:
    fanout = Fanout(epoch=1, width=3)
    woke: list[tuple[int, int]] = []
    subs = []
    for i in range(8):  # one at a time, so the order they wait in is known
        subs.append(Subscriber(fanout, 1, woke, i))
        until(lambda n=i + 1: fanout.waiting() == n)
    fanout.publish(2)
    assert holding(subs) == [0, 1, 2]  # granted inside publish: exactly `width`
    until(lambda: len(woke) == 3)
    subs[1].release.set()
    until(lambda: holding(subs) == [0, 2, 3])
    for s in subs:
        s.release.set()
    for s in subs:
        s.thread.join(TIMEOUT)
    assert sorted(woke) == [(i, 2) for i in range(8)]  # every watch saw the new epoch
    assert fanout._turns == 0 and fanout.waiting() == 0


def test_a_wait_behind_the_epoch_returns_it_at_once_with_a_turn() -> None:
    fanout = Fanout(epoch=5, width=1)
    watch = fanout.watch()
    assert watch.wait(3, TIMEOUT) == 5 and watch._turn
    other = fanout.watch()
    assert other.wait(4, 0.01) == 4  # the one turn is taken: it times out in the queue
    assert fanout.waiting() == 0  # and leaves no trace there
    watch.done()
    assert other.wait(4, TIMEOUT) == 5
    other.close()
    assert fanout._turns == 0


def test_a_timeout_returns_what_was_seen_without_a_turn() -> None:
    fanout = Fanout(epoch=1)
    watch = fanout.watch()
    assert watch.wait(1, 0.01) == 1 and not watch._turn
    assert fanout.waiting() == 0


def test_cancel_wakes_one_watch_only_and_its_next_wait_returns_at_once() -> None:
    fanout = Fanout(epoch=1)
    woke: list[tuple[int, int]] = []
    gone, stays = Subscriber(fanout, 1, woke, 0), Subscriber(fanout, 1, woke, 1)
    until(lambda: fanout.waiting() == 2)
    gone.watch.cancel()
    gone.thread.join(TIMEOUT)
    assert gone.result == 1 and woke == [] and fanout.waiting() == 1
    assert gone.watch.wait(1, TIMEOUT) == 1  # cancelled for good: no blocking
    fanout.publish(2)
    stays.release.set()
    stays.thread.join(TIMEOUT)
    assert woke == [(1, 2)]


def test_a_watch_closed_while_holding_a_turn_passes_it_on() -> None:
    fanout = Fanout(epoch=1, width=1)
    fanout.publish(2)
    first = fanout.watch()
    assert first.wait(1, TIMEOUT) == 2 and first._turn  # the only turn
    woke: list[tuple[int, int]] = []
    second = Subscriber(fanout, 1, woke, 1)
    until(lambda: fanout.waiting() == 1)  # queued behind it
    assert woke == [] and not second.watch._turn
    first.close()  # e.g. its client went away mid-send
    second.release.set()
    second.thread.join(TIMEOUT)
    assert woke == [(1, 2)]


def test_closing_wakes_every_watch_and_later_waits_are_unavailable() -> None:
    fanout = Fanout(epoch=1, width=1)
    woke: list[tuple[int, int]] = []
    subs = [Subscriber(fanout, 1, woke, i) for i in range(4)]
    until(lambda: fanout.waiting() == 4)
    fanout.close()
    for s in subs:
        s.thread.join(TIMEOUT)
        assert isinstance(s.result, Unavailable)
    with pytest.raises(Unavailable, match="stopping"):
        Watch(fanout).wait(0, TIMEOUT)
    fanout.publish(2)  # a registry may still bump its epoch after its watches stopped
    assert fanout.waiting() == 0


def test_a_width_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="width of at least 1"):
        Fanout(width=0)

"""crossgrad.collector.PacedCollector: automatic collection off while it runs, cycles still freed
on its schedule, the collector's previous state back after it."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Callable, Iterator

import pytest

from crossgrad.collector import PacedCollector


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> Node:
    """One node of a reference cycle: once let go, only the cyclic collector frees it."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a


def within(seconds: float, condition: Callable[[], bool]) -> bool:
    """Whether condition() holds within `seconds`, polled."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def freed_within(ref: weakref.ref[Node], seconds: float) -> bool:
    return within(seconds, lambda: ref() is None)


@pytest.fixture
def enabled() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_automatic_collection_is_off_while_it_runs_and_back_after(enabled: None) -> None:
    with PacedCollector(young_seconds=0.05, full_seconds=10) as collector:
        assert not gc.isenabled()
        assert any(t.name == "paced-gc" for t in threading.enumerate())
        assert within(2.0, lambda: collector.passes[0] > 0)
    assert gc.isenabled()
    assert collector.passes[0] > 0  # young passes only: the full one is 10 s away
    assert collector.passes[1] == 0
    assert not any(t.name == "paced-gc" for t in threading.enumerate())


def test_it_leaves_collection_off_if_it_was_off() -> None:
    was = gc.isenabled()
    gc.disable()
    try:
        with PacedCollector(young_seconds=0.05):
            pass
        assert not gc.isenabled()
    finally:
        if was:
            gc.enable()


def test_young_cycles_are_freed_at_the_next_young_pass(enabled: None) -> None:
    with PacedCollector(young_seconds=0.05, full_seconds=60):
        ref = weakref.ref(cycle())
        assert freed_within(ref, 2.0), "a young cycle outlived ten young passes"


def test_old_cycles_wait_for_the_full_pass(enabled: None) -> None:
    with PacedCollector(young_seconds=0.05, full_seconds=60) as collector:
        held = cycle()
        ref = weakref.ref(held)
        gc.collect(1)  # held, it moves on to the oldest generation...
        del held  # ... and becomes garbage only there, where young passes never look
        assert not freed_within(ref, 0.5)
        assert collector.passes[1] == 0
    gc.collect()
    assert ref() is None


def test_a_full_pass_comes_every_full_seconds(enabled: None) -> None:
    with PacedCollector(young_seconds=0.05, full_seconds=0.2) as collector:
        held = cycle()
        ref = weakref.ref(held)
        gc.collect(1)
        del held
        assert freed_within(ref, 3.0), "an old cycle outlived several full periods"
    assert collector.passes[1] >= 1  # counted once its pass is over: read after the join


@pytest.mark.parametrize(("young", "full"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_bad_periods_are_refused(young: float, full: float) -> None:
    with pytest.raises(ValueError, match="0 < young_seconds <= full_seconds"):
        PacedCollector(young, full)


def test_it_starts_once(enabled: None) -> None:
    collector = PacedCollector(young_seconds=0.05).start()
    try:
        with pytest.raises(RuntimeError, match="started already"):
            collector.start()
    finally:
        collector.stop()

"""Fixtures for every test layer. `procs` owns the processes a test starts (see tests/procs.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from procs import ProcessGroup


@pytest.fixture
def procs() -> Iterator[ProcessGroup]:
    """A ProcessGroup for this test: every process it starts is stopped, with its whole process
    group, when the test ends, whatever the outcome."""
    with ProcessGroup() as group:
        yield group

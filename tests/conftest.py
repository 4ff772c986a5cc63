"""Fixtures for every test layer. `procs` owns the processes a test starts (see tests/procs.py);
`one_torch_thread` runs a module of tiny-batch torch tests on one intra-op thread."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from procs import ProcessGroup


@pytest.fixture
def procs() -> Iterator[ProcessGroup]:
    """A ProcessGroup for this test: every process it starts is stopped, with its whole process
    group, when the test ends, whatever the outcome."""
    with ProcessGroup() as group:
        yield group


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny batches: intra-op threads cost more in contention than they save (10x on 2 cores).
    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

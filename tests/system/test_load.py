"""Load: 64 neighbors fetch a 100 MB model from one peer at once; every copy arrives correct,
none is refused, and the server's memory stays at its two models plus a per-stream piece
(bench/load.py: a real PeerRuntime serving in its own process, 64 requesters in client
processes, one connection each; docs/benchmarks.md, "Load").

The bound, over the server's RSS before the model was built (the interpreter, torch, grpc):
  2 x model      the node's parameters and the published snapshot every stream reads;
  4 MiB/stream   what a stream holds at once: the 1 MiB message being built, the one grpc is
                 sending and grpc's copy of it, and the allocator's slack (measured 2.3 MiB);
  32 MiB         everything else a serving node allocates (threads, the CRC cache, grpc).
A per-request copy of the model would be 100 MB per stream, 6.4 GB in all: far above it.
"""

from __future__ import annotations

import json
import sys

import pytest

from procs import ProcessGroup

STREAMS = 64
MIB = 1 << 20
PER_STREAM = 4 * MIB
OTHER = 32 * MIB
TIMEOUT = 600.0  # s: about 30 s on a quiet 2-core machine; 64 x 100 MB are decoded on it too


@pytest.mark.slow
def test_64_concurrent_get_models_of_a_100_mb_model_are_all_served_in_bounded_memory(
        procs: ProcessGroup) -> None:
    run = procs.run([sys.executable, "bench/load.py", "--bytes", "100MB", "--streams",
                     str(STREAMS), "--json"], timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr
    (result,) = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    size = result["model_bytes"]
    assert 99e6 < size <= 100e6
    assert result["max_streams"] >= STREAMS  # the default limit, not one raised for the test
    assert (result["ok"], result["refused"], result["failed"]) == (STREAMS, 0, []), result
    assert result["correct"] == STREAMS, result  # every copy's CRC-32Cs are the server's own
    assert result["in_flight"] == STREAMS, result  # served at once, not one after another

    bound = result["server_base_rss"] + 2 * size + STREAMS * PER_STREAM + OTHER
    peak = result["server_peak_rss"]
    assert peak < bound, (f"server peak RSS {peak / 1e6:.0f} MB, bound {bound / 1e6:.0f} MB "
                          f"(model {size / 1e6:.0f} MB)", result)

"""bench/links.py at a small scale: GetModel and raw TCP over loopback, an unshaped veth and a
1 Gbit/s tbf link between network namespaces; every row is there, the shaper holds raw TCP to
its rate, GetModel keeps up with raw TCP on the shaped link, and the namespaces are gone after
(docs/benchmarks.md, "Links")."""

from __future__ import annotations

import json
import sys

import pytest
from netns import PREFIX, listed, unavailable

from procs import ProcessGroup

WHY = unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(WHY is not None, reason=WHY or "")]

GBIT_MB_PER_S = 125.0  # 1 Gbit/s in MB/s (10^6 bytes): the payload rate can only be below it


def test_getmodel_keeps_up_with_raw_tcp_over_a_1_gbit_link(procs: ProcessGroup) -> None:
    bench = procs.start([sys.executable, "bench/links.py", "--bytes", "30000000",
                         "--repeats", "2", "--rates", "1gbit", "--json"])
    out, err = bench.communicate(timeout=300.0)
    assert bench.returncode == 0, err
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    by = {(r["link"], r["method"]): r for r in rows}
    assert set(by) == {(link, method) for link in ("loopback", "veth", "tbf 1gbit")
                       for method in ("raw TCP", "GetModel")}
    shaped = by["tbf 1gbit", "raw TCP"]["mb_per_s"]
    assert 0.8 * GBIT_MB_PER_S < shaped <= GBIT_MB_PER_S, rows  # tbf holds the rate
    assert by["tbf 1gbit", "GetModel"]["x_raw_tcp"] > 0.9, rows  # goal 0.95, slack for load
    assert all(r["sender_cpu_s_per_gb"] > 0 and r["receiver_cpu_s_per_gb"] > 0 for r in rows)
    # Its namespaces (tests/faults/netns.py names them after the creating process) are removed.
    assert not [ns for ns in listed() if ns.startswith(f"{PREFIX}{bench.pid}x")]

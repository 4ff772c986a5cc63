"""CGA's projection of one large tensor: time and peak memory, in blocks and as one block.

    python bench/projection.py                          # 4M, 16M, 64M elements; 2 and 4 rows
    python bench/projection.py --elements 67108864 --rows 2 --repeats 5

`peer.algorithms.qp.project_many` makes its float64 copies a block of `qp.BLOCK` elements at a
time. Setting the block above the tensor's size gives the whole-tensor formula (one float64
copy of the self-gradient and of every row; the arithmetic before blocks were introduced, bit
for bit). Each measurement runs in a child process of its own: a float32 self-gradient and
`--rows` cross-gradients of `--elements` elements, the first row pulled against the
self-gradient so that the QP has work, then `project_many` `--repeats` times. "ms" is the
median of those; "peak MiB" is the most the process's resident memory rose above what it held
before a call, during it (Linux: the peak, VmHWM, reset through /proc/self/clear_refs before
each call). "x one block" compares the blocked path to the whole-tensor one in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHOLE = 1 << 40  # a block larger than any tensor: the whole-tensor formula

CHILD = """
import json, statistics, sys, time
import torch
from peer.algorithms import qp

def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SystemExit(f"no {field} in /proc/self/status")

d, t, block, repeats, threads = (int(a) for a in sys.argv[1:6])
torch.set_num_threads(threads)
qp.BLOCK = block
gen = torch.Generator().manual_seed(1)
own = torch.randn(d, generator=gen)
rows = [torch.randn(d, generator=gen) for _ in range(t)]
rows[0].mul_(0.3).sub_(own)  # pulled against the self-gradient: the QP has work
times, fell_back, grew = [], False, 0
for _ in range(repeats):
    resident = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from what is resident now
    started = time.perf_counter()
    [result] = qp.project_many([own], [rows], qp.QPOptions(), {})
    times.append(time.perf_counter() - started)
    grew = max(grew, status_kib("VmHWM") - resident)
    fell_back = fell_back or result.fell_back
    del result
print(json.dumps({"seconds": statistics.median(times), "grew_kib": grew,
                  "fell_back": fell_back}))
"""


@dataclass(frozen=True)
class Measured:
    seconds: float  # median of one project_many call
    peak_mib: float  # growth of the peak resident memory during the calls
    fell_back: bool  # whether any call's QP fell back (the figures would not be a solve's)


def measure(elements: int, rows: int, block: int, repeats: int = 1,
            threads: int = 1) -> Measured:
    """One child process: project_many on `elements` x (1 + `rows`) float32 values."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(elements), str(rows), str(block),
                           str(repeats), str(threads)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, check=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return Measured(float(figures["seconds"]), float(figures["grew_kib"]) / 1024,
                    bool(figures["fell_back"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=int, nargs="+",
                        default=[4 << 20, 16 << 20, 64 << 20])
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from peer.algorithms import qp

    print(f"# {platform.node()}: {platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, {args.threads} torch threads, block "
          f"{qp.BLOCK} elements, load average {os.getloadavg()[0]:.1f}")
    print("| elements | rows | float32 MiB in | path | ms | peak MiB | x one block (ms) |")
    print("|---:|---:|---:|---|---:|---:|---:|")
    for d in args.elements:
        for t in args.rows:
            whole = measure(d, t, WHOLE, args.repeats, args.threads)
            blocked = measure(d, t, qp.BLOCK, args.repeats, args.threads)
            size = 4 * d * (t + 1) / 2**20
            for name, m in (("one block", whole), ("blocks", blocked)):
                note = " (QP fell back)" if m.fell_back else ""
                print(f"| {d:,} | {t} | {size:.0f} | {name}{note} | {1e3 * m.seconds:.1f} | "
                      f"{m.peak_mib:.0f} | {m.seconds / whole.seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""Compressor throughput on one large float32 tensor (CPU): compress + decompress vs a plain copy.

    python bench/compressors.py                        # 10M floats, median of 5 after a warm-up
    python bench/compressors.py --numel 1000000 --repeats 9 --malloc default

For every compressor spec (default: all seven, topk and randk at 1%, qsgd:7 = 4 bits per element)
the table gives, in milliseconds, the median over --repeats of: compress, decompress into a new
tensor, decompress into a preallocated tensor (`out=`, as a receiver reusing its buffers does),
and the sum compress + decompress (new tensor); "x copy" is that sum divided by the time of
x.clone() in the same run. Baselines measured in the same run: x.clone(), and torch.topk(|x|, k)
for k = 1% (selection alone, without encoding anything). Each repetition runs every row once, in
turn, so that load from other work on the machine falls on all rows alike.

"bytes" is Compressed.nbytes, what the codec puts on the wire (payload + 8 bytes per codec
parameter; the transport's headers come on top); "ratio" is 4 * numel / bytes.

--malloc: "peer" (default) first calls peer.training.allocator.keep_freed_memory(), as every
peer does at start, so freed memory is reused and a new 40 MB tensor costs no page faults;
"default" keeps glibc's defaults, where each new tensor above 128 KiB is mapped fresh (about 20
ms of page faults per 40 MB on the 2-core VM these numbers were taken on), which shows in clone
and in decompress.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from peer.compression import Compressed, make  # noqa: E402

DEFAULT_SPECS = ["none", "fp16", "bf16", "topk:0.01", "randk:0.01", "qsgd:7", "sign"]


def timed(fn: Callable[[], object]) -> float:
    """Milliseconds of one call."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=10_000_000, help="elements of the tensor")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions after a warm-up")
    parser.add_argument("--specs", nargs="+", default=DEFAULT_SPECS, help="compressor specs")
    parser.add_argument("--malloc", choices=["peer", "default"], default="peer",
                        help="allocator setting (see the module docstring)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.malloc == "peer":
        from peer.training.allocator import keep_freed_memory
        keep_freed_memory()
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.numel, generator=gen)  # (d,) float32, like a large gradient tensor
    k = max(1, round(0.01 * args.numel))
    compressors = {spec: make(spec) for spec in args.specs}
    outs = {spec: torch.empty_like(x) for spec in args.specs}
    records: dict[str, Compressed] = {}

    # row name -> column -> the times of the repetitions (ms)
    rows: dict[str, dict[str, list[float]]] = {"copy": {"total": []}, "torch.topk": {"total": []}}
    for spec in args.specs:
        rows[spec] = {"compress": [], "decompress": [], "into out": [], "total": []}

    for rep in range(args.repeats + 1):  # the first pass is the warm-up
        keep = rep > 0
        t_copy = timed(lambda: x.clone())
        t_topk = timed(lambda: torch.topk(x.abs(), k))
        if keep:
            rows["copy"]["total"].append(t_copy)
            rows["torch.topk"]["total"].append(t_topk)
        for spec, c in compressors.items():
            start = time.perf_counter()
            record = c.compress(x, seed=args.seed + rep)
            t_c = (time.perf_counter() - start) * 1e3
            t_d = timed(lambda: c.decompress(record))  # noqa: B023  (called right here)
            t_o = timed(lambda: c.decompress(record, out=outs[spec]))  # noqa: B023
            records[spec] = record
            if keep:
                row = rows[spec]
                row["compress"].append(t_c)
                row["decompress"].append(t_d)
                row["into out"].append(t_o)
                row["total"].append(t_c + t_d)

    med = {name: {col: statistics.median(v) for col, v in row.items()}
           for name, row in rows.items()}
    copy_ms = med["copy"]["total"]
    dense = 4 * args.numel

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads; load average {load[0]:.2f}")
    print("command: python " + " ".join(sys.argv))
    print(f"{args.numel:,} float32 elements ({dense / 1e6:.1f} MB); median of {args.repeats} "
          f"after a warm-up; malloc: {args.malloc}")
    print()
    header = (f"| {'method':<22} | {'compress ms':>11} | {'decompress ms':>13} | "
              f"{'into out ms':>11} | {'total ms':>8} | {'x copy':>6} | {'bytes':>12} | "
              f"{'ratio':>7} |")
    print(header)
    print("|" + "|".join("-" * len(part) for part in header.split("|")[1:-1]) + "|")
    blank = "-"
    print(f"| {'copy: x.clone()':<22} | {blank:>11} | {blank:>13} | {blank:>11} | "
          f"{copy_ms:8.1f} | {1.0:6.2f} | {dense:12,} | {1.0:7.1f} |")
    print(f"| {'torch.topk(|x|, 1%)':<22} | {blank:>11} | {blank:>13} | {blank:>11} | "
          f"{med['torch.topk']['total']:8.1f} | {med['torch.topk']['total'] / copy_ms:6.2f} | "
          f"{blank:>12} | {blank:>7} |")
    for spec in args.specs:
        m, nbytes = med[spec], records[spec].nbytes
        print(f"| {spec:<22} | {m['compress']:11.1f} | {m['decompress']:13.1f} | "
              f"{m['into out']:11.1f} | {m['total']:8.1f} | {m['total'] / copy_ms:6.2f} | "
              f"{nbytes:12,} | {dense / nbytes:7.1f} |")
    if "topk:0.01" in med:
        m = med["topk:0.01"]
        print()
        print(f"topk:0.01 compress + decompress: {m['total']:.1f} ms (new tensor), "
              f"{m['compress'] + m['into out']:.1f} ms (into out); goal <= 20 ms; "
              f"torch.topk alone {med['torch.topk']['total']:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

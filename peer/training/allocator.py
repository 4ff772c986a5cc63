"""How a training process allocates memory: glibc keeps what torch frees, for the next pass.

By default glibc maps every allocation above 128 KiB (a dynamic threshold, at most 32 MiB) fresh
from the kernel and unmaps it on free, and trims the top of its heap back to the kernel once
128 KiB of it are free. A process that does the same work over and over (a peer receiving
same-sized models every round; a gradient pass allocating the same activations every time)
then pays a page fault per 4 KiB page on every reuse:

- decoding a 100 MB model stream ran at 1.1 GB/s, 3.9 GB/s with freed memory kept
  (bench/transfer.py);
- a simulated CGA round (5 nodes, cganet, batch 128: 15 passes, each allocating ~100 MB of
  activations and gradients) took 0.86 s, 0.65 s with it (docs/benchmarks.md, "Gradients").

What torch computes is unchanged: only where its buffers come from.
"""

from __future__ import annotations

import ctypes


def keep_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Ask glibc to serve allocations up to `limit_bytes` from its heap and to keep freed memory
    (no trim below twice that). Process-wide and idempotent. No-op (False) where the C library
    has no mallopt."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, limit_bytes)) and bool(
        mallopt(m_trim_threshold, 2 * limit_bytes))

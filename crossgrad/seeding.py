"""Seeds derived from (run seed, node id, round, purpose).

Everything random in crossgrad draws from a generator seeded here, so the in-process simulator
and a networked run produce bit-identical models. Python's hash() is salted per process, so the
derivation uses BLAKE2b over a canonical string instead.

It lives in the shared kernel because both components draw from it: the bootstrap (random
topologies) and the peer (models, partitions, batches, compressors), and the bootstrap never
imports the peer.
"""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from the run seed and any number of purpose parts (ints or strings)."""
    text = "/".join([str(int(seed)), *(str(p) for p in parts)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


def numpy_rng(seed: int, *parts: object) -> np.random.Generator:
    """A numpy Generator seeded from derive_seed(seed, *parts)."""
    return np.random.default_rng(derive_seed(seed, *parts))


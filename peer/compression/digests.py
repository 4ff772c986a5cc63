"""Digests of state that both ends of a link hold: model replicas (peer/replicas.py) and EF21 /
CLAG estimates (peer/compression/threepoint.py).

A digest is chained over the updates applied since the shared start: each update's round and
its payloads' CRC-32Cs (which the wire carries anyway), with clag's skip flags. An update names
the digest of the state it applies to (StreamHeader.base_digest); a receiver whose copy has
another digest (it missed an update: a fault, a restart) never applies it, and resynchronises
from the sender's dense state instead, which travels with its digest.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence


def chain(previous: int, round_: int, crcs: Sequence[int], skipped: Sequence[bool] = ()) -> int:
    """The digest after applying an update of `round_` with these payload CRC-32Cs (and clag's
    skip flags) to a state of digest `previous`; never 0 (0 means "no digest" on the wire)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack(f"<QQ{len(crcs)}I", previous, round_, *crcs))
    h.update(bytes(bool(s) for s in skipped))
    return int.from_bytes(h.digest(), "little") or 1


# The digest of the shared start: x^0 for replicas, zeros for three-point estimates.
INITIAL_DIGEST = chain(0, 0, ())

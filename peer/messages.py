"""The streams a node sends, serialized: one encoder per message kind for the Peer service
(peer/servicer.py) and for the simulator's byte counts (peer/simulate.py), so that a simulated
run reports exactly the bytes a networked one puts on the wire.

    model            x_i^t, dense (GetModel)
    cross_gradient   a cross-gradient: dense, compressed records (error feedback), or under
                     EF21 / CLAG the message to the requester's estimates (records, skips, the
                     digest of the estimates it builds on) (ComputeCrossGradient)
    model_update     q_i^t under replicas, with the digest of the replica it applies to
                     (GetModelUpdate)
    replica          x^_i at the start of a round, dense, with its digest (GetReplica)
    estimate         the dense estimates sent to a requester, with their digest (GetEstimate)
"""

from __future__ import annotations

from collections.abc import Iterator

from crossgrad.rpc import DEFAULT_CHUNK_BYTES
from peer.node import Node, Params
from peer.wire import encode_compressed_raw, encode_raw, frame_bytes, skip_record


def model_raw(node: Node, round_: int, params: Params, *, crcs: list[int] | None = None,
              chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    return encode_raw(node.names, params, sender_id=node.id, round_=round_,
                      chunk_bytes=chunk_bytes, crcs=crcs)


def cross_gradient_raw(node: Node, requester: int, round_: int, grads: Params, *,
                       chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """What the requester receives for a computed cross-gradient (`grads`, the dense form)."""
    message = node.three_point_message(requester, round_)
    if message is not None:
        codec = node.threepoint.compressor.name  # type: ignore[union-attr]
        records = [skip_record(codec, like) if r is None else r
                   for r, like in zip(message.records, grads, strict=True)]
        return encode_compressed_raw(node.names, records, sender_id=node.id, round_=round_,
                                     chunk_bytes=chunk_bytes, base_digest=message.base,
                                     skipped=message.skipped)
    compressed = node.cross_gradient_records(requester, round_)
    if compressed is not None:
        return encode_compressed_raw(node.names, compressed, sender_id=node.id, round_=round_,
                                     chunk_bytes=chunk_bytes)
    return encode_raw(node.names, grads, sender_id=node.id, round_=round_,
                      chunk_bytes=chunk_bytes)


def model_update_raw(node: Node, round_: int, *,
                     chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    records, base = node.model_update(round_)
    return encode_compressed_raw(node.names, records, sender_id=node.id, round_=round_,
                                 chunk_bytes=chunk_bytes, base_digest=base)


def replica_raw(node: Node, round_: int, *,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    replica = node.own_replica(round_)
    return encode_raw(node.names, replica.params, sender_id=node.id, round_=round_,
                      chunk_bytes=chunk_bytes, base_digest=replica.digest)


def estimate_raw(node: Node, requester: int, round_: int, *,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    estimates = node.three_point_estimates(requester, round_)
    return encode_raw(node.names, estimates.params, sender_id=node.id, round_=round_,
                      chunk_bytes=chunk_bytes, base_digest=estimates.digest)


def stream_bytes(raws: Iterator[bytes]) -> int:
    """The bytes a stream of serialized messages takes on the wire (framing included)."""
    return sum(frame_bytes(len(raw)) for raw in raws)

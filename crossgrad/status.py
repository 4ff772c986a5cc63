"""`crossgrad status ADDRESS`: a readable view of a peer or of the whole run (the bootstrap).

It asks Peer.GetStatus first; a server that does not implement it is the bootstrap, which
answers ListPeers.
"""

from __future__ import annotations

import math

import grpc

from crossgrad.errors import Unavailable
from crossgrad.rpc import from_rpc_error, make_channel
from crossgrad.v1 import bootstrap_pb2, bootstrap_pb2_grpc, peer_pb2, peer_pb2_grpc


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def format_peer(s: peer_pb2.PeerStatus) -> str:
    acc = "-" if math.isnan(s.last_accuracy) else f"{s.last_accuracy:.4f}"
    loss = "-" if math.isnan(s.last_loss) else f"{s.last_loss:.4f}"
    lines = [
        f"peer {s.node_id} at {s.address}: {s.state}, round {s.round}/{s.total_rounds}, "
        f"algorithm {s.algorithm}, topology epoch {s.topology_epoch}",
        f"  last loss {loss}, test accuracy {acc}, QP fallbacks {s.qp_fallbacks}, "
        f"missed answers {s.missed_neighbor_answers}, rejected messages {s.rejected_messages}",
        f"  bytes sent {_mib(s.bytes_sent)}, received {_mib(s.bytes_received)}; "
        f"self weight {s.self_weight:.4f}",
        f"  {'neighbor':>8}  {'weight':>8}  {'sent':>12}  {'received':>12}",
    ]
    links = {link.peer_id: link for link in s.links}
    for j in s.neighbor_ids:
        link = links.get(j)
        sent = _mib(link.sent_bytes) if link else "-"
        recv = _mib(link.received_bytes) if link else "-"
        lines.append(f"  {j:>8}  {s.weights[j]:>8.4f}  {sent:>12}  {recv:>12}")
    return "\n".join(lines)


def format_peers(r: bootstrap_pb2.ListPeersResponse) -> str:
    lines = [f"bootstrap: {len(r.peers)} of {r.expected} peers, topology epoch "
             f"{r.topology_epoch}, {r.settings.algorithm} on {r.settings.dataset} "
             f"({r.settings.partition}, {r.settings.topology}), {r.settings.rounds} rounds",
             f"  {'id':>4}  {'address':<22}  {'state':<8}  {'samples':>7}  {'round':>6}  "
             f"{'loss':>8}  {'seen':>8}"]
    for p in sorted(r.peers, key=lambda p: p.node_id):
        loss = "-" if math.isnan(p.loss) else f"{p.loss:.4f}"
        lines.append(f"  {p.node_id:>4}  {p.address:<22}  {p.state:<8}  {p.num_samples:>7}  "
                     f"{p.round:>6}  {loss:>8}  {p.last_seen_seconds_ago:>6.1f} s")
    return "\n".join(lines)


def show_status(address: str, timeout: float = 5.0) -> str:
    channel = make_channel(address)
    try:
        try:
            status = peer_pb2_grpc.PeerStub(channel).GetStatus(
                peer_pb2.GetStatusRequest(requester="crossgrad status"), timeout=timeout)
            return format_peer(status)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise from_rpc_error(err, f"GetStatus at {address}") from None
        try:
            peers = bootstrap_pb2_grpc.BootstrapStub(channel).ListPeers(
                bootstrap_pb2.ListPeersRequest(), timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err, f"ListPeers at {address}") from None
        return format_peers(peers)
    except Unavailable:
        raise
    finally:
        channel.close()

"""`crossgrad status ADDRESS`: a readable view of a peer or of the whole run (the bootstrap).

It asks Peer.GetStatus first; a server that does not implement it is the bootstrap, which
answers ListPeers. With --watch it keeps looking (crossgrad/watch.py) and draws each look with
crossgrad/display.py until the run ends or Ctrl-C, then prints this view of the last look.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence

import grpc
from rich.console import Console

from crossgrad.errors import Unavailable
from crossgrad.rpc import from_rpc_error, make_channel
from crossgrad.security import Security
from crossgrad.v1 import bootstrap_pb2, bootstrap_pb2_grpc, peer_pb2, peer_pb2_grpc

# Short column labels of the message kinds (peer.proto, KindBytes.kind), in the order shown;
# a kind not listed here (from a newer peer) is shown under its own name, after these.
KIND_LABELS = {"model": "model", "cross_gradient": "xgrad"}


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def kind_columns(kinds: Iterable[str]) -> list[tuple[str, str]]:
    """(kind, label) for each kind, known ones first in KIND_LABELS order, then the rest sorted."""
    present = set(kinds)
    known = [(k, label) for k, label in KIND_LABELS.items() if k in present]
    return known + [(k, k) for k in sorted(present - KIND_LABELS.keys())]


def byte_columns(kinds: Sequence[tuple[str, str]]) -> list[str]:
    """Headers of the byte columns, in MiB: totals, then sent and received per kind."""
    heads = ["sent MiB", "recv MiB"]
    for _, label in kinds:
        heads += [f"{label} sent", f"{label} recv"]
    return heads


def byte_cells(sent: int, received: int, by_kind: Mapping[str, tuple[int, int]],
               kinds: Sequence[tuple[str, str]], width: int) -> str:
    """The cells under byte_columns(kinds): MiB, two decimals ("-" for a kind never counted)."""
    cells = [f"{sent / 2**20:>{width}.2f}", f"{received / 2**20:>{width}.2f}"]
    for kind, _ in kinds:
        pair = by_kind.get(kind)
        cells += ([f"{'-':>{width}}"] * 2 if pair is None
                  else [f"{n / 2**20:>{width}.2f}" for n in pair])
    return "  ".join(cells)


def format_peer(s: peer_pb2.PeerStatus) -> str:
    acc = "-" if math.isnan(s.last_accuracy) else f"{s.last_accuracy:.4f}"
    loss = "-" if math.isnan(s.last_loss) else f"{s.last_loss:.4f}"
    kinds = kind_columns([k.kind for k in s.kinds]
                         + [k.kind for link in s.links for k in link.kinds])
    heads = byte_columns(kinds)
    width = max(10, *(len(h) for h in heads))
    lines = [
        f"peer {s.node_id} at {s.address}: {s.state}, round {s.round}/{s.total_rounds}, "
        f"algorithm {s.algorithm}, topology epoch {s.topology_epoch}",
        f"  last loss {loss}, test accuracy {acc}, QP fallbacks {s.qp_fallbacks}, "
        f"missed answers {s.missed_neighbor_answers}, rejected messages {s.rejected_messages}",
        f"  bytes sent {_mib(s.bytes_sent)}, received {_mib(s.bytes_received)}; "
        f"self weight {s.self_weight:.4f}",
        *([f"  resumed from a checkpoint {s.resumes} time(s), last from round "
           f"{s.resumed_from_round}"] if s.resumes else []),
        *([f"  caught up with its neighbors {s.catch_ups} time(s), last to round "
           f"{s.caught_up_to_round}"] if s.catch_ups else []),
        *(["  training alone: no live neighbor answers"] if s.state == "ALONE" else []),
        *([f"  resynchronised {s.resyncs} replica(s) or estimate(s) after missed updates"]
          if s.resyncs else []),
        *([f"  cross-gradient tensors skipped (clag) {s.cross_skips} of "
           f"{s.cross_skips + s.cross_sent}"] if s.cross_skips + s.cross_sent else []),
        *([f"  refused calls: {refusals(s.refusals)}"] if s.refusals else []),
        f"  {'neighbor':>8}  {'weight':>8}  " + "  ".join(f"{h:>{width}}" for h in heads),
    ]
    links = {link.peer_id: link for link in s.links}
    # current neighbors in assignment order, then any former neighbor bytes crossed with
    rows = list(s.neighbor_ids) + sorted(links.keys() - set(s.neighbor_ids))
    for j in rows:
        weight = f"{s.weights[j]:>8.4f}" if j in s.weights else f"{'-':>8}"
        link = links.get(j)
        if link is None:
            cells = "  ".join(f"{'-':>{width}}" for _ in heads)
        else:
            cells = byte_cells(link.sent_bytes, link.received_bytes, _pairs(link.kinds), kinds,
                               width)
        lines.append(f"  {j:>8}  {weight}  {cells}")
    lines.append(f"  {'all':>8}  {'':>8}  "
                 + byte_cells(s.bytes_sent, s.bytes_received, _pairs(s.kinds), kinds, width))
    return "\n".join(lines)


def refusals(counts: Mapping[str, int]) -> str:
    """"PERMISSION_DENIED 2, UNAUTHENTICATED 1": calls a server refused (docs/security.md)."""
    return ", ".join(f"{code} {n}" for code, n in sorted(counts.items()))


def _pairs(kinds: Iterable[peer_pb2.KindBytes]) -> dict[str, tuple[int, int]]:
    return {k.kind: (k.sent_bytes, k.received_bytes) for k in kinds}


# How the bootstrap's peer states (bootstrap.proto, PeerInfo.state) read in the table: a peer
# whose lease expired is presumed dead until it heartbeats or joins again.
STATE_LABELS = {"EXPIRED": "dead"}
PEERS_LEGEND = ("  dead: lease expired; returns: back after dead or LEFT; resumes: restarts "
                "from a checkpoint; unreachable: neighbors' missed-answer reports")


def format_peers(r: bootstrap_pb2.ListPeersResponse) -> str:
    """The bootstrap's table: one row per peer, then the legend of its states and counters."""
    dead = sum(p.state == "EXPIRED" for p in r.peers)
    left = sum(p.state == "LEFT" for p in r.peers)
    lines = [f"bootstrap: {len(r.peers)} of {r.expected} peers ({dead} dead, {left} left), "
             f"topology epoch {r.topology_epoch}, {r.settings.algorithm} on "
             f"{r.settings.dataset} ({r.settings.partition}, {r.settings.topology}), "
             f"{r.settings.rounds} rounds",
             f"  {'id':>4}  {'address':<22}  {'state':<8}  {'samples':>7}  {'round':>6}  "
             f"{'loss':>8}  {'seen':>8}  {'returns':>7}  {'resumes':>7}  {'unreachable':>11}"]
    for p in sorted(r.peers, key=lambda p: p.node_id):
        loss = "-" if math.isnan(p.loss) else f"{p.loss:.4f}"
        state = STATE_LABELS.get(p.state, p.state)
        lines.append(f"  {p.node_id:>4}  {p.address:<22}  {state:<8}  {p.num_samples:>7}  "
                     f"{p.round:>6}  {loss:>8}  {p.last_seen_seconds_ago:>6.1f} s  "
                     f"{p.returns:>7}  {p.resumes:>7}  {p.unreachable_reports:>11}")
    lines.append(PEERS_LEGEND)
    if r.refusals:
        lines.append(f"  refused calls: {refusals(r.refusals)}")
    return "\n".join(lines)


def show_status(address: str, timeout: float = 5.0, *, security: Security | None = None,
                server_name: str | None = None) -> str:
    """A peer's status, or the bootstrap's table of peers (`security`: None is plaintext)."""
    channel = make_channel(address, security=security, server_name=server_name)
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


def watch_status(address: str, *, interval: float = 1.0, timeout: float = 5.0,
                 security: Security | None = None, server_name: str | None = None,
                 console: Console | None = None) -> str:
    """Show a peer, or every peer of the run, until the run ends (every peer done) or Ctrl-C;
    the text view of the last look. A watched address that stops answering is an error
    (Unavailable); a peer of the run that does, reads "down"."""
    from crossgrad.display import RunDisplay
    from crossgrad.watch import RunWatcher

    watcher = RunWatcher(address, security=security, server_name=server_name, timeout=timeout)
    try:
        with RunDisplay(console, title=f"crossgrad status {address}") as display:
            while True:
                snapshot = watcher.poll()
                display.update(snapshot)
                if snapshot.finished:
                    break
                time.sleep(interval)  # a person's refresh rate, not a synchronization
    except KeyboardInterrupt:
        pass  # Ctrl-C ends watching, not the run: show what was seen last
    finally:
        watcher.close()
    last = watcher.last
    if last is None:
        return ""
    return format_peer(last) if isinstance(last, peer_pb2.PeerStatus) else format_peers(last)

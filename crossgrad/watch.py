"""Watching a run over gRPC: the bootstrap's ListPeers and each peer's GetStatus as display rows.

`crossgrad demo` and `crossgrad status --watch` poll with a RunWatcher and draw what it returns
with crossgrad.display. The conversions (row_of_status, rows_of_run) are pure: tests feed them
messages. A peer that does not answer keeps the figures it last reported and reads "down".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import replace

import grpc

from crossgrad.display import PeerRow, Snapshot, state_label
from crossgrad.rpc import from_rpc_error, make_channel
from crossgrad.security import Security, node_server_name
from crossgrad.v1 import bootstrap_pb2, bootstrap_pb2_grpc, peer_pb2, peer_pb2_grpc

log = logging.getLogger(__name__)


def row_of_status(s: peer_pb2.PeerStatus) -> PeerRow:
    """A peer's row from its own GetStatus."""
    return PeerRow(node=s.node_id, round=s.round, loss=s.last_loss, accuracy=s.last_accuracy,
                   evaluated=s.evaluated_round, sent=s.bytes_sent, received=s.bytes_received,
                   state=state_label(s.state, waiting_on=list(s.waiting_on),
                                     resumed=s.resumes > 0))


# PeerInfo.health of a peer that left after its last round (bootstrap.proto).
FINISHED_NOTE = "left: done"


def rows_of_run(listed: bootstrap_pb2.ListPeersResponse,
                statuses: Mapping[int, peer_pb2.PeerStatus],
                previous: Mapping[int, PeerRow]) -> list[PeerRow]:
    """One row per peer the bootstrap lists: the peer's own status where it answered; else
    the bootstrap's round and loss, the figures the peer last gave, and "down" (expired, or
    silent), "left", or "done" for a peer that finished and then left."""
    rows = []
    for p in sorted(listed.peers, key=lambda p: p.node_id):
        status = statuses.get(p.node_id)
        if status is not None and p.state != "EXPIRED":
            rows.append(row_of_status(status))
            continue
        before = previous.get(p.node_id, PeerRow(node=p.node_id, round=0))
        # A peer that ran every round leaves with "done" (PeerInfo.health): its last
        # heartbeat's round may be older than the run's last, which it reached.
        finished = p.state == "LEFT" and (before.state == "done" or p.health == FINISHED_NOTE)
        state = "done" if finished else state_label(p.state, down=p.state != "LEFT",
                                                    left=p.state == "LEFT")
        last = listed.settings.rounds if finished and listed.settings.rounds else 0
        rows.append(replace(before, round=max(p.round, before.round, last),
                            loss=before.loss if math.isnan(p.loss) else p.loss, state=state))
    return rows


class RunWatcher:
    """Polls one address: a peer (its GetStatus alone) or the bootstrap (ListPeers, then the
    GetStatus of every peer it lists). With TLS, each peer's certificate must name it
    (node-ID.crossgrad), as for a neighbor's call."""

    def __init__(self, address: str, *, security: Security | None = None,
                 server_name: str | None = None, timeout: float = 2.0) -> None:
        self.address = address
        self.security = security
        self.timeout = timeout
        self._channel = make_channel(address, security=security, server_name=server_name)
        self._peers: dict[tuple[int, str], grpc.Channel] = {}  # by (node id, address)
        self.rows: dict[int, PeerRow] = {}  # by node id, as last seen
        self.is_bootstrap: bool | None = None  # known after the first poll
        self.last: peer_pb2.PeerStatus | bootstrap_pb2.ListPeersResponse | None = None

    def _status(self, channel: grpc.Channel) -> peer_pb2.PeerStatus:
        return peer_pb2_grpc.PeerStub(channel).GetStatus(
            peer_pb2.GetStatusRequest(requester="crossgrad watch"), timeout=self.timeout)

    def _peer_channel(self, node: int, address: str) -> grpc.Channel:
        channel = self._peers.get((node, address))
        if channel is None:
            channel = self._peers[(node, address)] = make_channel(
                address, security=self.security, server_name=node_server_name(node))
        return channel

    def poll(self) -> Snapshot:
        """The run now. Raises ProtocolError (Unavailable ...) when the watched address itself
        does not answer; a peer of the run that does not answer reads "down"."""
        if self.is_bootstrap is not True:
            try:
                status = self._status(self._channel)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNIMPLEMENTED:  # a bootstrap has no GetStatus
                    raise from_rpc_error(err, f"GetStatus at {self.address}") from None
                self.is_bootstrap = True
            else:
                self.is_bootstrap, self.last = False, status
                return Snapshot(rows=(row_of_status(status),), rounds=status.total_rounds,
                                nodes=1)
        try:
            listed = bootstrap_pb2_grpc.BootstrapStub(self._channel).ListPeers(
                bootstrap_pb2.ListPeersRequest(), timeout=self.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err, f"ListPeers at {self.address}") from None
        self.last = listed
        statuses = {}
        for p in listed.peers:
            if p.state in ("EXPIRED", "LEFT") or not p.address:
                continue
            try:
                statuses[p.node_id] = self._status(self._peer_channel(p.node_id, p.address))
            except grpc.RpcError as err:
                log.debug("node %d at %s does not answer GetStatus: %s", p.node_id, p.address,
                          err.code())
        rows = rows_of_run(listed, statuses, self.rows)
        self.rows = {row.node: row for row in rows}
        return Snapshot(rows=tuple(rows), rounds=listed.settings.rounds, nodes=listed.expected)

    def close(self) -> None:
        self._channel.close()
        for channel in self._peers.values():
            channel.close()
        self._peers.clear()

"""The bootstrap's messages <-> crossgrad's own types (the Bootstrap service's one serde module).

The servicer builds its responses here and a peer reads them back here, so both sides agree on every
field by construction (docs/conventions.md, "One translator"). RunSettings mirrors RunConfig field
for field, by name, except the fields that are each process's own (registry.LOCAL_FIELDS: data_dir,
device): the settings are copied through the message descriptor, so a field added to both stays in
sync with no edit here, and tests/rpc/test_bootstrap_rpc.py fails if the two drift apart.
"""

from __future__ import annotations

import math

from bootstrap.registry import AssignmentView, Neighbor, PeerView
from crossgrad.config import RunConfig
from crossgrad.errors import InvalidMessage
from crossgrad.v1 import bootstrap_pb2 as pb

SETTINGS_FIELDS: tuple[str, ...] = tuple(f.name for f in pb.RunSettings.DESCRIPTOR.fields)


def settings_to_proto(settings: RunConfig) -> pb.RunSettings:
    """The run's shared settings as sent in Join, GetAssignment and ListPeers answers."""
    return pb.RunSettings(**{name: getattr(settings, name) for name in SETTINGS_FIELDS})


def settings_from_proto(message: pb.RunSettings) -> RunConfig:
    """The RunConfig a bootstrap sent. data_dir and device keep their defaults: the caller sets
    its own with dataclasses.replace. Not validated here: the peer validates what it will run."""
    if message.nodes < 1:
        raise InvalidMessage("the run settings name no nodes (nodes = 0): the answer carried "
                             "no settings; is the bootstrap running the same crossgrad.v1?")
    values = {name: getattr(message, name) for name in SETTINGS_FIELDS}
    return RunConfig(**values)


def assignment_to_proto(view: AssignmentView,
                        settings: pb.RunSettings | None = None) -> pb.Assignment:
    """`settings` may be a message built once (the servicer's), to skip converting per call."""
    return pb.Assignment(
        node_id=view.node_id,
        neighbors=[pb.Neighbor(node_id=j, address=address, weight=weight)
                   for j, address, weight in view.neighbors],
        self_weight=view.self_weight,
        topology_epoch=view.epoch,
        settings=settings if settings is not None else settings_to_proto(view.settings),
    )


def assignment_from_proto(message: pb.Assignment) -> AssignmentView:
    """What a peer makes of an Assignment; checks what a peer must be able to rely on."""
    ids = [n.node_id for n in message.neighbors]
    if message.node_id in ids or len(set(ids)) != len(ids):
        raise InvalidMessage(f"assignment of node {message.node_id} lists neighbors {ids}: "
                             f"expected distinct ids other than the node itself")
    weights = [n.weight for n in message.neighbors] + [message.self_weight]
    if not all(math.isfinite(w) and 0.0 <= w <= 1.0 for w in weights) or \
            not math.isclose(sum(weights), 1.0, abs_tol=1e-9):
        raise InvalidMessage(f"assignment of node {message.node_id}: mixing weights {weights} "
                             f"must lie in [0, 1] and sum to 1")
    return AssignmentView(
        node_id=message.node_id,
        neighbors=[Neighbor(n.node_id, n.address, n.weight) for n in message.neighbors],
        self_weight=message.self_weight,
        epoch=message.topology_epoch,
        settings=settings_from_proto(message.settings),
    )


def peer_to_proto(peer: PeerView, now: float) -> pb.PeerInfo:
    """One ListPeers row; `now` is the registry's clock, so 'seconds ago' is on the same one."""
    return pb.PeerInfo(
        node_id=peer.node_id,
        address=peer.address,
        num_samples=peer.num_samples,
        state=peer.state.value,
        round=peer.round,
        loss=peer.loss,
        last_seen_seconds_ago=max(0.0, now - peer.last_seen),
        returns=peer.returns,
        resumes=peer.resumes,
        unreachable_reports=peer.unreachable_reports,
        health=peer.health,
    )


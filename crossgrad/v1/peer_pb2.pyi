from crossgrad.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetModelRequest(_message.Message):
    __slots__ = ("requester_id", "round")
    REQUESTER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    requester_id: int
    round: int
    def __init__(self, requester_id: _Optional[int] = ..., round: _Optional[int] = ...) -> None: ...

class CrossGradientRequest(_message.Message):
    __slots__ = ("requester_id", "round", "replica_digest")
    REQUESTER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REPLICA_DIGEST_FIELD_NUMBER: _ClassVar[int]
    requester_id: int
    round: int
    replica_digest: int
    def __init__(self, requester_id: _Optional[int] = ..., round: _Optional[int] = ..., replica_digest: _Optional[int] = ...) -> None: ...

class ModelUpdateRequest(_message.Message):
    __slots__ = ("requester_id", "round")
    REQUESTER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    requester_id: int
    round: int
    def __init__(self, requester_id: _Optional[int] = ..., round: _Optional[int] = ...) -> None: ...

class ReplicaRequest(_message.Message):
    __slots__ = ("requester_id", "round")
    REQUESTER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    requester_id: int
    round: int
    def __init__(self, requester_id: _Optional[int] = ..., round: _Optional[int] = ...) -> None: ...

class EstimateRequest(_message.Message):
    __slots__ = ("requester_id", "round")
    REQUESTER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    requester_id: int
    round: int
    def __init__(self, requester_id: _Optional[int] = ..., round: _Optional[int] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ("requester",)
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    requester: str
    def __init__(self, requester: _Optional[str] = ...) -> None: ...

class LinkBytes(_message.Message):
    __slots__ = ("peer_id", "sent_bytes", "received_bytes", "kinds")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    peer_id: int
    sent_bytes: int
    received_bytes: int
    kinds: _containers.RepeatedCompositeFieldContainer[KindBytes]
    def __init__(self, peer_id: _Optional[int] = ..., sent_bytes: _Optional[int] = ..., received_bytes: _Optional[int] = ..., kinds: _Optional[_Iterable[_Union[KindBytes, _Mapping]]] = ...) -> None: ...

class KindBytes(_message.Message):
    __slots__ = ("kind", "sent_bytes", "received_bytes")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    kind: str
    sent_bytes: int
    received_bytes: int
    def __init__(self, kind: _Optional[str] = ..., sent_bytes: _Optional[int] = ..., received_bytes: _Optional[int] = ...) -> None: ...

class PeerStatus(_message.Message):
    __slots__ = ("node_id", "address", "round", "total_rounds", "algorithm", "neighbor_ids", "weights", "self_weight", "topology_epoch", "last_loss", "last_accuracy", "bytes_sent", "bytes_received", "links", "qp_fallbacks", "missed_neighbor_answers", "rejected_messages", "state", "kinds", "resumes", "resumed_from_round", "caught_up_to_round", "catch_ups", "refusals", "waiting_on", "evaluated_round", "resyncs", "cross_skips", "cross_sent", "last_round", "last_round_seconds", "last_round_phases", "last_round_served_seconds")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    class RefusalsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class LastRoundPhasesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOR_IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SELF_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_FIELD_NUMBER: _ClassVar[int]
    LAST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    QP_FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    MISSED_NEIGHBOR_ANSWERS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    RESUMES_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FROM_ROUND_FIELD_NUMBER: _ClassVar[int]
    CAUGHT_UP_TO_ROUND_FIELD_NUMBER: _ClassVar[int]
    CATCH_UPS_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    WAITING_ON_FIELD_NUMBER: _ClassVar[int]
    EVALUATED_ROUND_FIELD_NUMBER: _ClassVar[int]
    RESYNCS_FIELD_NUMBER: _ClassVar[int]
    CROSS_SKIPS_FIELD_NUMBER: _ClassVar[int]
    CROSS_SENT_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_PHASES_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_SERVED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    address: str
    round: int
    total_rounds: int
    algorithm: str
    neighbor_ids: _containers.RepeatedScalarFieldContainer[int]
    weights: _containers.ScalarMap[int, float]
    self_weight: float
    topology_epoch: int
    last_loss: float
    last_accuracy: float
    bytes_sent: int
    bytes_received: int
    links: _containers.RepeatedCompositeFieldContainer[LinkBytes]
    qp_fallbacks: int
    missed_neighbor_answers: int
    rejected_messages: int
    state: str
    kinds: _containers.RepeatedCompositeFieldContainer[KindBytes]
    resumes: int
    resumed_from_round: int
    caught_up_to_round: int
    catch_ups: int
    refusals: _containers.ScalarMap[str, int]
    waiting_on: _containers.RepeatedScalarFieldContainer[int]
    evaluated_round: int
    resyncs: int
    cross_skips: int
    cross_sent: int
    last_round: int
    last_round_seconds: float
    last_round_phases: _containers.ScalarMap[str, float]
    last_round_served_seconds: float
    def __init__(self, node_id: _Optional[int] = ..., address: _Optional[str] = ..., round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., algorithm: _Optional[str] = ..., neighbor_ids: _Optional[_Iterable[int]] = ..., weights: _Optional[_Mapping[int, float]] = ..., self_weight: _Optional[float] = ..., topology_epoch: _Optional[int] = ..., last_loss: _Optional[float] = ..., last_accuracy: _Optional[float] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., links: _Optional[_Iterable[_Union[LinkBytes, _Mapping]]] = ..., qp_fallbacks: _Optional[int] = ..., missed_neighbor_answers: _Optional[int] = ..., rejected_messages: _Optional[int] = ..., state: _Optional[str] = ..., kinds: _Optional[_Iterable[_Union[KindBytes, _Mapping]]] = ..., resumes: _Optional[int] = ..., resumed_from_round: _Optional[int] = ..., caught_up_to_round: _Optional[int] = ..., catch_ups: _Optional[int] = ..., refusals: _Optional[_Mapping[str, int]] = ..., waiting_on: _Optional[_Iterable[int]] = ..., evaluated_round: _Optional[int] = ..., resyncs: _Optional[int] = ..., cross_skips: _Optional[int] = ..., cross_sent: _Optional[int] = ..., last_round: _Optional[int] = ..., last_round_seconds: _Optional[float] = ..., last_round_phases: _Optional[_Mapping[str, float]] = ..., last_round_served_seconds: _Optional[float] = ...) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunSettings(_message.Message):
    __slots__ = ("nodes", "topology", "algorithm", "dataset", "partition", "model", "rounds", "batch_size", "lr", "lr_decay", "momentum", "margin", "gamma", "alpha", "seed", "eval_every", "compressor", "model_compressor", "consensus_step", "feedback", "memory_format")
    NODES_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    LR_DECAY_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EVAL_EVERY_FIELD_NUMBER: _ClassVar[int]
    COMPRESSOR_FIELD_NUMBER: _ClassVar[int]
    MODEL_COMPRESSOR_FIELD_NUMBER: _ClassVar[int]
    CONSENSUS_STEP_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FORMAT_FIELD_NUMBER: _ClassVar[int]
    nodes: int
    topology: str
    algorithm: str
    dataset: str
    partition: str
    model: str
    rounds: int
    batch_size: int
    lr: float
    lr_decay: float
    momentum: float
    margin: float
    gamma: float
    alpha: float
    seed: int
    eval_every: int
    compressor: str
    model_compressor: str
    consensus_step: float
    feedback: str
    memory_format: str
    def __init__(self, nodes: _Optional[int] = ..., topology: _Optional[str] = ..., algorithm: _Optional[str] = ..., dataset: _Optional[str] = ..., partition: _Optional[str] = ..., model: _Optional[str] = ..., rounds: _Optional[int] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., lr_decay: _Optional[float] = ..., momentum: _Optional[float] = ..., margin: _Optional[float] = ..., gamma: _Optional[float] = ..., alpha: _Optional[float] = ..., seed: _Optional[int] = ..., eval_every: _Optional[int] = ..., compressor: _Optional[str] = ..., model_compressor: _Optional[str] = ..., consensus_step: _Optional[float] = ..., feedback: _Optional[str] = ..., memory_format: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("node_id", "address", "num_samples", "resumed", "checkpoint_round")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ROUND_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    address: str
    num_samples: int
    resumed: bool
    checkpoint_round: int
    def __init__(self, node_id: _Optional[int] = ..., address: _Optional[str] = ..., num_samples: _Optional[int] = ..., resumed: _Optional[bool] = ..., checkpoint_round: _Optional[int] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("ready", "joined", "expected", "settings")
    READY_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    joined: int
    expected: int
    settings: RunSettings
    def __init__(self, ready: _Optional[bool] = ..., joined: _Optional[int] = ..., expected: _Optional[int] = ..., settings: _Optional[_Union[RunSettings, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "round", "loss", "health", "unreachable_neighbors", "assignment_epoch")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    round: int
    loss: float
    health: str
    unreachable_neighbors: _containers.RepeatedScalarFieldContainer[int]
    assignment_epoch: int
    def __init__(self, node_id: _Optional[int] = ..., round: _Optional[int] = ..., loss: _Optional[float] = ..., health: _Optional[str] = ..., unreachable_neighbors: _Optional[_Iterable[int]] = ..., assignment_epoch: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("topology_epoch", "lease_seconds", "assignment")
    TOPOLOGY_EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    topology_epoch: int
    lease_seconds: float
    assignment: Assignment
    def __init__(self, topology_epoch: _Optional[int] = ..., lease_seconds: _Optional[float] = ..., assignment: _Optional[_Union[Assignment, _Mapping]] = ...) -> None: ...

class GetAssignmentRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    def __init__(self, node_id: _Optional[int] = ...) -> None: ...

class Neighbor(_message.Message):
    __slots__ = ("node_id", "address", "weight")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    address: str
    weight: float
    def __init__(self, node_id: _Optional[int] = ..., address: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("node_id", "neighbors", "self_weight", "topology_epoch", "settings")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    SELF_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_EPOCH_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    neighbors: _containers.RepeatedCompositeFieldContainer[Neighbor]
    self_weight: float
    topology_epoch: int
    settings: RunSettings
    def __init__(self, node_id: _Optional[int] = ..., neighbors: _Optional[_Iterable[_Union[Neighbor, _Mapping]]] = ..., self_weight: _Optional[float] = ..., topology_epoch: _Optional[int] = ..., settings: _Optional[_Union[RunSettings, _Mapping]] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("node_id", "reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    reason: str
    def __init__(self, node_id: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPeersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeerInfo(_message.Message):
    __slots__ = ("node_id", "address", "num_samples", "state", "round", "loss", "last_seen_seconds_ago", "returns", "resumes", "unreachable_reports", "health")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_SECONDS_AGO_FIELD_NUMBER: _ClassVar[int]
    RETURNS_FIELD_NUMBER: _ClassVar[int]
    RESUMES_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_REPORTS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    address: str
    num_samples: int
    state: str
    round: int
    loss: float
    last_seen_seconds_ago: float
    returns: int
    resumes: int
    unreachable_reports: int
    health: str
    def __init__(self, node_id: _Optional[int] = ..., address: _Optional[str] = ..., num_samples: _Optional[int] = ..., state: _Optional[str] = ..., round: _Optional[int] = ..., loss: _Optional[float] = ..., last_seen_seconds_ago: _Optional[float] = ..., returns: _Optional[int] = ..., resumes: _Optional[int] = ..., unreachable_reports: _Optional[int] = ..., health: _Optional[str] = ...) -> None: ...

class ListPeersResponse(_message.Message):
    __slots__ = ("peers", "expected", "topology_epoch", "settings", "refusals")
    class RefusalsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    PEERS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_EPOCH_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    peers: _containers.RepeatedCompositeFieldContainer[PeerInfo]
    expected: int
    topology_epoch: int
    settings: RunSettings
    refusals: _containers.ScalarMap[str, int]
    def __init__(self, peers: _Optional[_Iterable[_Union[PeerInfo, _Mapping]]] = ..., expected: _Optional[int] = ..., topology_epoch: _Optional[int] = ..., settings: _Optional[_Union[RunSettings, _Mapping]] = ..., refusals: _Optional[_Mapping[str, int]] = ...) -> None: ...

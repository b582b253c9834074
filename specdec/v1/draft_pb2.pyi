from specdec.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProposeItem(_message.Message):
    __slots__ = ("session_id", "prefix_len", "tokens", "num_speculative_tokens", "sampling", "uniforms", "features", "tree_branching", "tree_max_nodes")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PREFIX_LEN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_SPECULATIVE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    UNIFORMS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    TREE_BRANCHING_FIELD_NUMBER: _ClassVar[int]
    TREE_MAX_NODES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prefix_len: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    num_speculative_tokens: int
    sampling: _common_pb2.SamplingParams
    uniforms: _containers.RepeatedScalarFieldContainer[float]
    features: _common_pb2.Features
    tree_branching: _containers.RepeatedScalarFieldContainer[int]
    tree_max_nodes: int
    def __init__(self, session_id: _Optional[str] = ..., prefix_len: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., num_speculative_tokens: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., uniforms: _Optional[_Iterable[float]] = ..., features: _Optional[_Union[_common_pb2.Features, _Mapping]] = ..., tree_branching: _Optional[_Iterable[int]] = ..., tree_max_nodes: _Optional[int] = ...) -> None: ...

class ProposeRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ProposeItem]
    def __init__(self, items: _Optional[_Iterable[_Union[ProposeItem, _Mapping]]] = ...) -> None: ...

class Proposal(_message.Message):
    __slots__ = ("session_id", "draft_tokens", "draft_probs", "draft_parents")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PROBS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PARENTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    draft_tokens: _containers.RepeatedScalarFieldContainer[int]
    draft_probs: _containers.RepeatedCompositeFieldContainer[_common_pb2.SparseDistribution]
    draft_parents: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[str] = ..., draft_tokens: _Optional[_Iterable[int]] = ..., draft_probs: _Optional[_Iterable[_Union[_common_pb2.SparseDistribution, _Mapping]]] = ..., draft_parents: _Optional[_Iterable[int]] = ...) -> None: ...

class ProposeResponse(_message.Message):
    __slots__ = ("proposals", "compute_seconds", "forward_passes", "batch_size", "queue_seconds", "handler_seconds")
    PROPOSALS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HANDLER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    proposals: _containers.RepeatedCompositeFieldContainer[Proposal]
    compute_seconds: float
    forward_passes: int
    batch_size: int
    queue_seconds: float
    handler_seconds: float
    def __init__(self, proposals: _Optional[_Iterable[_Union[Proposal, _Mapping]]] = ..., compute_seconds: _Optional[float] = ..., forward_passes: _Optional[int] = ..., batch_size: _Optional[int] = ..., queue_seconds: _Optional[float] = ..., handler_seconds: _Optional[float] = ...) -> None: ...

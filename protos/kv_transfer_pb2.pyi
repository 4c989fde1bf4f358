from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVLayout(_message.Message):
    __slots__ = ("num_layers", "num_kv_heads", "head_dim", "dtype", "block_size", "block_bytes_per_layer")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_size: int
    block_bytes_per_layer: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ..., block_size: _Optional[int] = ..., block_bytes_per_layer: _Optional[_Iterable[int]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol_version", "layout_hash", "layout")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_HASH_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    layout_hash: str
    layout: KVLayout
    def __init__(self, protocol_version: _Optional[int] = ..., layout_hash: _Optional[str] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ...) -> None: ...

class HandshakeRequest(_message.Message):
    __slots__ = ("consumer",)
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    consumer: Hello
    def __init__(self, consumer: _Optional[_Union[Hello, _Mapping]] = ...) -> None: ...

class HandshakeResponse(_message.Message):
    __slots__ = ("producer",)
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    producer: Hello
    def __init__(self, producer: _Optional[_Union[Hello, _Mapping]] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("handle", "block_ids", "max_chunk_bytes", "stream_handle")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    STREAM_HANDLE_FIELD_NUMBER: _ClassVar[int]
    handle: str
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    max_chunk_bytes: int
    stream_handle: str
    def __init__(self, handle: _Optional[str] = ..., block_ids: _Optional[_Iterable[int]] = ..., max_chunk_bytes: _Optional[int] = ..., stream_handle: _Optional[str] = ...) -> None: ...

class BlockChunk(_message.Message):
    __slots__ = ("layer_index", "first_block", "num_blocks", "payload")
    LAYER_INDEX_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    layer_index: int
    first_block: int
    num_blocks: int
    payload: bytes
    def __init__(self, layer_index: _Optional[int] = ..., first_block: _Optional[int] = ..., num_blocks: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("handle",)
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    handle: str
    def __init__(self, handle: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("num_blocks_freed",)
    NUM_BLOCKS_FREED_FIELD_NUMBER: _ClassVar[int]
    num_blocks_freed: int
    def __init__(self, num_blocks_freed: _Optional[int] = ...) -> None: ...

class BulkTicket(_message.Message):
    __slots__ = ("port", "ticket")
    PORT_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    port: int
    ticket: bytes
    def __init__(self, port: _Optional[int] = ..., ticket: _Optional[bytes] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("peer_id", "backend", "tp_size", "tp_rank", "block_bytes_per_layer")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    backend: str
    tp_size: int
    tp_rank: int
    block_bytes_per_layer: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, peer_id: _Optional[str] = ..., backend: _Optional[str] = ..., tp_size: _Optional[int] = ..., tp_rank: _Optional[int] = ..., block_bytes_per_layer: _Optional[_Iterable[int]] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("store_port", "group_name", "timeout_s")
    STORE_PORT_FIELD_NUMBER: _ClassVar[int]
    GROUP_NAME_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    store_port: int
    group_name: str
    timeout_s: float
    def __init__(self, store_port: _Optional[int] = ..., group_name: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class CollectivePullRequest(_message.Message):
    __slots__ = ("pull", "group_name")
    PULL_FIELD_NUMBER: _ClassVar[int]
    GROUP_NAME_FIELD_NUMBER: _ClassVar[int]
    pull: PullRequest
    group_name: str
    def __init__(self, pull: _Optional[_Union[PullRequest, _Mapping]] = ..., group_name: _Optional[str] = ...) -> None: ...

class CollectiveProgress(_message.Message):
    __slots__ = ("num_bytes", "chunk_bytes", "done", "layer_index", "first_block", "num_blocks", "producer_wait_us")
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    LAYER_INDEX_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_WAIT_US_FIELD_NUMBER: _ClassVar[int]
    num_bytes: int
    chunk_bytes: int
    done: bool
    layer_index: int
    first_block: int
    num_blocks: int
    producer_wait_us: int
    def __init__(self, num_bytes: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., done: _Optional[bool] = ..., layer_index: _Optional[int] = ..., first_block: _Optional[int] = ..., num_blocks: _Optional[int] = ..., producer_wait_us: _Optional[int] = ...) -> None: ...

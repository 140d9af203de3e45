from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class KVChunk(_message.Message):
    __slots__ = ("transfer_id", "request_id", "first_layer", "num_layers", "block_ids", "dtype", "shape", "offset", "total_bytes", "length", "crc32c", "end", "layers_sent")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_LAYER_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    LAYERS_SENT_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    request_id: str
    first_layer: int
    num_layers: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    total_bytes: int
    length: int
    crc32c: int
    end: bool
    layers_sent: int
    def __init__(self, transfer_id: _Optional[str] = ..., request_id: _Optional[str] = ..., first_layer: _Optional[int] = ..., num_layers: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., total_bytes: _Optional[int] = ..., length: _Optional[int] = ..., crc32c: _Optional[int] = ..., end: _Optional[bool] = ..., layers_sent: _Optional[int] = ...) -> None: ...

class PushResult(_message.Message):
    __slots__ = ("transfer_id", "layers_received", "bytes_received")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    LAYERS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    layers_received: int
    bytes_received: int
    def __init__(self, transfer_id: _Optional[str] = ..., layers_received: _Optional[int] = ..., bytes_received: _Optional[int] = ...) -> None: ...

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Request(_message.Message):
    __slots__ = ("input", "info")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    input: bytes
    info: Info
    def __init__(self, input: _Optional[bytes] = ..., info: _Optional[_Union[Info, _Mapping]] = ...) -> None: ...

class Reply(_message.Message):
    __slots__ = ("Output", "ContentType")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    CONTENTTYPE_FIELD_NUMBER: _ClassVar[int]
    Output: bytes
    ContentType: str
    def __init__(self, Output: _Optional[bytes] = ..., ContentType: _Optional[str] = ...) -> None: ...

class Info(_message.Message):
    __slots__ = ("FunctionName", "Timeout", "Runtime", "Limits", "Trigger", "Hops")
    FUNCTIONNAME_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    FunctionName: str
    Timeout: str
    Runtime: str
    Limits: Resources
    Trigger: Trigger
    Hops: int
    def __init__(self, FunctionName: _Optional[str] = ..., Timeout: _Optional[str] = ..., Runtime: _Optional[str] = ..., Limits: _Optional[_Union[Resources, _Mapping]] = ..., Trigger: _Optional[_Union[Trigger, _Mapping]] = ..., Hops: _Optional[int] = ...) -> None: ...

class Trigger(_message.Message):
    __slots__ = ("Name", "Topic", "Time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    Name: str
    Topic: str
    Time: str
    def __init__(self, Name: _Optional[str] = ..., Topic: _Optional[str] = ..., Time: _Optional[str] = ...) -> None: ...

class Resources(_message.Message):
    __slots__ = ("Memory", "CPU", "GPU")
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    Memory: str
    CPU: str
    GPU: str
    def __init__(self, Memory: _Optional[str] = ..., CPU: _Optional[str] = ..., GPU: _Optional[str] = ...) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Message(_message.Message):
    __slots__ = ("Msg",)
    MSG_FIELD_NUMBER: _ClassVar[int]
    Msg: bytes
    def __init__(self, Msg: _Optional[bytes] = ...) -> None: ...

class Messages(_message.Message):
    __slots__ = ("Output",)
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    Output: bytes
    def __init__(self, Output: _Optional[bytes] = ...) -> None: ...

class CreateFunctionRequest(_message.Message):
    __slots__ = ("Service", "Image", "EnvVars", "Labels", "Annotations", "Constraints", "Secrets", "RegistryAuth", "Limits", "Requests", "MinReplicas", "MaxReplicas")
    class EnvVarsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class AnnotationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ENVVARS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINTS_FIELD_NUMBER: _ClassVar[int]
    SECRETS_FIELD_NUMBER: _ClassVar[int]
    REGISTRYAUTH_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MINREPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAXREPLICAS_FIELD_NUMBER: _ClassVar[int]
    Service: str
    Image: str
    EnvVars: _containers.ScalarMap[str, str]
    Labels: _containers.ScalarMap[str, str]
    Annotations: _containers.ScalarMap[str, str]
    Constraints: _containers.RepeatedScalarFieldContainer[str]
    Secrets: _containers.RepeatedScalarFieldContainer[str]
    RegistryAuth: str
    Limits: FunctionResources
    Requests: FunctionResources
    MinReplicas: int
    MaxReplicas: int
    def __init__(self, Service: _Optional[str] = ..., Image: _Optional[str] = ..., EnvVars: _Optional[_Mapping[str, str]] = ..., Labels: _Optional[_Mapping[str, str]] = ..., Annotations: _Optional[_Mapping[str, str]] = ..., Constraints: _Optional[_Iterable[str]] = ..., Secrets: _Optional[_Iterable[str]] = ..., RegistryAuth: _Optional[str] = ..., Limits: _Optional[_Union[FunctionResources, _Mapping]] = ..., Requests: _Optional[_Union[FunctionResources, _Mapping]] = ..., MinReplicas: _Optional[int] = ..., MaxReplicas: _Optional[int] = ...) -> None: ...

class DeleteFunctionRequest(_message.Message):
    __slots__ = ("FunctionName",)
    FUNCTIONNAME_FIELD_NUMBER: _ClassVar[int]
    FunctionName: str
    def __init__(self, FunctionName: _Optional[str] = ...) -> None: ...

class ScaleServiceRequest(_message.Message):
    __slots__ = ("ServiceName", "Replicas")
    SERVICENAME_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    ServiceName: str
    Replicas: int
    def __init__(self, ServiceName: _Optional[str] = ..., Replicas: _Optional[int] = ...) -> None: ...

class InvokeServiceRequest(_message.Message):
    __slots__ = ("Service", "Input")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    Service: str
    Input: bytes
    def __init__(self, Service: _Optional[str] = ..., Input: _Optional[bytes] = ...) -> None: ...

class FunctionRequest(_message.Message):
    __slots__ = ("FunctionName",)
    FUNCTIONNAME_FIELD_NUMBER: _ClassVar[int]
    FunctionName: str
    def __init__(self, FunctionName: _Optional[str] = ...) -> None: ...

class Functions(_message.Message):
    __slots__ = ("Functions",)
    FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    Functions: _containers.RepeatedCompositeFieldContainer[Function]
    def __init__(self, Functions: _Optional[_Iterable[_Union[Function, _Mapping]]] = ...) -> None: ...

class Function(_message.Message):
    __slots__ = ("Name", "Image", "InvocationCount", "Replicas", "AvailableReplicas", "Annotations", "Labels")
    class AnnotationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    INVOCATIONCOUNT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLEREPLICAS_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    Name: str
    Image: str
    InvocationCount: int
    Replicas: int
    AvailableReplicas: int
    Annotations: _containers.ScalarMap[str, str]
    Labels: _containers.ScalarMap[str, str]
    def __init__(self, Name: _Optional[str] = ..., Image: _Optional[str] = ..., InvocationCount: _Optional[int] = ..., Replicas: _Optional[int] = ..., AvailableReplicas: _Optional[int] = ..., Annotations: _Optional[_Mapping[str, str]] = ..., Labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class FunctionResources(_message.Message):
    __slots__ = ("Memory", "CPU", "GPU")
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    Memory: str
    CPU: str
    GPU: str
    def __init__(self, Memory: _Optional[str] = ..., CPU: _Optional[str] = ..., GPU: _Optional[str] = ...) -> None: ...

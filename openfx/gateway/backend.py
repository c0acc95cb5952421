"""What the invocation core and the management RPCs need from a backend (embedded processes or
Kubernetes Deployments): the same gateway, two ways of running functions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

import grpc

from openfx.function_def import FunctionDef
from openfx.pb import fxwatcher_pb2 as wpb


class Replica(Protocol):
    label: str
    in_flight: int

    @property
    def connected(self) -> bool: ...

    async def call(self, request: wpb.Request, timeout: float) -> wpb.Reply:
        """The reply, or InvokeError; TimeoutError when `timeout` passes."""

    def stream(self, requests: AsyncIterator[wpb.Request]) -> grpc.aio.StreamStreamCall: ...


class DeployedFunction(Protocol):
    definition: FunctionDef
    invocations: int
    in_flight: int
    last_error: str

    @property
    def name(self) -> str: ...

    @property
    def desired(self) -> int: ...

    @property
    def available(self) -> int: ...

    def pick(self) -> Replica: ...


class Backend(Protocol):
    mode: str
    functions: dict[str, Any]
    on_gauge: object

    def get(self, name: str) -> Any: ...  # a DeployedFunction, or InvokeError NOT_FOUND

    async def start(self) -> None: ...

    async def refresh(self) -> None: ...

    async def deploy(self, definition: FunctionDef) -> None: ...

    async def update(self, definition: FunctionDef) -> None: ...

    async def delete(self, name: str) -> None: ...

    async def scale(self, name: str, count: int) -> None: ...

    async def logs(self, name: str) -> str: ...

    async def wait_ready(self, timeout: float) -> list[str]: ...

    async def close(self) -> None: ...

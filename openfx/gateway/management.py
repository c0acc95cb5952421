"""The management RPCs (List, Deploy, Update, Delete, GetMeta, GetLog, ReplicaUpdate, Info),
shared by the gRPC servicer and the REST routes so both answer the same thing."""

from __future__ import annotations

import platform
import sys

import grpc
import yaml

from openfx import __version__
from openfx.errors import InvokeError
from openfx.function_def import SCALE_AUTO as AUTO
from openfx.function_def import FunctionDef
from openfx.gateway.backend import Backend
from openfx.gateway.backend import DeployedFunction as Function
from openfx.gateway.invoker import Invoker
from openfx.pb import fxgateway_pb2 as gpb

OK = gpb.Message(Msg=b"OK")
MAX_REPLICAS = 64


class Management:
    def __init__(self, backend: Backend, invoker: Invoker, http_address: str = "") -> None:
        self.backend = backend
        self.invoker = invoker
        self.http_address = http_address

    def _describe(self, fn: Function) -> gpb.Function:
        d = fn.definition
        annotations = dict(d.annotations)
        annotations.update(getattr(fn, "limit_notes", {}))  # e.g. openfx.limits.memory: 256Mi (cgroup v1)
        annotations.update(getattr(fn, "scale_notes", {}))  # e.g. openfx.scaling: auto 0..4, ...
        if fn.last_error and fn.available == 0:
            annotations["openfx.error"] = fn.last_error
        return gpb.Function(
            Name=d.name,
            Image=d.image,
            InvocationCount=fn.invocations,
            Replicas=fn.desired,
            AvailableReplicas=fn.available,
            Annotations=annotations,
            Labels=d.labels,
        )

    async def list(self) -> gpb.Functions:
        await self.backend.refresh()
        return gpb.Functions(Functions=[self._describe(f) for f in self.backend.functions.values()])

    async def get_meta(self, name: str) -> gpb.Function:
        await self.backend.refresh()
        return self._describe(self.backend.get(name))

    async def deploy(self, request: gpb.CreateFunctionRequest) -> gpb.Message:
        await self.backend.deploy(FunctionDef.from_request(request))
        return OK

    async def update(self, request: gpb.CreateFunctionRequest) -> gpb.Message:
        await self.backend.update(FunctionDef.from_request(request))
        return OK

    async def delete(self, name: str) -> gpb.Message:
        await self.backend.delete(name)
        return OK

    async def get_log(self, name: str) -> gpb.Message:
        return gpb.Message(Msg=(await self.backend.logs(name)).encode())

    async def scale(self, name: str, replicas: int) -> gpb.Message:
        """Pin the count (the autoscaler leaves it), or with AUTO give it back to the autoscaler."""
        if replicas == AUTO:
            unpin = getattr(self.backend, "unpin", None)
            if unpin is None:
                raise InvokeError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"the {self.backend.mode} backend has no autoscaler to give {name} back to",
                )
            return gpb.Message(Msg=(await unpin(name)).encode())  # what happened, for the CLI to show
        if replicas > MAX_REPLICAS:
            raise InvokeError(
                grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_REPLICAS} replicas in embedded mode"
            )
        await self.backend.scale(name, replicas)
        return OK

    def info(self) -> str:
        import google.protobuf

        return yaml.safe_dump(
            {
                "gateway": {
                    "name": "openfx-py fxgateway",
                    "version": __version__,
                    "mode": self.backend.mode,
                    "http": self.http_address,
                },
                "runtime": {
                    "python": sys.version.split()[0],
                    "platform": platform.platform(),
                    "grpcio": grpc.__version__,
                    "protobuf": google.protobuf.__version__,
                },
                "functions": len(self.backend.functions),
            },
            sort_keys=False,
        )

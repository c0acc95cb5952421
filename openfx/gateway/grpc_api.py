"""FxGateway over gRPC (also served as `pb.Gateway`, the name DCF's video client uses)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from openfx import hops
from openfx.errors import InvokeError
from openfx.gateway.management import Management
from openfx.pb import fxgateway_pb2 as gpb
from openfx.pb import fxgateway_pb2_grpc as gpb_grpc
from openfx.triggers import KINDS, TOPIC_KEY, TRIGGER_KEY, decode_topic

TRIGGERS = {"grpc", *KINDS}  # a trigger (openfx/triggers) relays its own name in TRIGGER_KEY


def _trigger(context: grpc.aio.ServicerContext) -> tuple[str, str]:
    """The trigger name and topic the handler sees as req.info.Trigger (gRPC unless relayed);
    a function-to-function call's hop count goes to `hops.inbound` for the backend to pass on."""
    trigger, topic = "grpc", ""
    for key, value in context.invocation_metadata() or ():
        if key == TRIGGER_KEY and value in TRIGGERS:
            trigger = value
        elif key == TOPIC_KEY:
            topic = decode_topic(value)
        elif key == hops.METADATA_KEY:
            hops.inbound.set(hops.parse_hops(value))
    return trigger, topic


class GatewayServicer(gpb_grpc.FxGatewayServicer):
    def __init__(self, manage: Management) -> None:
        self.manage = manage
        self.invoker = manage.invoker

    async def Invoke(
        self, request: gpb.InvokeServiceRequest, context: grpc.aio.ServicerContext
    ) -> gpb.Message:
        trigger, topic = _trigger(context)
        try:
            refused = hops.too_deep(hops.inbound.get(), request.Service)
            if refused:
                raise InvokeError(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
            reply = await self.invoker.invoke(
                request.Service, request.Input, trigger, topic, deadline=context.time_remaining()
            )
        except InvokeError as exc:
            await context.abort(exc.code, exc.message)
        return gpb.Message(Msg=reply.Output)

    async def Invokes(
        self, request_iterator: AsyncIterator[gpb.InvokeServiceRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gpb.Messages]:
        iterator = aiter(request_iterator)
        try:
            first = await anext(iterator)
        except StopAsyncIteration:
            return

        async def rest() -> AsyncIterator[tuple[str, bytes]]:
            async for msg in iterator:
                yield msg.Service, msg.Input

        try:
            async for output in self.invoker.stream(first.Service, first.Input, rest()):
                yield gpb.Messages(Output=output)
        except InvokeError as exc:
            await context.abort(exc.code, exc.message)

    async def _manage(self, context: grpc.aio.ServicerContext, coro):  # type: ignore[no-untyped-def]
        try:
            return await coro
        except InvokeError as exc:
            await context.abort(exc.code, exc.message)

    async def List(self, request: gpb.Empty, context: grpc.aio.ServicerContext) -> gpb.Functions:
        return await self._manage(context, self.manage.list())

    async def Deploy(
        self, request: gpb.CreateFunctionRequest, context: grpc.aio.ServicerContext
    ) -> gpb.Message:
        return await self._manage(context, self.manage.deploy(request))

    async def Update(
        self, request: gpb.CreateFunctionRequest, context: grpc.aio.ServicerContext
    ) -> gpb.Message:
        return await self._manage(context, self.manage.update(request))

    async def Delete(
        self, request: gpb.DeleteFunctionRequest, context: grpc.aio.ServicerContext
    ) -> gpb.Message:
        return await self._manage(context, self.manage.delete(request.FunctionName))

    async def GetMeta(self, request: gpb.FunctionRequest, context: grpc.aio.ServicerContext) -> gpb.Function:
        return await self._manage(context, self.manage.get_meta(request.FunctionName))

    async def GetLog(self, request: gpb.FunctionRequest, context: grpc.aio.ServicerContext) -> gpb.Message:
        return await self._manage(context, self.manage.get_log(request.FunctionName))

    async def ReplicaUpdate(
        self, request: gpb.ScaleServiceRequest, context: grpc.aio.ServicerContext
    ) -> gpb.Message:
        return await self._manage(context, self.manage.scale(request.ServiceName, request.Replicas))

    async def Info(self, request: gpb.Empty, context: grpc.aio.ServicerContext) -> gpb.Message:
        return gpb.Message(Msg=self.manage.info().encode())

    async def HealthCheck(self, request: gpb.Empty, context: grpc.aio.ServicerContext) -> gpb.Message:
        return gpb.Message(Msg=b"OK")

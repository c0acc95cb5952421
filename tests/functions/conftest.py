"""Helpers for the collection's function tests (the `stack_gateway` fixture lives in tests/conftest.py)."""

from __future__ import annotations

from openfx.pb import fxgateway_pb2 as gpb
from tests.conftest import RunningGateway


def call(gw: RunningGateway, name: str, data: bytes, timeout: float = 30) -> bytes:
    return gw.stub().Invoke(gpb.InvokeServiceRequest(Service=name, Input=data), timeout=timeout).Msg


class Req:
    """A stand-in for the watcher's Request in handler unit tests (input + info are all a handler reads)."""

    def __init__(self, data: bytes) -> None:
        from openfx.pb import fxwatcher_pb2 as wpb

        self.input = data
        self.info = wpb.Info(FunctionName="test", Trigger=wpb.Trigger(Name="grpc"))

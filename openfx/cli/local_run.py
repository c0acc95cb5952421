"""`fn run`: start one function's watcher locally, call it once, stop it (OpenFx ran a container for this)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import grpc

from openfx import readiness
from openfx.config import FunctionSpec
from openfx.fn import GATEWAY_ENV
from openfx.pb import fxwatcher_pb2 as wpb
from openfx.pb import fxwatcher_pb2_grpc as wpb_grpc
from openfx.watcher.server import WatcherSettings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(name: str, spec: FunctionSpec, payload: bytes, timeout: float, gateway: str = "") -> bytes:
    """Start the watcher, call it once with `payload`, stop it. `gateway` (host:port) is where the
    handler's own calls to other functions go, unless the environment or the function names one."""
    if not spec.handler_file.is_file():
        raise click.ClickException(f"handler not found: {spec.handler_file}")
    address = f"127.0.0.1:{_free_port()}"
    with tempfile.TemporaryDirectory(prefix="openfx-run-") as tmp:
        settings = WatcherSettings.from_env(spec.environment)
        settings.handler_file = str(spec.handler_file)
        settings.handler_name = spec.handler.name
        settings.function_name = name
        settings.address = address
        settings.lock_file = str(Path(tmp) / "lock")
        proc = subprocess.Popen(
            [sys.executable, "-m", "openfx.watcher"],
            env={GATEWAY_ENV: gateway, **os.environ, **spec.environment, **settings.to_env()},
            stdout=sys.stderr,
            stderr=sys.stderr,
        )
        try:
            with grpc.insecure_channel(address) as channel:
                if readiness.wait(settings.lock_file, lambda: proc.poll() is None, timeout) is None:
                    why = readiness.read(settings.failed_file) or f"not ready after {timeout:g}s"
                    raise click.ClickException(f"{name} did not start: {why}")
                request = wpb.Request(
                    input=payload, info=wpb.Info(FunctionName=name, Trigger=wpb.Trigger(Name="grpc"))
                )
                try:
                    return wpb_grpc.FxWatcherStub(channel).Call(request, timeout=timeout).Output
                except grpc.RpcError as exc:
                    raise click.ClickException(f"{exc.code().name}: {exc.details()}") from None
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

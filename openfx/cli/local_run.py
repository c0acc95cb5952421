"""`fn run`: start one function's watcher locally, call it once, stop it (OpenFx ran a container for this)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from openfx.config import FunctionSpec
from openfx.pb import fxwatcher_pb2 as wpb
from openfx.pb import fxwatcher_pb2_grpc as wpb_grpc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(name: str, spec: FunctionSpec, payload: bytes, timeout: float) -> bytes:
    if not spec.handler_file.is_file():
        raise click.ClickException(f"handler not found: {spec.handler_file}")
    address = f"127.0.0.1:{_free_port()}"
    with tempfile.TemporaryDirectory(prefix="openfx-run-") as tmp:
        env = {
            **os.environ,
            **spec.environment,
            "FUNCTION_NAME": name,
            "HANDLER_FILE": str(spec.handler_file),
            "HANDLER_NAME": spec.handler.name,
            "WATCHER_ADDR": address,
            "LOCK_FILE": str(Path(tmp) / "lock"),
            "PYTHONUNBUFFERED": "1",
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "openfx.watcher"],
            env=env,
            cwd=spec.source_dir,
            stdout=sys.stderr,
            stderr=sys.stderr,
        )
        try:
            with grpc.insecure_channel(address) as channel:
                deadline = time.monotonic() + timeout
                health = health_pb2_grpc.HealthStub(channel)
                while True:
                    if proc.poll() is not None:
                        raise click.ClickException(
                            f"{name} exited with code {proc.returncode} before it was ready"
                        )
                    if time.monotonic() > deadline:
                        raise click.ClickException(f"{name} was not ready after {timeout:g}s")
                    try:
                        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            break
                    except grpc.RpcError:
                        pass
                    time.sleep(0.05)
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

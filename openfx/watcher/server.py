"""Serves one function: FxWatcher gRPC (Call, Calls), gRPC health and reflection,
the `/tmp/.lock` liveness file OpenFx probes, and optionally the framed Unix-socket
hop the embedded gateway uses.

The servers start before the handler loads so probes see NOT_SERVING (not a
refused connection) during a slow `__init__`; readiness flips to SERVING and the
lock file appears only once the handler is ready. SIGTERM drains in-flight calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from openfx import defaults, framing, procgroup, readiness
from openfx import env as environ
from openfx.errors import InvokeError
from openfx.pb import fxwatcher_pb2 as wpb
from openfx.pb import fxwatcher_pb2_grpc as wpb_grpc
from openfx.watcher.loader import HandlerLoadError, load_handler
from openfx.watcher.runtime import FunctionRuntime

log = logging.getLogger("openfx.watcher")
SERVICE = "pb.FxWatcher"


@dataclass
class WatcherSettings:
    """Everything a watcher needs, read from the environment like OpenFx's executor."""

    handler_file: str = "/openfx/handler/src/handler.py"
    handler_name: str = "Handler"
    function_name: str = ""
    address: str = f"0.0.0.0:{defaults.WATCHER_PORT}"
    socket_path: str = ""  # framed hop for the embedded gateway; off when empty
    lock_file: str = "/tmp/.lock"
    threads: int = 16
    max_message_bytes: int = defaults.MAX_MESSAGE_BYTES
    grace_seconds: float = 30.0
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> WatcherSettings:
        d = cls()
        handler_dir = environ.string("HANDLER_DIR", "/openfx/handler", env)
        port = environ.integer("WATCHER_PORT", defaults.WATCHER_PORT, minimum=1, environ=env)
        return cls(
            handler_file=environ.string("HANDLER_FILE", f"{handler_dir}/src/handler.py", env),
            handler_name=environ.string("HANDLER_NAME", d.handler_name, env),
            function_name=environ.string("FUNCTION_NAME", d.function_name, env),
            address=environ.string("WATCHER_ADDR", f"0.0.0.0:{port}", env),
            socket_path=environ.string("WATCHER_SOCKET", d.socket_path, env),
            lock_file=environ.string("LOCK_FILE", d.lock_file, env),
            threads=environ.integer("WATCHER_THREADS", d.threads, minimum=1, environ=env),
            max_message_bytes=environ.integer(
                "MAX_MESSAGE_BYTES", d.max_message_bytes, minimum=1, environ=env
            ),
            grace_seconds=environ.number("WATCHER_GRACE_SECONDS", d.grace_seconds, env),
        )

    def to_env(self) -> dict[str, str]:
        """The environment that makes `python -m openfx.watcher` read these settings back: the one
        place a watcher's launch is described (the embedded backend, `fn run`, benches, tests)."""
        env = {
            "HANDLER_FILE": self.handler_file,
            "HANDLER_NAME": self.handler_name,
            "FUNCTION_NAME": self.function_name,
            "WATCHER_ADDR": self.address,
            "LOCK_FILE": self.lock_file,
            "WATCHER_THREADS": str(self.threads),
            "MAX_MESSAGE_BYTES": str(self.max_message_bytes),
            "WATCHER_GRACE_SECONDS": repr(self.grace_seconds),
            "PYTHONUNBUFFERED": "1",
        }
        if self.socket_path:
            env["WATCHER_SOCKET"] = self.socket_path
        return env

    @property
    def failed_file(self) -> str:
        """Beside the lock file: why the handler did not load (`<kind>: <message>`)."""
        return self.lock_file + ".failed"


class Watcher:
    def __init__(self, settings: WatcherSettings) -> None:
        # the handler's folder becomes the working directory when it loads: pin our own files first
        socket_path = settings.socket_path and os.path.abspath(settings.socket_path)
        settings = replace(settings, lock_file=os.path.abspath(settings.lock_file), socket_path=socket_path)
        self.settings = settings
        self.name = settings.function_name or Path(settings.handler_file).resolve().parent.parent.name
        self.runtime: FunctionRuntime | None = None
        self.load_error: str | None = None
        self.ready = asyncio.Event()
        self.pool = ThreadPoolExecutor(max_workers=settings.threads, thread_name_prefix="handler")
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.grpc_server: grpc.aio.Server | None = None
        self.framed_server: asyncio.AbstractServer | None = None
        self.port = 0

    # -- calls -------------------------------------------------------------

    async def call(self, request: wpb.Request) -> wpb.Reply:
        runtime = self.runtime
        if runtime is None:
            reason = f"failed to load: {self.load_error}" if self.load_error else "is starting"
            raise InvokeError(grpc.StatusCode.UNAVAILABLE, f"function {self.name} {reason}")
        self.in_flight += 1
        self.idle.clear()
        try:
            if runtime.is_async:
                return await runtime.invoke_async(request)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.pool, runtime.invoke, request)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
        ]
        server = grpc.aio.server(options=options)
        wpb_grpc.add_FxWatcherServicer_to_server(_Servicer(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (
            wpb.DESCRIPTOR.services_by_name["FxWatcher"].full_name,
            reflection.SERVICE_NAME,
            health.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = server.add_insecure_port(s.address)
        await server.start()
        self.grpc_server = server
        if s.socket_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(s.socket_path)
            self.framed_server = await asyncio.start_unix_server(self._serve_framed, path=s.socket_path)
        log.info("listening on %s%s", s.address, f" and {s.socket_path}" if s.socket_path else "")
        asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        try:
            load = functools.partial(load_handler, s.handler_file, s.handler_name, chdir=True)
            handler = await loop.run_in_executor(None, load)
        except HandlerLoadError as exc:
            self.load_error = f"{exc.kind}: {exc}"
            log.error("handler failed to load: %s", self.load_error)
            readiness.mark_ready(s.failed_file, self.load_error)  # what the supervisor shows
            self.ready.set()
            return
        self.runtime = FunctionRuntime(self.name, handler)
        readiness.mark_ready(s.lock_file)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("ready")
        self.ready.set()

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE):
            result = self.health.set(service, status)
            if asyncio.iscoroutine(result):
                await result

    async def stop(self) -> None:
        """Stop taking calls, let the ones in flight finish (up to the grace period)."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.framed_server is not None:
            self.framed_server.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.idle.wait(), self.settings.grace_seconds)
        if self.grpc_server is not None:
            await self.grpc_server.stop(self.settings.grace_seconds)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.settings.lock_file)
        if self.settings.socket_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.settings.socket_path)
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- framed hop --------------------------------------------------------

    async def _serve_framed(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks: set[asyncio.Task[None]] = set()
        limit = self.settings.max_message_bytes
        try:
            while True:
                length, request_id, kind = framing.HEADER.unpack(
                    await reader.readexactly(framing.HEADER.size)
                )
                if length > limit:
                    log.error("framed request of %d bytes over the limit; closing", length)
                    break
                payload = await reader.readexactly(length)
                if kind != framing.CALL:
                    continue
                task = asyncio.create_task(self._answer_framed(writer, request_id, payload))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            writer.close()

    async def _answer_framed(self, writer: asyncio.StreamWriter, request_id: int, payload: bytes) -> None:
        try:
            reply = await self.call(wpb.Request.FromString(payload))
            limit = self.settings.max_message_bytes
            if len(reply.Output) > limit:  # as the gRPC server refuses it
                raise InvokeError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"result of {len(reply.Output)} bytes is over the message limit of {limit}",
                )
            if reply.ContentType:
                data = framing.frame(request_id, framing.OK_REPLY, reply.SerializeToString())
            else:
                data = framing.frame(request_id, 0, reply.Output)
        except InvokeError as exc:
            data = framing.frame(request_id, exc.code.value[0], exc.message.encode())
        except DecodeError:
            data = framing.frame(
                request_id, grpc.StatusCode.INVALID_ARGUMENT.value[0], b"malformed request frame"
            )
        if writer.is_closing():
            return
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()


class _Servicer(wpb_grpc.FxWatcherServicer):
    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher

    async def Call(self, request: wpb.Request, context: grpc.aio.ServicerContext) -> wpb.Reply:
        try:
            return await self.watcher.call(request)
        except InvokeError as exc:
            await context.abort(exc.code, exc.message)

    async def Calls(
        self, request_iterator: AsyncIterator[wpb.Request], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[wpb.Reply]:
        async for request in request_iterator:
            try:
                reply = await self.watcher.call(request)
            except InvokeError as exc:
                await context.abort(exc.code, exc.message)
            yield reply


async def serve(settings: WatcherSettings) -> None:
    """Run until SIGTERM/SIGINT, then drain."""
    watcher = Watcher(settings)
    await watcher.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopper = loop.create_task(stop.wait())
    await asyncio.wait({stopper, loop.create_task(watcher.ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if watcher.load_error is None:
        await stopper
    log.info("stopping (draining %d in flight)", watcher.in_flight)
    await watcher.stop()
    # a replica's children go with it, even when the gateway that would have killed them is gone
    procgroup.end_own_group()
    if watcher.load_error is not None:
        # exit non-zero so a supervisor (the embedded gateway, Kubernetes) shows the failure and retries
        os._exit(3)
    if threading.active_count() > 1:
        os._exit(0)  # a handler thread stuck past the grace period must not keep the process alive

"""Embedded backend: each function replica is a local watcher process.

The gateway starts `python -m openfx.watcher` per replica, waits for its gRPC
health to say SERVING, then talks to it over one persistent framed Unix-socket
connection (unary calls) and one persistent gRPC channel (streams). A replica
that exits is restarted with capped exponential backoff; while none is ready,
calls fail fast with UNAVAILABLE instead of hanging.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from openfx import parent
from openfx.deployment import FunctionDef
from openfx.errors import InvokeError, not_found
from openfx.gateway.framed_client import FramedClient
from openfx.pb import fxwatcher_pb2 as wpb
from openfx.pb import fxwatcher_pb2_grpc as wpb_grpc

log = logging.getLogger("openfx.gateway")
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE

BACKOFF_FIRST = 0.25
BACKOFF_CAP = 10.0
HEALTHY_RESET = 30.0  # a replica that ran this long starts its backoff afresh
LOG_LINES = 2000


class Replica:
    """One watcher process and the connections to it."""

    def __init__(self, fn: Function, index: int, run_dir: Path, max_message_bytes: int) -> None:
        self.fn = fn
        self.index = index
        self.label = f"{fn.name}[{index}]"
        stem = run_dir / f"{fn.name}-{index}"
        self.grpc_address = f"unix:{stem}.grpc.sock"
        self.framed_path = f"{stem}.sock"
        self.lock_path = f"{stem}.lock"
        self.max_message_bytes = max_message_bytes
        self.process: asyncio.subprocess.Process | None = None
        self.framed: FramedClient | None = None
        self.channel: grpc.aio.Channel | None = None
        self.stub: wpb_grpc.FxWatcherStub | None = None
        self.ready = False
        self.in_flight = 0
        self.restarts = 0
        self.stopping = False
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._supervise(), name=self.label)

    async def _supervise(self) -> None:
        backoff = BACKOFF_FIRST
        while not self.stopping:
            started = time.monotonic()
            try:
                await self._run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let a supervisor die silently
                self.fn.note(f"{self.label}: supervisor error: {exc}")
            if self.stopping:
                break
            if time.monotonic() - started > HEALTHY_RESET:
                backoff = BACKOFF_FIRST
            self.restarts += 1
            self.fn.note(f"{self.label}: exited; restarting in {backoff:.2f}s (restart #{self.restarts})")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_CAP)

    async def _run_once(self) -> None:
        fn = self.fn.definition
        assert fn.handler_dir is not None
        env = {
            **os.environ,
            **fn.env,
            "FUNCTION_NAME": fn.name,
            "HANDLER_DIR": str(fn.handler_dir.parent),
            "HANDLER_FILE": str(fn.handler_dir / fn.handler_file),
            "HANDLER_NAME": fn.handler_name,
            "WATCHER_ADDR": self.grpc_address,
            "WATCHER_SOCKET": self.framed_path,
            "LOCK_FILE": self.lock_path,
            "MAX_MESSAGE_BYTES": str(self.max_message_bytes),
            "PYTHONUNBUFFERED": "1",
            "WATCHER_LOG_PREFIX": "0",
            parent.ENV: "1",
        }
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "openfx.watcher",
            cwd=str(fn.handler_dir.parent),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        pump = asyncio.get_running_loop().create_task(self._pump_output(self.process))
        try:
            if await self._wait_ready():
                self.ready = True
                self.fn.last_error = ""
                self.fn.update_gauge()
            await self.process.wait()
        finally:
            self.ready = False
            self.fn.update_gauge()
            await self._disconnect()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(pump, 2)
            if self.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
            if not self.stopping and self.process.returncode not in (0, None):
                self.fn.note(f"{self.label}: process exited with code {self.process.returncode}")

    async def _wait_ready(self) -> bool:
        """Poll gRPC health until SERVING; False if the process exits first."""
        assert self.process is not None
        self.channel = grpc.aio.insecure_channel(
            self.grpc_address,
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
            ],
        )
        health = health_pb2_grpc.HealthStub(self.channel)
        while self.process.returncode is None and not self.stopping:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    self.stub = wpb_grpc.FxWatcherStub(self.channel)
                    self.framed = FramedClient(self.framed_path, self.label)
                    await self.framed.connect()
                    return True
            except (grpc.aio.AioRpcError, OSError):
                pass
            await asyncio.sleep(0.05)
        return False

    async def _pump_output(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while True:
            line = await process.stdout.readline()
            if not line:
                return
            self.fn.note(f"{self.label}: {line.decode('utf-8', 'replace').rstrip()}")

    async def _disconnect(self) -> None:
        if self.framed is not None:
            await self.framed.close()
            self.framed = None
        if self.channel is not None:
            await self.channel.close()
            self.channel = None
        self.stub = None

    async def stop(self, grace: float) -> None:
        self.stopping = True
        self.ready = False
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self._disconnect()

    @property
    def connected(self) -> bool:
        return self.framed is not None

    async def call(self, request: wpb.Request, timeout: float) -> wpb.Reply:
        framed = self.framed
        if framed is None:
            raise InvokeError(UNAVAILABLE, f"{self.label} is restarting")
        return await framed.call(request.SerializeToString(), timeout)

    def stream(self, requests: AsyncIterator[wpb.Request]) -> grpc.aio.StreamStreamCall:
        if self.stub is None:
            raise InvokeError(UNAVAILABLE, f"{self.label} is restarting")
        return self.stub.Calls(requests)


@dataclass
class Function:
    """A deployed function: its definition, replicas, counters and recent output."""

    definition: FunctionDef
    run_dir: Path
    max_message_bytes: int
    on_gauge: object = None
    replicas: list[Replica] = field(default_factory=list)
    invocations: int = 0
    in_flight: int = 0
    last_error: str = ""
    logs: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=LOG_LINES))
    _rr: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def name(self) -> str:
        return self.definition.name

    def note(self, line: str) -> None:
        """Keep a line of the function's output and echo it to the gateway's log, name first."""
        self.logs.append(line)
        lowered = line.lower()
        if "error" in lowered or "exited" in lowered or "traceback" in lowered:
            self.last_error = line
        print(line, file=sys.stderr, flush=True)

    def update_gauge(self) -> None:
        if callable(self.on_gauge):
            self.on_gauge(self.name, self.available)

    @property
    def available(self) -> int:
        return sum(1 for r in self.replicas if r.ready)

    @property
    def desired(self) -> int:
        return len(self.replicas)

    def scale_to(self, count: int) -> list[Replica]:
        """Start replicas up to `count`; return the ones to stop (newest first)."""
        while len(self.replicas) < count:
            replica = Replica(self, len(self.replicas), self.run_dir, self.max_message_bytes)
            self.replicas.append(replica)
            replica.start()
        surplus = self.replicas[count:]
        del self.replicas[count:]
        self.definition.replicas = count
        self.update_gauge()
        return surplus

    def pick(self) -> Replica:
        """The ready replica with the fewest calls in flight (round robin among equals)."""
        ready = [r for r in self.replicas if r.ready]
        if not ready:
            if not self.replicas:
                raise InvokeError(UNAVAILABLE, f"function {self.name} is scaled to zero replicas")
            detail = f": {self.last_error}" if self.last_error else ""
            raise InvokeError(UNAVAILABLE, f"function {self.name} is not ready{detail}")
        if len(ready) == 1:
            return ready[0]
        start = next(self._rr) % len(ready)
        ordered = ready[start:] + ready[:start]
        return min(ordered, key=lambda r: r.in_flight)


class EmbeddedBackend:
    """Functions as local processes; the gateway's Deploy/Update/Delete/ReplicaUpdate act here."""

    mode = "embedded"

    def __init__(self, run_dir: Path, max_message_bytes: int, grace: float = 10.0) -> None:
        self.run_dir = run_dir
        self.max_message_bytes = max_message_bytes
        self.grace = grace
        self.functions: dict[str, Function] = {}
        self.on_gauge: object = None

    def get(self, name: str) -> Function:
        fn = self.functions.get(name)
        if fn is None:
            raise not_found(name)
        return fn

    def _check_source(self, definition: FunctionDef) -> None:
        folder = definition.handler_dir
        if folder is None:
            raise InvokeError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"embedded gateway needs the source of {definition.name}: deploy with "
                "'openfx-cli fn deploy -f config.yaml' (annotation openfx.source)",
            )
        if not (folder / definition.handler_file).is_file():
            raise InvokeError(
                grpc.StatusCode.FAILED_PRECONDITION, f"handler not found: {folder / definition.handler_file}"
            )

    async def deploy(self, definition: FunctionDef) -> None:
        if definition.name in self.functions:
            raise InvokeError(grpc.StatusCode.ALREADY_EXISTS, f"function {definition.name} already exists")
        self._check_source(definition)
        fn = Function(definition, self.run_dir, self.max_message_bytes, on_gauge=self.on_gauge)
        self.functions[definition.name] = fn
        fn.scale_to(definition.replicas)

    async def update(self, definition: FunctionDef) -> None:
        """Replace the function's replicas with new ones (counters and logs are kept)."""
        old = self.get(definition.name)
        self._check_source(definition)
        fn = Function(
            definition,
            self.run_dir,
            self.max_message_bytes,
            on_gauge=self.on_gauge,
            invocations=old.invocations,
            logs=old.logs,
        )
        old_replicas = old.replicas
        old.replicas = []
        self.functions[definition.name] = fn
        await asyncio.gather(*(r.stop(self.grace) for r in old_replicas))
        fn.scale_to(definition.replicas)

    async def delete(self, name: str) -> None:
        fn = self.get(name)
        del self.functions[name]
        await asyncio.gather(*(r.stop(self.grace) for r in fn.replicas))
        fn.replicas = []
        fn.update_gauge()

    async def scale(self, name: str, count: int) -> None:
        fn = self.get(name)
        surplus = fn.scale_to(count)
        await asyncio.gather(*(r.stop(self.grace) for r in surplus))

    async def wait_ready(self, timeout: float) -> list[str]:
        """Wait until every function has its replicas ready; return the names that are not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = [f.name for f in self.functions.values() if f.available < len(f.replicas)]
            if not pending:
                return []
            await asyncio.sleep(0.05)
        return [f.name for f in self.functions.values() if f.available < len(f.replicas)]

    async def start(self) -> None:
        """Nothing to discover: this backend starts every function itself."""

    async def refresh(self) -> None:
        """Always current: the processes are ours."""

    async def logs(self, name: str) -> str:
        fn = self.get(name)
        return "\n".join(fn.logs) + "\n" if fn.logs else ""

    async def close(self) -> None:
        replicas = [r for fn in self.functions.values() for r in fn.replicas]
        await asyncio.gather(*(r.stop(self.grace) for r in replicas))

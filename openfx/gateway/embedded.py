"""Embedded backend: each function replica is a local watcher process.

The gateway starts `python -m openfx.watcher` per replica, waits for its gRPC
health to say SERVING, then talks to it over one persistent framed Unix-socket
connection (unary calls) and one persistent gRPC channel (streams). A replica
that exits is restarted with capped exponential backoff; while none is ready,
calls fail fast with UNAVAILABLE instead of hanging.

What a replica may do is bounded here (see sandbox.py, limits.py, cgroups.py, procgroup.py):
it runs as the function user when the gateway is root, leads a process group of its own and,
where the machine allows, sits in a cgroup holding its memory and CPU limits. A monitor recycles
(kills and restarts) a replica that goes over its memory limit (callers in flight get
RESOURCE_EXHAUSTED) or holds a call past the function's timeout plus a grace (UNAVAILABLE), so
neither a leak nor a stuck handler can wedge a function. Stopping a replica ends its whole
process group and everything left in its cgroup.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import math
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

from openfx import defaults, hops, parent, procgroup, readiness
from openfx import env as environ
from openfx import fn as fn_module
from openfx.build.images import ImageStore, StoredImage, images_dir, missing_requirements
from openfx.errors import InvokeError, not_found
from openfx.function_def import HANDLER_FILE, HANDLER_NAME, FunctionDef
from openfx.gateway import sandbox
from openfx.gateway.cgroups import Cgroups, ReplicaCgroup
from openfx.gateway.framed_client import FramedClient
from openfx.gateway.limits import Enforcement, decide
from openfx.gateway.logs import LineCutter, RecentOutput
from openfx.pb import fxwatcher_pb2 as wpb
from openfx.pb import fxwatcher_pb2_grpc as wpb_grpc
from openfx.watcher.server import WatcherSettings

log = logging.getLogger("openfx.gateway")
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

BACKOFF_FIRST = 0.25
BACKOFF_CAP = 10.0
HEALTHY_RESET = 30.0  # a replica that ran this long starts its backoff afresh
TIMEOUT_GRACE = 2.0  # a call this long past the function's timeout gets its replica recycled
MONITOR_INTERVAL = 0.2
ACTIVATION_WAIT = 300.0  # a call without a deadline waits this long for a cold start (Knative's default)
WATCHER_THREADS = 16  # the watcher's default pool (WATCHER_THREADS)


class LocalReplica:
    """One watcher process and the connections to it."""

    def __init__(
        self,
        fn: LocalFunction,
        index: int,
        run_dir: Path,
        max_message_bytes: int,
        backend: EmbeddedBackend | None = None,
    ) -> None:
        self.fn = fn
        self.index = index
        self.label = f"{fn.name}[{index}]"
        self.backend = backend
        self.dirs = sandbox.ReplicaDirs(run_dir, f"{fn.name}-{index}", backend.user if backend else None)
        self.grpc_address = self.dirs.grpc_address
        self.framed_path = self.dirs.framed_socket
        self.lock_path = self.dirs.lock_file
        self.failed_path = self.lock_path + ".failed"  # WatcherSettings.failed_file
        self.max_message_bytes = max_message_bytes
        self.process: asyncio.subprocess.Process | None = None
        self.framed: FramedClient | None = None
        self.channel: grpc.aio.Channel | None = None
        self.stub: wpb_grpc.FxWatcherStub | None = None
        self.cgroup: ReplicaCgroup | None = None
        self.ready = False
        self.in_flight = 0
        self.restarts = 0
        self.runs = 0
        self.stopping = False
        self.recycled: InvokeError | None = None  # why this run was ended by the gateway
        self.errors_this_run = 0
        self.task: asyncio.Task[None] | None = None
        self.running = False  # inside a run (not waiting out a backoff)
        self.ever_ready = False  # a replica that never was is "starting": calls wait for it (activator)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._supervise(), name=self.label)

    async def _supervise(self) -> None:
        backoff = BACKOFF_FIRST
        while not self.stopping:
            started = time.monotonic()
            self.running = True
            try:
                await self._run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let a supervisor die silently
                self.fn.note(f"{self.label}: cannot start: {exc}", error=True)
            finally:
                self.running = False
            if self.stopping:
                break
            if time.monotonic() - started > HEALTHY_RESET:
                backoff = BACKOFF_FIRST
            self.restarts += 1
            self.fn.note(f"{self.label}: exited; restarting in {backoff:.2f}s (restart #{self.restarts})")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_CAP)

    def _environment(self) -> dict[str, str]:
        fn = self.fn.definition
        assert fn.handler_dir is not None
        settings = WatcherSettings.from_env(fn.env)  # a function may tune threads and grace
        settings.handler_file = str(fn.handler_dir / fn.handler_file)
        settings.handler_name = fn.handler_name
        settings.function_name = fn.name
        settings.address = self.grpc_address
        settings.socket_path = self.framed_path
        settings.lock_file = self.lock_path
        settings.max_message_bytes = self.max_message_bytes
        return {
            **sandbox.base_environment(),
            **self.dirs.environment(),
            **fn.env,
            **settings.to_env(),
            "HANDLER_DIR": str(fn.handler_dir),  # KETI's: the folder holding the handler file
            **self._gateway_env(fn.env),
            "WATCHER_LOG_PREFIX": "0",
            parent.ENV: "1",
            procgroup.ENV: "1",
            procgroup.CGROUP_ENV: "\n".join(self._cgroup_procs()),  # "" without one: never a stranger's
        }

    def _cgroup_procs(self) -> list[str]:
        """This run's cgroup.procs files: the trampoline joins them, the watcher ends their members."""
        return [str(folder / "cgroup.procs") for folder in self.cgroup.folders] if self.cgroup else []

    def _gateway_env(self, env: dict[str, str]) -> dict[str, str]:
        """Where the handler's `fn.call` / `mesh.mesh_call` go: this gateway (unless the function says)."""
        address = self.backend.gateway_address if self.backend else ""
        if not address or fn_module.GATEWAY_ENV in env:
            return {}
        return {fn_module.GATEWAY_ENV: address}

    async def _run_once(self) -> None:
        """One run; a first start that fails wakes the callers waiting for it (they get the reason)."""
        try:
            await self._run()
        except Exception as exc:
            self.fn.note(f"{self.label}: cannot start: {exc}", error=True)
        finally:
            if not self.ever_ready and not self.stopping:
                self.fn.start_failures += 1  # its reason is in fn.last_error by now
                self.fn.wake()

    async def _run(self) -> None:
        fn = self.fn.definition
        assert fn.handler_dir is not None and self.backend is not None
        self.runs += 1
        self.recycled = None
        self.errors_this_run = 0
        self.dirs.prepare()
        for stale in (self.lock_path, self.failed_path):  # a killed watcher leaves its files behind
            readiness.clear(stale)
        self.cgroup = self.backend.make_cgroup(f"{fn.name}-{self.index}-{self.runs}", self.fn.enforcement)
        watcher = [sys.executable, "-m", "openfx.watcher"]
        argv = sandbox.command(watcher, self.backend.user, self._cgroup_procs())
        try:
            self.process = await asyncio.create_subprocess_exec(
                *argv,
                cwd=str(fn.handler_dir),  # listable by the function user (_admit); the watcher enters it too
                env=self._environment(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except BaseException:
            await self._reap()
            raise
        pump = asyncio.get_running_loop().create_task(self._pump_output(self.process))
        try:
            if await self._wait_ready():
                self.ready = True
                self.ever_ready = True
                self.fn.last_active = time.monotonic()  # idleness counts from a replica being up
                self.fn.last_error = ""
                self.fn.update_gauge()
                self.fn.wake()
            await self.process.wait()
        finally:
            self.ready = False
            self.fn.update_gauge()
            self.check_memory(None)  # an OOM kill that ended the process is still a recycle
            refused = self.cgroup.forks_refused() if self.cgroup is not None else 0  # read before reaping
            await self._disconnect()
            await self._reap()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(pump, 2)
            code = self.process.returncode
            if not self.stopping and self.recycled is None and code not in (0, None):
                why = (
                    f" after its cap of {self.fn.enforcement.pids} processes and threads (--max-pids) "
                    f"refused {refused} of them"
                    if refused
                    else ""
                )
                self.fn.note(
                    f"{self.label}: process exited with code {code}{why}", error=not self.errors_this_run
                )

    async def _reap(self) -> None:
        """End whatever is left of this run: its process group, every pid in its cgroup, the cgroup."""
        process = self.process
        if process is not None:
            procgroup.kill_group(process.pid)
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            procgroup.kill_group(process.pid)  # children forked while the leader was dying
        cgroup, self.cgroup = self.cgroup, None
        if cgroup is not None:
            if not await cgroup.kill_all():
                log.warning("%s: processes left in cgroup %s", self.label, cgroup.folders)
            cgroup.remove()

    async def _wait_ready(self) -> bool:
        """Wait for the watcher's lock file (its ready file) and connect; False if the process ends
        first, having said why in its failure file when the handler did not load."""
        assert self.process is not None
        process = self.process

        def alive() -> bool:
            return process.returncode is None and not self.stopping and self.recycled is None

        owners = self.dirs.owners
        if await readiness.wait_async(self.lock_path, alive, float("inf"), owners) is None or not alive():
            failure = readiness.read(self.failed_path, owners)
            if failure:
                # what fn info/list show; not logged again: the watcher's own output said it
                self.fn.last_error = f"{self.label}: cannot load the handler: {failure}"
                self.errors_this_run += 1
            return False
        self.channel = grpc.aio.insecure_channel(
            self.grpc_address,
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
            ],
        )
        self.stub = wpb_grpc.FxWatcherStub(self.channel)
        framed = FramedClient(
            self.framed_path, self.label, self.max_message_bytes, lost_error=self._lost_error
        )
        try:
            await framed.connect()
        except OSError:
            return False
        self.framed = framed
        return True

    async def _pump_output(self, process: asyncio.subprocess.Process) -> None:
        """Every line of output, of any length (long ones cut), read as fast as it comes."""
        assert process.stdout is not None
        cutter = LineCutter()
        while True:
            chunk = await process.stdout.read(1 << 16)
            for line in cutter.feed(chunk) if chunk else cutter.flush():
                self._output(line)
            if not chunk:
                return

    def _output(self, line: str) -> None:
        self.fn.note(f"{self.label}: {line}")

    async def _disconnect(self) -> None:
        if self.framed is not None:
            await self.framed.close()
            self.framed = None
        if self.channel is not None:
            await self.channel.close()
            self.channel = None
        self.stub = None

    # -- recycling ---------------------------------------------------------

    def recycle(self, reason: str, error: InvokeError) -> None:
        """Kill this run now (the supervisor restarts it); callers on it get `error`."""
        if self.recycled is not None or self.process is None or self.stopping:
            return
        self.recycled = error
        self.ready = False
        self.fn.update_gauge()
        self.fn.note(f"{self.label}: recycled: {error.message}", error=True)
        if self.backend is not None:
            self.backend.on_recycle(self.fn.name, reason)
        if self.framed is not None:
            self.framed.fail_pending(error)
        procgroup.kill_group(self.process.pid)
        if self.cgroup is not None:
            self.cgroup.kill()

    def _lost_error(self) -> InvokeError | None:
        """Why the framed connection ended, for the callers waiting on it."""
        self.check_memory(None)
        return self.recycled

    def check_memory(self, groups: dict[int, list[int]] | None) -> None:
        """Recycle when the kernel OOM-killed in the cgroup, or (no cgroup) the group's RSS is over."""
        limit = self.fn.enforcement.memory_bytes
        if limit is None or self.process is None or self.recycled is not None:
            return
        if self.fn.enforcement.memory_by_cgroup:
            if self.cgroup is not None and self.cgroup.oom_kills():
                self._over_memory("")
        elif groups is not None:
            rss = procgroup.rss_bytes(groups.get(self.process.pid, []))
            if rss > limit:
                self._over_memory(f" (RSS {rss >> 20} MiB)")

    def _over_memory(self, detail: str) -> None:
        e = self.fn.enforcement
        message = (
            f"{self.label} went over its memory limit of {e.memory_text} (limits.memory, {e.memory_by})"
            f"{detail}; restarting it"
        )
        self.recycle("memory", InvokeError(RESOURCE_EXHAUSTED, message))

    def check_calls(self, now: float, grace: float) -> None:
        """Recycle when a call ran past the timeout + grace, or overdue calls hold every worker."""
        framed = self.framed
        if framed is None or not self.ready:
            return  # a replica still starting is never recycled by this rule
        timeout = self.fn.definition.timeout
        count, oldest = framed.overdue(timeout, now)
        if count and (oldest > timeout + grace or count >= self.fn.workers):
            message = (
                f"{self.label} was recycled: a call ran past {self.fn.name}'s timeout of {timeout:g}s"
                + (f" (+{grace:g}s grace)" if oldest > timeout + grace else f" in all {count} workers")
            )
            self.recycle("timeout", InvokeError(UNAVAILABLE, message))

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
                procgroup.kill_group(process.pid)
        if self.task is not None:
            if self.running:
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(self.task), 5)  # let it reap its run
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self._disconnect()
        await self._reap()
        self.dirs.remove()

    @property
    def connected(self) -> bool:
        return self.framed is not None

    @property
    def starting(self) -> bool:
        """Never ready yet and on its way (its first run not begun, or in it): calls wait for it."""
        return not self.ever_ready and not self.stopping and (self.running or self.runs == 0)

    async def call(self, request: wpb.Request, timeout: float) -> wpb.Reply:
        framed = self.framed
        if framed is None:
            raise InvokeError(UNAVAILABLE, f"{self.label} is restarting")
        # the handler's own calls inherit this call's place in the chain and what is left of its time
        request.info.Hops = hops.inbound.get()
        request.info.Timeout = f"{timeout:g}s"
        return await framed.call(request.SerializeToString(), timeout)

    def stream(self, requests: AsyncIterator[wpb.Request]) -> grpc.aio.StreamStreamCall:
        if self.stub is None:
            raise InvokeError(UNAVAILABLE, f"{self.label} is restarting")
        return self.stub.Calls(requests)


@dataclass
class LocalFunction:
    """A deployed function: its definition, replicas, counters and recent output."""

    definition: FunctionDef
    run_dir: Path
    max_message_bytes: int
    on_gauge: object = None
    replicas: list[LocalReplica] = field(default_factory=list)
    invocations: int = 0
    in_flight: int = 0
    last_error: str = ""
    logs: RecentOutput = field(default_factory=RecentOutput)
    enforcement: Enforcement = field(default_factory=Enforcement)
    backend: EmbeddedBackend | None = None
    _rr: itertools.count[int] = field(default_factory=itertools.count)
    # scaling: a count pinned by ReplicaUpdate (None: the autoscaler's), replicas leaving, load samples
    pinned: int | None = None
    # the count its config asks for (scale_to rewrites definition.replicas): a released pin goes back to it
    configured: int = 1
    draining: set[LocalReplica] = field(default_factory=set)
    start_failures: int = 0
    last_active: float = field(default_factory=time.monotonic)
    last_change: float = field(default_factory=time.monotonic)
    samples: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)
    _waiters: set[asyncio.Future[None]] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def workers(self) -> int:
        """Calls one replica runs at once (the watcher's thread pool)."""
        try:  # the function's own setting, else the gateway's (a bad one: the replica says why)
            default = environ.integer("WATCHER_THREADS", WATCHER_THREADS, minimum=1)
            return environ.integer("WATCHER_THREADS", default, minimum=1, environ=self.definition.env)
        except environ.EnvError:
            return WATCHER_THREADS

    @property
    def limit_notes(self) -> dict[str, str]:
        """`fn info` annotations: each limit and how it is enforced."""
        return self.enforcement.describe()

    def note(self, line: str, error: bool = False) -> None:
        """Keep a line of the function's output (or about it) and log it, name first;
        `error` lines are what `fn info`/`fn list` show while no replica is ready."""
        self.logs.append(line)
        if error:
            self.last_error = line
        log.info("%s", line)

    def update_gauge(self) -> None:
        if callable(self.on_gauge):
            self.on_gauge(self.name, self.available)

    @property
    def available(self) -> int:
        return sum(1 for r in self.replicas if r.ready)

    @property
    def desired(self) -> int:
        return len(self.replicas)

    def scale_to(self, count: int) -> list[LocalReplica]:
        """Start replicas up to `count`; return the ones to stop (newest first)."""
        while len(self.replicas) < count:
            used = {r.index for r in self.replicas} | {r.index for r in self.draining}
            index = next(i for i in itertools.count() if i not in used)  # a leaving one keeps its dirs
            replica = LocalReplica(self, index, self.run_dir, self.max_message_bytes, self.backend)
            self.replicas.append(replica)
            replica.start()
        surplus = self.replicas[count:]
        del self.replicas[count:]
        self.definition.replicas = count
        self.update_gauge()
        return surplus

    def rescale(self, count: int, event: str, why: str) -> list[LocalReplica]:
        """scale_to with the decision logged (and counted in /metrics as a scale event `event`)."""
        before = len(self.replicas)
        surplus = self.scale_to(count)
        self.last_change = time.monotonic()
        if count != before and event:
            self.note(f"{self.name}: scaling {before} -> {count} replicas ({event}): {why}")
        if self.backend is not None:
            self.backend.scaled(self.name, count, event if count != before else "")
        return surplus

    # -- autoscaling -------------------------------------------------------

    @property
    def floor(self) -> int:
        """The fewest replicas the autoscaler keeps: min_replicas, but 1 for 0 when the gateway
        runs with scale to zero off."""
        low = self.definition.min_replicas
        if low == 0 and self.backend is not None and not self.backend.scale_to_zero:
            return 1
        return low

    @property
    def scale_notes(self) -> dict[str, str]:
        """`fn info` annotations: how the count is decided."""
        d = self.definition
        if self.pinned is not None:
            how = f"pinned at {self.pinned} (openfx-cli fn scale {self.name} --auto to release)"
        elif not d.autoscaling:
            how = "fixed"
        else:
            how = f"auto {d.min_replicas}..{d.max_replicas}, {d.concurrency_target:g} in flight per replica"
            if d.scale_to_zero_after:
                how += f", to zero after {d.scale_to_zero_after:g}s idle"
                if self.floor:
                    how += " (scale to zero is off on this gateway: at least 1)"
        return {"openfx.scaling": how}

    def autoscale(self, now: float) -> list[LocalReplica]:
        """One look at the load (each monitor tick); return the replicas to retire.

        Up: the mean in flight over the last tenth of the stable window (at least 0.4 s, as
        Knative's panic window) needs more replicas at `concurrency_target` each. Down: the peak
        over a whole stable window without a change needs fewer. Zero: no call for
        `scale_to_zero_after` with min_replicas 0. Never outside [min_replicas, max_replicas]."""
        d = self.definition
        self.samples.append((now, self.in_flight))
        if self.in_flight:
            self.last_active = now
        window = max(d.stable_window, MONITOR_INTERVAL * 2)
        while self.samples and self.samples[0][0] < now - window - MONITOR_INTERVAL:
            self.samples.popleft()
        if not d.autoscaling or self.pinned is not None or self._waiters:
            return []
        current = len(self.replicas)
        target = d.concurrency_target
        if current and self.floor == 0 and d.scale_to_zero_after and not self.in_flight:
            starting = any(r.starting or (r.running and not r.ready) for r in self.replicas)
            idle = now - self.last_active
            if idle >= d.scale_to_zero_after and not starting:
                return self.rescale(0, "zero", f"no call for {idle:.1f}s (scale_to_zero_after)")
        if not current:
            if self.floor:  # released at zero on a gateway that keeps one
                return self.rescale(self.floor, "up", "scale to zero is off on this gateway")
            return []  # the next call starts one (acquire)
        up_window = min(max(window / 10, 0.4), 6.0)
        recent = [n for t, n in self.samples if t >= now - up_window]
        spans = self.samples[0][0] <= now - up_window
        if recent and spans and now - self.last_change >= up_window:
            mean = sum(recent) / len(recent)
            want = min(max(math.ceil(mean / target), self.floor, 1), d.max_replicas)
            if want > current:
                per = mean / max(self.available, 1)
                why = (
                    f"{mean:.1f} calls in flight over {up_window:g}s, {per:.1f} per ready replica, "
                    f"above the target of {target:g}"
                )
                return self.rescale(want, "up", why)
        if now - self.last_change >= window and self.samples[0][0] <= now - window:
            peak = max(n for t, n in self.samples if t >= now - window)
            want = min(max(math.ceil(peak / target), self.floor, 1), d.max_replicas)
            if want < current:
                why = f"at most {peak} calls in flight over {window:g}s (target {target:g} per replica)"
                return self.rescale(want, "down", why)
        return []

    # -- the activator -----------------------------------------------------

    def wake(self) -> None:
        """A replica became ready or failed to start: callers waiting in acquire look again."""
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def acquire(self, deadline: float | None) -> LocalReplica:
        """A ready replica for a call, waiting for one that is starting: from zero (the first call
        starts one; concurrent first calls share it) or right after a deploy. The wait lasts up to
        the caller's `deadline` (seconds), or without one up to ACTIVATION_WAIT, or the function's
        timeout when longer (the call then gets its whole timeout)."""
        loop = asyncio.get_running_loop()
        timeout = deadline if deadline is not None else max(ACTIVATION_WAIT, self.definition.timeout)
        self.last_active = time.monotonic()
        deadline = loop.time() + timeout
        failures = self.start_failures
        while True:
            if any(r.ready for r in self.replicas):
                return self.pick()
            if not self.replicas:
                if self.pinned is not None or not self.definition.autoscaling:
                    return self.pick()  # UNAVAILABLE: scaled to zero by hand
                self.rescale(1, "activate", "a call arrived while scaled to zero")
            elif self.start_failures != failures:
                detail = f": {self.last_error}" if self.last_error else ""
                raise InvokeError(UNAVAILABLE, f"function {self.name} could not start{detail}")
            elif not any(r.starting for r in self.replicas):
                return self.pick()  # restarting after a crash: fail fast, as before
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise InvokeError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"function {self.name} was not ready within {timeout:g}s (a cold start; "
                    "it goes on starting)",
                )
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.add(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                pass
            finally:
                self._waiters.discard(waiter)

    def pick(self) -> LocalReplica:
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


def _dialable(address: str) -> str:
    """A listen address as a local client dials it (0.0.0.0 and [::] are not dialable)."""
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", ""):
        return f"127.0.0.1:{port}" if port else ""
    if host in ("[::]", "::"):
        return f"[::1]:{port}"
    return address


def _pid_max() -> int:
    """The kernel's own ceiling on process ids: a pids.max above it is refused by the kernel."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return 4_194_304  # PID_MAX_LIMIT on 64-bit Linux


class EmbeddedBackend:
    """Functions as local processes; the gateway's Deploy/Update/Delete/ReplicaUpdate act here."""

    mode = "embedded"

    def __init__(
        self,
        run_dir: Path,
        max_message_bytes: int,
        grace: float = 10.0,
        function_user: str | None = "",
        timeout_grace: float = TIMEOUT_GRACE,
        on_recycle: Callable[[str, str], None] | None = None,
        cgroups: Cgroups | None | bool = True,
        gateway_address: str = "",
        images: ImageStore | None = None,
        scale_to_zero: bool = True,
        max_pids: int | None = None,
    ) -> None:
        """`function_user`: see sandbox.function_user (None: the default user when root; "": our
        own). `cgroups`: True to detect them, False for none, or a Cgroups to use.
        `max_pids`: processes and threads per replica (None: defaults.MAX_PIDS where a pids cgroup
        is writable, else none; 0: none); ValueError when it cannot be enforced.
        `gateway_address`: the gateway's gRPC, where handlers' function-to-function calls go.
        `images`: the local image store (`fn build`) a Deploy naming an image is started from.
        `scale_to_zero`: False keeps one replica of a function whose min_replicas is 0
        (`--no-scale-to-zero`, OPENFX_SCALE_TO_ZERO=off)."""
        self.gateway_address = _dialable(gateway_address)
        self.scale_to_zero = scale_to_zero
        self.images = images if images is not None else ImageStore(images_dir())
        self.known_images: dict[str, FunctionDef] = {}  # image -> a function deployed from source
        self.user = sandbox.function_user(function_user)
        self.cgroups = Cgroups.detect() if cgroups is True else (cgroups or None)
        self.max_pids = self._pids_cap(max_pids)
        self.run_dir = run_dir
        try:
            self.replicas_root = sandbox.replicas_root(run_dir, self.user)
        except BaseException:
            if self.cgroups is not None:
                self.cgroups.close()
            raise
        self.max_message_bytes = max_message_bytes
        self.grace = grace
        self.timeout_grace = timeout_grace
        self._on_recycle = on_recycle
        self.functions: dict[str, LocalFunction] = {}
        self.on_gauge: object = None
        self.on_scale: Callable[[str, int, str], None] | None = None
        self._draining: set[asyncio.Task[None]] = set()
        self._user_ok = self.user is None
        self._monitor: asyncio.Task[None] | None = None
        where = (
            f"cgroup v{self.cgroups.version} ({', '.join(self.cgroups.bases)})" if self.cgroups else "none"
        )
        log.info(
            "functions run as %s; limits by cgroups: %s; %s",
            self.user.name if self.user else "the gateway's user",
            where,
            f"at most {self.max_pids} processes and threads per replica" if self.max_pids else "no pids cap",
        )

    def _pids_cap(self, asked: int | None) -> int:
        usable = self.cgroups is not None and "pids" in self.cgroups.bases
        if asked is None:
            return defaults.MAX_PIDS if usable else 0
        problem = ""
        if asked < 0:
            problem = "is not a count"
        elif asked > (most := _pid_max()):
            problem = f"is more than the kernel's pid_max ({most})"
        elif asked and asked < defaults.MIN_PIDS:
            problem = f"leaves a replica no room (at least {defaults.MIN_PIDS})"
        elif asked and not usable:
            problem = "cannot be enforced here (no writable pids cgroup)"
        if problem:
            if self.cgroups is not None:
                self.cgroups.close()
            raise ValueError(f"--max-pids {asked} {problem}; --max-pids 0 runs replicas without a cap")
        return asked

    def on_recycle(self, name: str, reason: str) -> None:
        if self._on_recycle is not None:
            self._on_recycle(name, reason)

    def make_cgroup(self, name: str, enforcement: Enforcement) -> ReplicaCgroup | None:
        """A cgroup for one run of a replica, holding its limits (None when cgroups are unusable)."""
        if self.cgroups is None:
            return None
        cgroup = self.cgroups.create(name)
        if enforcement.memory_bytes is not None and enforcement.memory_by_cgroup:
            cgroup.set_memory(enforcement.memory_bytes)
        if enforcement.cpu_cores is not None:
            cgroup.set_cpu(enforcement.cpu_cores)
        if enforcement.pids is not None:
            cgroup.set_pids(enforcement.pids)
        return cgroup

    def get(self, name: str) -> LocalFunction:
        fn = self.functions.get(name)
        if fn is None:
            raise not_found(name)
        return fn

    async def _admit(self, definition: FunctionDef) -> Enforcement:
        """Refuse what cannot run here: no source, no usable interpreter, an unenforceable limit, a
        source that is not a folder the replicas' user can list holding a handler file it can read."""
        folder = definition.handler_dir
        if folder is None:
            raise InvokeError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"embedded gateway needs the source of {definition.name}: deploy with "
                "'openfx-cli fn deploy -f config.yaml' (annotation openfx.source)",
            )
        enforcement = decide(
            definition.name,
            definition.limits,
            self.cgroups.controllers if self.cgroups else {},
            self.max_pids,
        )
        if not self._user_ok and self.user is not None:
            problem = await sandbox.check_interpreter(self.user)
            if problem:
                raise InvokeError(grpc.StatusCode.FAILED_PRECONDITION, problem)
            self._user_ok = True
        # a caller's bad argument (the source it named), as the other caps: the same for root and not
        problem = await sandbox.check_source(self.user, folder, definition.handler_file)
        if problem:
            raise InvokeError(grpc.StatusCode.INVALID_ARGUMENT, f"{definition.name}: {problem}")
        if self._monitor is None:
            self._monitor = asyncio.get_running_loop().create_task(self._watch(), name="replica-monitor")
        return enforcement

    def _function(self, definition: FunctionDef, enforcement: Enforcement, **kept: object) -> LocalFunction:
        return LocalFunction(
            definition,
            self.replicas_root,
            self.max_message_bytes,
            configured=definition.replicas,
            on_gauge=self.on_gauge,
            enforcement=enforcement,
            backend=self,
            **kept,  # type: ignore[arg-type]
        )

    def _readable_copy(self, stored: StoredImage) -> Path:
        """The stored image's handler folder, as the replicas' user can read it. The store lives in
        the home of whoever built it (~/.openfx/images: /root/.openfx is 0700), which the function
        user cannot enter; so a root gateway copies the image's function folder, like a container
        runtime unpacks an image, into its replicas' folder (root's, others may only traverse)
        and copies it again when `fn build` has rewritten it."""
        if self.user is None:
            return stored.handler_dir
        built = stored.handler_dir.parent  # the context's function/ folder
        target = self.replicas_root / "images" / built.parent.name
        stamp = str(max(path.stat().st_mtime_ns for path in (built, *built.rglob("*"))))
        if readiness.read(target / ".built") == stamp:
            return target / "function" / stored.handler_dir.name
        target.parent.mkdir(mode=0o711, exist_ok=True)
        fresh = Path(tempfile.mkdtemp(dir=target.parent, prefix=".copy-"))
        shutil.copytree(built, fresh / "function", symlinks=True)
        readiness.mark_ready(fresh / ".built", stamp)
        fresh.chmod(0o755)
        shutil.rmtree(target, ignore_errors=True)
        fresh.rename(target)
        return target / "function" / stored.handler_dir.name

    def _resolve(self, definition: FunctionDef, current: FunctionDef | None = None) -> FunctionDef:
        """A Deploy/Update naming an image and no source (KETI's CLI): start it from that image's
        source, the local image store's build context or a function deployed from source with that
        image (the stack file's); an Update naming neither keeps the function's current source."""
        if definition.handler_dir is not None:
            if definition.image:
                self.known_images[definition.image] = definition
            return definition
        ann = definition.annotations
        stored = self.images.get(definition.image)
        if stored is not None:
            problems = missing_requirements(stored.requirements)
            if problems:
                raise InvokeError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"image {definition.image} needs packages the platform's environment lacks "
                    f"({', '.join(problems)}): install them with 'pip install -r {stored.requirements}' "
                    "in the environment the gateway runs (.venv), then deploy again",
                )
            return replace(
                definition,
                handler_dir=self._readable_copy(stored),
                handler_file=ann.get(HANDLER_FILE, stored.handler_file),
                handler_name=ann.get(HANDLER_NAME, stored.handler_name),
            )
        source = self.known_images.get(definition.image) or current
        if source is not None and source.handler_dir is not None:
            return replace(
                definition,
                handler_dir=source.handler_dir,
                handler_file=ann.get(HANDLER_FILE, source.handler_file),
                handler_name=ann.get(HANDLER_NAME, source.handler_name),
            )
        known = sorted(set(self.images.images()) | set(self.known_images))
        raise InvokeError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"unknown image {definition.image or '(none)'} for {definition.name}: this gateway knows "
            f"{', '.join(known) or 'no image'}; make one with 'openfx-cli fn build -f config.yaml' on "
            "this machine, or deploy the source with 'openfx-cli fn deploy -f config.yaml'",
        )

    async def deploy(self, definition: FunctionDef) -> None:
        if definition.name in self.functions:
            raise InvokeError(grpc.StatusCode.ALREADY_EXISTS, f"function {definition.name} already exists")
        definition = self._resolve(definition)
        fn = self._function(definition, await self._admit(definition))
        if definition.name in self.functions:  # deployed by another call while we checked
            raise InvokeError(grpc.StatusCode.ALREADY_EXISTS, f"function {definition.name} already exists")
        self.functions[definition.name] = fn
        fn.rescale(definition.replicas, "", "deployed")

    async def update(self, definition: FunctionDef) -> None:
        """Replace the function's replicas with new ones (counters and logs are kept)."""
        old = self.get(definition.name)
        definition = self._resolve(definition, old.definition)
        enforcement = await self._admit(definition)
        fn = self._function(definition, enforcement, invocations=old.invocations, logs=old.logs)
        fn.pinned = self._kept_pin(old, definition)
        old_replicas = old.replicas
        old.replicas = []
        self.functions[definition.name] = fn
        await asyncio.gather(*(r.stop(self.grace) for r in [*old_replicas, *old.draining]))
        fn.rescale(definition.replicas if fn.pinned is None else fn.pinned, "", "updated")

    @staticmethod
    def _kept_pin(old: LocalFunction, new: FunctionDef) -> int | None:
        """A pinned count outlives an Update, unless the Update moves [min, max] so that the pin
        falls outside: then it is clamped into the new bounds (and the log says so)."""
        pin, before = old.pinned, old.definition
        if pin is None:
            return None
        moved = (new.min_replicas, new.max_replicas) != (before.min_replicas, before.max_replicas)
        if not moved or new.min_replicas <= pin <= new.max_replicas:
            return pin
        clamped = min(max(pin, new.min_replicas), new.max_replicas)
        old.note(
            f"{new.name}: the update's replica bounds {new.min_replicas}..{new.max_replicas} leave out the "
            f"pinned count of {pin}: pinned at {clamped} instead"
        )
        return clamped

    async def delete(self, name: str) -> None:
        fn = self.get(name)
        del self.functions[name]
        await asyncio.gather(*(r.stop(self.grace) for r in [*fn.replicas, *fn.draining]))
        fn.replicas = []
        fn.update_gauge()

    async def scale(self, name: str, count: int) -> None:
        """ReplicaUpdate: set the count and pin it there (the autoscaler leaves it) until unpin."""
        fn = self.get(name)
        fn.pinned = count
        surplus = fn.rescale(count, "pin", "set by ReplicaUpdate; the autoscaler leaves it until unpinned")
        await asyncio.gather(*(r.stop(self.grace) for r in surplus))

    async def unpin(self, name: str) -> str:
        """Release a pin (`openfx-cli fn scale NAME --auto`): the autoscaler decides again, or for a
        function without a [min, max] range (nothing to decide) the count goes back to its config's,
        else it would stay at the pinned count while `fn info` says fixed. Returns what happened,
        for the caller to show."""
        fn = self.get(name)
        pin, fn.pinned = fn.pinned, None
        fn.last_change = fn.last_active = time.monotonic()
        fixed = not fn.definition.autoscaling
        if pin is None:
            return "not pinned; " + (f"fixed at {fn.configured}" if fixed else "autoscaling")
        then = f"back to the configured {fn.configured}" if fixed else "autoscaling decides again"
        line = f"released the pinned count of {pin}; {then}"
        fn.note(f"{name}: {line}")
        if fixed:
            surplus = fn.rescale(fn.configured, "pin", "released to the count its config asks for")
            await asyncio.gather(*(r.stop(self.grace) for r in surplus))
        return line

    def scaled(self, name: str, desired: int, event: str) -> None:
        """Tell /metrics the desired count (and count a scale event unless `event` is empty)."""
        listener = self.on_scale
        if listener is None:  # the gateway wires on_gauge to its metrics: their scale hook is beside it
            listener = getattr(getattr(self.on_gauge, "__self__", None), "scaled", None)
        if callable(listener):
            listener(name, desired, event)

    def _retire(self, fn: LocalFunction, replicas: list[LocalReplica]) -> None:
        """Stop replicas the autoscaler removed, once the calls they hold are answered."""
        for replica in replicas:
            fn.draining.add(replica)
            task = asyncio.get_running_loop().create_task(self._drain(fn, replica), name=replica.label)
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)

    async def _drain(self, fn: LocalFunction, replica: LocalReplica) -> None:
        try:
            deadline = time.monotonic() + fn.definition.timeout + self.timeout_grace
            while replica.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(MONITOR_INTERVAL)
            await replica.stop(self.grace)
        finally:
            fn.draining.discard(replica)

    async def _watch(self) -> None:
        """The monitor: memory (cgroup OOM kills, or RSS without a cgroup) and overdue calls."""
        while True:
            await asyncio.sleep(MONITOR_INTERVAL)
            try:
                self._check_all()
            except Exception:  # the monitor must outlive any one bad reading
                log.exception("replica monitor")

    def _check_all(self) -> None:
        replicas = [r for fn in self.functions.values() for r in fn.replicas]
        by_rss = any(
            r.fn.enforcement.memory_bytes and not r.fn.enforcement.memory_by_cgroup for r in replicas
        )
        groups = procgroup.groups() if by_rss else None
        now = time.monotonic()
        for replica in replicas:
            replica.check_memory(groups)
            replica.check_calls(now, self.timeout_grace)
        for fn in list(self.functions.values()):
            surplus = fn.autoscale(now)
            if surplus:
                self._retire(fn, surplus)

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
        return self.get(name).logs.text()

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()  # no scaling while we stop
        replicas = [r for fn in self.functions.values() for r in [*fn.replicas, *fn.draining]]
        await asyncio.gather(*(r.stop(self.grace) for r in replicas))
        for task in list(self._draining):
            task.cancel()
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        if self.cgroups is not None:
            self.cgroups.close()
        if self.replicas_root != self.run_dir:
            sandbox.remove_temp_folder(self.replicas_root)

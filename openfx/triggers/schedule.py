"""The schedule trigger (what OpenFaaS's cron-connector and Knative's PingSource give): a function
whose config says `schedule: "*/5 * * * *"` (cron; a sixth field counts seconds) is invoked through
the gateway at every tick with `schedule_input` as its input and `Trigger.Name = "schedule"`.

One run per tick, never a pile: a tick whose previous run is still going is skipped, and so are
ticks that passed while the platform was down or the loop was late; each is counted in
`trigger_ticks_skipped_total{trigger,function_name,reason}` (busy, late, down), never caught up.
Schedules come from the gateway's own function list (annotation `openfx.schedule`), so a
function deployed later with a schedule is picked up within seconds, and a deleted one stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from croniter import croniter
from prometheus_client import Counter
from pydantic import field_validator

from openfx import defaults
from openfx.client_channel import aio_gateway_channel, bearer
from openfx.config import FunctionSpec, Strict
from openfx.function_def import TIMEOUT
from openfx.pb import fxgateway_pb2 as gpb
from openfx.pb import fxgateway_pb2_grpc as gpb_grpc
from openfx.triggers.base import TOPIC_KEY, TRIGGER_KEY, PlatformContext, Trigger, encode_topic

log = logging.getLogger("openfx.platform")
REFRESH_SECONDS = 2.0
MAX_COUNTED_MISSES = 1_000_000  # a schedule down for years is not counted tick by tick
# how a function's schedule travels in its Deploy (and shows in `fn info`)
SCHEDULE = "openfx.schedule"
SCHEDULE_INPUT = "openfx.schedule.input"
SCHEDULE_ENABLED = "openfx.schedule.enabled"


class ScheduleKeys(Strict):
    """A function config's keys for this trigger."""

    schedule: str | None = None  # cron ("*/5 * * * *"; a sixth field counts seconds)
    schedule_input: str = ""  # the input each scheduled run gets
    schedule_enabled: bool = True

    @field_validator("schedule")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is not None and not croniter.is_valid(value):
            raise ValueError(f"not a cron expression: {value!r} (e.g. '*/5 * * * *')")
        return value


@dataclass(frozen=True)
class Schedule:
    function: str
    cron: str
    input: bytes
    timeout: float


def ticks_between(cron: str, after: float, until: float) -> int:
    """How many ticks of `cron` fall in (after, until]."""
    it = croniter(cron, after)
    count = 0
    while count < MAX_COUNTED_MISSES and it.get_next(float) <= until:
        count += 1
    return count


class ScheduleTrigger(Trigger):
    kind = "schedule"
    function_keys = ScheduleKeys

    def __init__(self, context: PlatformContext) -> None:
        super().__init__()
        self.context = context
        self.state_file = context.state_dir / "schedule.json"
        self.jobs: dict[str, tuple[Schedule, asyncio.Task[None]]] = {}
        self.running: set[str] = set()
        self.channel: grpc.aio.Channel | None = None
        self.stub: gpb_grpc.FxGatewayStub | None = None
        self.refresher: asyncio.Task[None] | None = None
        self.inflight: set[asyncio.Task[None]] = set()
        self.skipped = Counter(
            "trigger_ticks_skipped_total",
            "Ticks of a schedule that did not run: busy (the previous run still going), late, down",
            ["trigger", "function_name", "reason"],
            registry=context.registry,
        )

    @classmethod
    def from_stack(cls, context: PlatformContext) -> ScheduleTrigger:
        """Always on: a function deployed later may bring a schedule of its own."""
        return cls(context)

    @classmethod
    def annotations(cls, spec: FunctionSpec) -> dict[str, str]:
        assert isinstance(spec, ScheduleKeys)
        if not spec.schedule:
            return {}
        enabled = "true" if spec.schedule_enabled else "false"
        return {SCHEDULE: spec.schedule, SCHEDULE_INPUT: spec.schedule_input, SCHEDULE_ENABLED: enabled}

    @classmethod
    def check_annotations(cls, annotations: Mapping[str, str]) -> str | None:
        cron = annotations.get(SCHEDULE)
        if cron and not croniter.is_valid(cron):
            return f"{SCHEDULE}: not a cron expression: {cron[:80]!r}"
        return None

    # -- state kept across restarts: the last tick each schedule reached ----------------

    def _load_state(self) -> dict[str, float]:
        try:
            data = json.loads(self.state_file.read_text())
            return {str(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save_tick(self, function: str, tick: float) -> None:
        state = self._load_state()
        state[function] = tick
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_file)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self.channel = aio_gateway_channel(self.context.gateway)
        self.stub = gpb_grpc.FxGatewayStub(self.channel)
        await self._refresh()
        self.refresher = asyncio.create_task(self._refresh_forever())
        self.ready.set()

    async def stop(self) -> None:
        if self.refresher is not None:
            self.refresher.cancel()
        for _, task in self.jobs.values():
            task.cancel()
        await asyncio.gather(*(t for _, t in self.jobs.values()), return_exceptions=True)
        if self.inflight:  # let runs already started finish, as the bridge does
            await asyncio.wait(self.inflight, timeout=30)
        if self.channel is not None:
            await self.channel.close()

    def describe(self) -> str:
        return f"schedule ({len(self.jobs)} scheduled)"

    # -- which functions have schedules ------------------------------------------------------

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._refresh()

    async def _refresh(self) -> None:
        assert self.stub is not None
        listing = await self.stub.List(gpb.Empty(), metadata=bearer(self.context.token), timeout=10)
        wanted: dict[str, Schedule] = {}
        for fn in listing.Functions:
            ann = fn.Annotations
            if ann.get(SCHEDULE) and ann.get(SCHEDULE_ENABLED, "true") == "true":
                wanted[fn.Name] = Schedule(
                    fn.Name,
                    ann[SCHEDULE],
                    ann.get(SCHEDULE_INPUT, "").encode(),
                    float(ann.get(TIMEOUT, defaults.TIMEOUT_SECONDS)),
                )
        for name in list(self.jobs):
            if wanted.get(name) != self.jobs[name][0]:
                self.jobs.pop(name)[1].cancel()
        state = self._load_state()
        for name, schedule in wanted.items():
            if name not in self.jobs:
                self.jobs[name] = (schedule, asyncio.create_task(self._run(schedule, state.get(name))))
                log.info("platform: schedule: %s at '%s'", name, schedule.cron)

    # -- ticking ------------------------------------------------------------------------------

    async def _run(self, schedule: Schedule, last_tick: float | None) -> None:
        name = schedule.function
        now = time.time()
        if last_tick is not None and last_tick < now:
            missed = ticks_between(schedule.cron, last_tick, now)
            if missed:
                self.skipped.labels(self.kind, name, "down").inc(missed)
                log.info("platform: schedule: %s skipped %d tick(s) missed while down", name, missed)
        it = croniter(schedule.cron, now)
        tick = it.get_next(float)
        while True:
            await asyncio.sleep(max(0.0, tick - time.time()))
            now = time.time()
            late = ticks_between(schedule.cron, tick, now)  # ticks that passed while we slept too long
            if late:
                self.skipped.labels(self.kind, name, "late").inc(late)
                for _ in range(late):
                    tick = it.get_next(float)
            self._save_tick(name, tick)
            if name in self.running:
                self.skipped.labels(self.kind, name, "busy").inc()
                log.info("platform: schedule: %s tick skipped: the previous run is still going", name)
            else:
                task = asyncio.create_task(self._invoke(schedule))
                self.inflight.add(task)
                task.add_done_callback(self.inflight.discard)
            tick = it.get_next(float)

    async def _invoke(self, schedule: Schedule) -> None:
        assert self.stub is not None
        name = schedule.function
        self.running.add(name)
        code = grpc.StatusCode.OK
        try:
            await self.stub.Invoke(
                gpb.InvokeServiceRequest(Service=name, Input=schedule.input),
                metadata=(
                    (TRIGGER_KEY, self.kind),
                    (TOPIC_KEY, encode_topic(schedule.cron)),
                    *bearer(self.context.token),
                ),
                timeout=schedule.timeout + 5,
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            log.warning("platform: schedule: %s failed: %s: %s", name, code.name, exc.details())
        finally:
            self.running.discard(name)
            self.context.metrics.count(self.kind, name, code)

"""The MQTT trigger: mosquitto plus the MQTT-to-gateway bridge (openfx/bridge), as supervised
processes of the platform. Devices publish to `fn/<function>`; the bridge invokes the function
through the gateway and publishes the reply (see openfx/bridge/bridge.py for the delivery rules)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from pydantic import Field

from openfx import defaults, readiness
from openfx.bridge import mosquitto
from openfx.config import StackFile, Strict
from openfx.state import open_private_log
from openfx.triggers.base import PlatformContext, Trigger, TriggerError, supervise

BRIDGE_READY_SECONDS = 20.0
SCRAPE_JOB = "mqtt-bridge"  # the bridge's own /metrics (bridge.yaml's metrics_address)


class MqttSpec(Strict):
    """The stack file's `mqtt:`: the embedded platform's broker and bridge (an addition to the
    openfx-cli schema)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=defaults.MQTT_PORT, ge=0, le=65535)
    persistence: bool = True
    bridge: str = "broker/bridge.yaml"  # relative to the stack file


def apply_flags(stack: StackFile, no_mqtt: bool, port: int | None) -> None:
    """What `--no-mqtt` / `--mqtt-port` change in the stack, the same for `openfx-cli up` (what it
    scrapes) and the launcher (what it starts)."""
    if no_mqtt:
        stack.mqtt = None
    elif port is not None and stack.mqtt is not None:
        stack.mqtt.port = port


class MqttTrigger(Trigger):
    kind = "mqtt"
    stack_key = "mqtt"
    stack_model = MqttSpec

    def __init__(self, context: PlatformContext, spec: MqttSpec) -> None:
        super().__init__()
        self.context = context
        self.spec = spec
        self.ready_file = context.state_dir / "bridge.ready"
        self.broker_stop, self.bridge_stop = asyncio.Event(), asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.broker_log = None

    @classmethod
    def from_stack(cls, context: PlatformContext) -> MqttTrigger | None:
        spec = cls.stack_spec(context.stack)
        return cls(context, spec) if spec is not None and spec.enabled else None

    @classmethod
    def scrape_targets(cls, stack: StackFile, stack_path: Path) -> dict[str, str]:
        """The bridge's metrics_address, when the stack runs a bridge and its config names one."""
        from openfx.bridge.config import load_bridge_config

        spec = cls.stack_spec(stack)
        if spec is None or not spec.enabled:
            return {}
        try:
            config = load_bridge_config(stack_path.resolve().parent / spec.bridge)
        except Exception:  # a broken bridge config: the platform reports it when it starts the bridge
            return {}
        return {SCRAPE_JOB: config.metrics_address} if config.metrics_address else {}

    def _start_broker(self) -> subprocess.Popen[bytes]:
        spec = self.spec
        assert self.broker_log is not None
        return mosquitto.start(
            self.context.state_dir / "mosquitto",
            spec.port,
            spec.host,
            spec.persistence,
            log=self.broker_log.fileno(),
        )

    def _start_bridge(self) -> subprocess.Popen[bytes]:
        spec = self.spec
        bridge_config = (self.context.stack_path.parent / spec.bridge).resolve()
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "openfx.bridge",
                "-c",
                str(bridge_config),
                "--host",
                spec.host,
                "--port",
                str(spec.port),
                "--ready-file",
                str(self.ready_file),
                "--gateway",
                self.context.gateway,
                *(["--gateway-http", self.context.gateway_http] if self.context.gateway_http else []),
            ],
            stdin=subprocess.DEVNULL,
            # a token in the bridge's config still wins over OPENFX_TOKEN
            env={**os.environ, "OPENFX_TOKEN": token} if (token := self.context.invoke_token) else None,
        )

    async def prepare(self) -> None:
        """Start the broker before the functions: a taken port fails the platform at once."""
        try:
            mosquitto.find_mosquitto()
            self.broker_log = open_private_log(self.context.state_dir / "mosquitto.log")
            first = await asyncio.to_thread(self._start_broker)
        except mosquitto.BrokerError as exc:
            raise TriggerError(str(exc)) from None
        broker = supervise("broker", self._start_broker, self.broker_stop, first)
        self.tasks.append(asyncio.create_task(broker))

    async def start(self) -> None:
        readiness.clear(self.ready_file)
        self.tasks.append(asyncio.create_task(supervise("bridge", self._start_bridge, self.bridge_stop)))
        if await readiness.wait_async(self.ready_file, lambda: True, BRIDGE_READY_SECONDS) is not None:
            self.ready.set()

    async def stop(self) -> None:
        """The bridge first (it finishes its in-flight messages), then the broker (it saves sessions)."""
        self.bridge_stop.set()
        await asyncio.gather(*self.tasks[1:])
        self.broker_stop.set()
        await asyncio.gather(*self.tasks[:1])
        readiness.clear(self.ready_file)
        if self.broker_log is not None:
            self.broker_log.close()

    def describe(self) -> str:
        return f"mqtt {self.spec.host}:{self.spec.port} (topic fn/<function>)"

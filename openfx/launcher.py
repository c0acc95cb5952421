"""`python -m openfx.launcher`: the whole embedded platform in one foreground process tree.

Starts the gateway with every function (in this process), then every trigger the stack file
asks for (openfx/triggers: the MQTT broker and bridge, schedules), and says it is ready in
`.openfx/platform.ready` (what `openfx-cli up -d` waits for). SIGTERM or Ctrl-C stops them in
reverse order: the triggers finish what they have in flight, the gateway drains its calls.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path

import uvloop

from openfx import readiness
from openfx.config import ConfigError, StackFile, load_stack
from openfx.gateway.app import (
    Gateway,
    GatewaySettings,
    StartError,
    add_arguments,
    configure_logging,
    settings_from,
)
from openfx.gateway.auth import INVOKE
from openfx.state import state_dir
from openfx.triggers import KINDS, PlatformContext, Trigger, TriggerError, mqtt

TRIGGER_READY_SECONDS = 20.0

log = logging.getLogger("openfx.platform")


def _say(text: str) -> None:
    log.info("platform: %s", text)


def _reachable(address: str) -> str:
    """Where the triggers reach a listener bound to `address` (a wildcard bind means loopback)."""
    host, _, port = address.rpartition(":")
    loopback = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "::": "[::1]"}.get(host)
    return f"{loopback}:{port}" if loopback else address


def _token(settings: GatewaySettings) -> str | None:
    """The platform's own credential for its triggers: the local admin token, else OPENFX_TOKEN."""
    if settings.admin_token_file:
        return Path(settings.admin_token_file).read_text().strip()
    return os.environ.get("OPENFX_TOKEN") or None


def _invoke_token(settings: GatewaySettings, gateway: Gateway) -> str | None:
    """What a trigger that only invokes carries: nothing while invoking is open; the invoke token
    when one is set (least privilege: the bridge never holds the manage scope then); else the
    platform's own token, so configured tokens do not leave MQTT requests unauthenticated."""
    if gateway.tokens.is_open(INVOKE):
        return None
    return os.environ.get("OPENFX_INVOKE_TOKEN") or _token(settings)


async def run(stack_path: Path, stack: StackFile, settings: GatewaySettings, state_dir: Path) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready_file = state_dir / readiness.PLATFORM_READY
    readiness.clear(ready_file)
    try:
        gateway = Gateway(settings, stack)
    except ConfigError as exc:
        _say(str(exc))
        return 2
    context = PlatformContext(
        stack,
        stack_path,
        state_dir,
        _reachable(settings.grpc_address),
        _token(settings),
        gateway.metrics.registry,
        gateway_http=f"{'https' if settings.tls else 'http'}://{_reachable(settings.http_address)}",
        invoke_token=_invoke_token(settings, gateway),
    )
    triggers: list[Trigger] = [t for kind in KINDS.values() if (t := kind.from_stack(context)) is not None]
    started: list[Trigger] = []
    try:
        for trigger in triggers:
            await trigger.prepare()
            started.append(trigger)
        await gateway.start()
    except (TriggerError, OSError, StartError) as exc:
        await _stop(started, gateway)
        _say(str(exc))  # last, so `up -d`'s log tail ends with it
        return 1
    not_ready = await gateway.wait_ready()
    try:
        for trigger in triggers:
            await trigger.start()
    except TriggerError as exc:
        _say(str(exc))
        await _stop(triggers, gateway)
        return 1
    for trigger in triggers:
        try:
            await asyncio.wait_for(trigger.ready.wait(), TRIGGER_READY_SECONDS)
        except TimeoutError:
            not_ready.append(trigger.kind)
    names = ", ".join(gateway.backend.functions) or "none"
    where = ", ".join(
        [f"grpc {settings.grpc_address}, http http://{settings.http_address}"]
        + [t.describe() for t in triggers]
    )
    pending = f"; NOT ready: {', '.join(not_ready)}" if not_ready else ""
    line = f"ready: {where}; functions: {names}{pending}"
    _say(line)
    readiness.mark_ready(ready_file, line)
    await stop.wait()
    _say("stopping")
    readiness.clear(ready_file)
    await _stop(triggers, gateway)
    return 0


async def _stop(triggers: list[Trigger], gateway: Gateway) -> None:
    """Triggers first (they finish their in-flight work through the gateway), then the gateway."""
    for trigger in reversed(triggers):
        try:
            await trigger.stop()
        except Exception as exc:  # one trigger failing to stop must not keep the others running
            _say(f"{trigger.kind} did not stop cleanly: {exc}")
    await gateway.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m openfx.launcher", description=__doc__)
    p.add_argument("-f", "--file", default="openfx.yaml")
    add_arguments(p)
    p.add_argument("--mqtt-port", type=int, default=None, help="override the stack file's mqtt.port")
    p.add_argument("--no-mqtt", action="store_true", help="start without the broker and bridge")
    p.add_argument("--state-dir", default=None, help="where the broker keeps its sessions (default .openfx/)")
    args = p.parse_args(argv)
    settings = settings_from(args)
    configure_logging(settings)
    try:
        stack = load_stack(args.file)
    except ConfigError as exc:
        _say(str(exc))
        raise SystemExit(2) from None
    mqtt.apply_flags(stack, args.no_mqtt, args.mqtt_port)
    stack_path = Path(args.file).resolve()
    folder = Path(args.state_dir) if args.state_dir else state_dir(stack_path)
    folder.mkdir(parents=True, exist_ok=True)
    raise SystemExit(uvloop.run(run(stack_path, stack, settings, folder)))


if __name__ == "__main__":
    main()

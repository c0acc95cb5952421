"""`python -m openfx.platform`: the whole embedded platform in one foreground process tree.

Starts the MQTT broker (mosquitto) when the stack file enables it, the gateway with every
function (in this process), then the bridge once the gateway answers. SIGTERM or Ctrl-C
stops them in reverse order: the bridge finishes its in-flight messages, the gateway
drains its calls, the broker saves its sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import uvloop

from openfx.bridge import mosquitto
from openfx.config import ConfigError, StackFile, load_stack
from openfx.gateway.app import Gateway, GatewaySettings, add_arguments, configure_logging, settings_from

SUPERVISE_BACKOFF = (0.5, 10.0)


log = logging.getLogger("openfx.platform")


def _say(text: str) -> None:
    log.info("platform: %s", text)


async def _supervise(name: str, start, stop: asyncio.Event, first=None) -> None:  # type: ignore[no-untyped-def]
    """Keep a helper process (broker, bridge) running: restart it with capped backoff if it dies."""
    delay = SUPERVISE_BACKOFF[0]
    while not stop.is_set():
        try:
            process = first or await asyncio.to_thread(start)
        except Exception as exc:  # e.g. the broker's port taken meanwhile
            _say(f"{name} failed to start: {exc}; retrying in {delay:g}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, SUPERVISE_BACKOFF[1])
            continue
        first = None
        waiter = asyncio.create_task(asyncio.to_thread(process.wait))
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(waiter, 20)
                except TimeoutError:
                    process.kill()
            return
        stopper.cancel()
        _say(f"{name} exited with code {process.returncode}; restarting in {delay:g}s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, SUPERVISE_BACKOFF[1])


async def run(stack_path: Path, stack: StackFile, settings: GatewaySettings, state_dir: Path) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    helpers: list[asyncio.Task[None]] = []
    broker_stop, bridge_stop = asyncio.Event(), asyncio.Event()
    mqtt = stack.mqtt if stack.mqtt is not None and stack.mqtt.enabled else None
    if mqtt is not None:
        try:
            mosquitto.find_mosquitto()
        except mosquitto.BrokerError as exc:
            _say(str(exc))
            return 1
        log = open(state_dir / "mosquitto.log", "ab")  # noqa: SIM115 (lives as long as the platform)

        def start_broker() -> subprocess.Popen[bytes]:
            return mosquitto.start(
                state_dir / "mosquitto", mqtt.port, mqtt.host, mqtt.persistence, log=log.fileno()
            )

        try:
            first = await asyncio.to_thread(start_broker)  # fail fast (port in use) before anything else
        except mosquitto.BrokerError as exc:
            _say(str(exc))
            return 1
        helpers.append(loop.create_task(_supervise("broker", start_broker, broker_stop, first)))

    try:
        gateway = Gateway(settings, stack)
    except ConfigError as exc:
        _say(str(exc))
        broker_stop.set()
        await asyncio.gather(*helpers)
        return 2
    try:
        await gateway.start()
    except OSError as exc:
        _say(str(exc))
        broker_stop.set()
        await asyncio.gather(*helpers)
        await gateway.stop()
        return 1
    not_ready = await gateway.wait_ready()
    if mqtt is not None:
        bridge_config = (stack_path.parent / mqtt.bridge).resolve()

        ready_file = state_dir / "bridge.ready"
        ready_file.unlink(missing_ok=True)

        def start_bridge() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "openfx.bridge",
                    "-c",
                    str(bridge_config),
                    "--host",
                    mqtt.host,
                    "--port",
                    str(mqtt.port),
                    "--ready-file",
                    str(ready_file),
                    "--gateway",
                    settings.grpc_address,
                ],
                stdin=subprocess.DEVNULL,
            )

        helpers.append(loop.create_task(_supervise("bridge", start_bridge, bridge_stop)))
        for _ in range(200):  # the bridge subscribes within a second; ready means devices are answered
            if ready_file.exists() or stop.is_set():
                break
            await asyncio.sleep(0.1)
        else:
            not_ready.append("bridge")
    names = ", ".join(gateway.backend.functions) or "none"
    broker = f", mqtt {mqtt.host}:{mqtt.port} (topic fn/<function>)" if mqtt else ""
    pending = f"; NOT ready: {', '.join(not_ready)}" if not_ready else ""
    where = f"grpc {settings.grpc_address}, http http://{settings.http_address}{broker}"
    _say(f"ready: {where}; functions: {names}{pending}")
    await stop.wait()
    _say("stopping")
    bridge_stop.set()
    await asyncio.gather(*helpers[1:] if mqtt else [])
    await gateway.stop()
    broker_stop.set()
    with contextlib.suppress(Exception):
        await asyncio.gather(*helpers)
    return 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m openfx.platform", description=__doc__)
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
    if args.no_mqtt:
        stack.mqtt = None
    elif args.mqtt_port is not None and stack.mqtt is not None:
        stack.mqtt.port = args.mqtt_port
    stack_path = Path(args.file).resolve()
    state_dir = Path(args.state_dir or os.environ.get("OPENFX_HOME") or stack_path.parent / ".openfx")
    state_dir.mkdir(parents=True, exist_ok=True)
    raise SystemExit(uvloop.run(run(stack_path, stack, settings, state_dir)))


if __name__ == "__main__":
    main()

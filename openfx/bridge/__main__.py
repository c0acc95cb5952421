"""`python -m openfx.bridge [-c broker/bridge.yaml]`: run the MQTT bridge to the gateway until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
import sys

import uvloop
from pydantic import ValidationError

from openfx import env
from openfx.bridge.bridge import Bridge
from openfx.bridge.config import BridgeConfig, Route, load_bridge_config
from openfx.config import ConfigError


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m openfx.bridge", description=__doc__)
    p.add_argument("-c", "--config", help="bridge config file (broker/bridge.yaml)")
    p.add_argument("--host", help="broker host")
    p.add_argument("--port", type=int, help="broker port")
    p.add_argument("--gateway", default=env.optional("OPENFX_URL"), help="gateway gRPC address")
    p.add_argument(
        "--gateway-http", default=env.optional("OPENFX_HTTP_URL"), help="gateway HTTP URL (transport http)"
    )
    p.add_argument("--transport", choices=["http", "grpc"], help="how to call the gateway (default http)")
    p.add_argument("--client-id", help="MQTT client id (stable across restarts)")
    p.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="FILTER=FUNCTION",
        help="topic filter to function, e.g. 'sensors/+/battery=unmarshalling' (repeatable)",
    )
    p.add_argument("--metrics", help="host:port for /metrics ('' to disable)")
    p.add_argument("--ready-file", help="touch this file once subscribed")
    p.add_argument("--ack", choices=["after-reply", "on-receipt"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=env.string("LOG_LEVEL", "INFO"), format="bridge: %(message)s", stream=sys.stderr
    )
    routes = None
    if args.route:
        try:
            routes = [Route(filter=f, function=fn) for f, _, fn in (r.partition("=") for r in args.route)]
        except ValidationError as exc:
            p.error(exc.errors()[0]["msg"])  # the reason, not pydantic's "further information" line
    try:
        config = load_bridge_config(
            args.config,
            host=args.host,
            port=args.port,
            gateway=args.gateway,
            gateway_http=args.gateway_http,
            transport=args.transport,
            client_id=args.client_id,
            routes=routes,
            ack=args.ack,
            ready_file=args.ready_file,
        )
    except ConfigError as exc:
        print(f"bridge: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.metrics is not None:
        config.metrics_address = args.metrics or None
    run(config)


def run(config: BridgeConfig) -> None:
    uvloop.run(serve(config))


async def serve(config: BridgeConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        bridge = Bridge(config)
    except (OSError, ssl.SSLError) as exc:  # the gateway's CA file: missing, unreadable, not PEM
        print(f"bridge: cannot use gateway_tls_ca: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    await bridge.start()
    await stop.wait()
    logging.getLogger("openfx.bridge").info("stopping (finishing in-flight requests)")
    await bridge.stop()


if __name__ == "__main__":
    main()

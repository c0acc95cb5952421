"""`python -m openfx.watcher`: run one function (configured by environment, as in OpenFx)."""

from __future__ import annotations

import argparse
import logging
import sys

import uvloop

from openfx import env
from openfx.parent import die_with_parent_if_asked
from openfx.watcher.server import WatcherSettings, serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m openfx.watcher", description=__doc__)
    parser.add_argument("--handler", help="handler file (env HANDLER_FILE)")
    parser.add_argument("--name", help="handler name (env HANDLER_NAME, default Handler)")
    parser.add_argument(
        "--addr", help="gRPC listen address (env WATCHER_ADDR, default 0.0.0.0:$WATCHER_PORT)"
    )
    args = parser.parse_args(argv)
    with env.exit_on_error("watcher"):
        settings = WatcherSettings.from_env()
        log_prefix = env.flag("WATCHER_LOG_PREFIX", True)
    if args.handler:
        settings.handler_file = args.handler
    if args.name:
        settings.handler_name = args.name
    if args.addr:
        settings.address = args.addr
    # one line per event, function name first (the embedded gateway adds "name[replica]: " itself)
    prefix = f"{settings.function_name or 'watcher'}: " if log_prefix else ""
    logging.basicConfig(
        level=env.string("LOG_LEVEL", "INFO"), format=prefix + "%(message)s", stream=sys.stderr
    )
    die_with_parent_if_asked()
    uvloop.run(serve(settings))


if __name__ == "__main__":
    main()

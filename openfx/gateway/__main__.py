"""`python -m openfx.gateway`: the gateway alone (`openfx-cli up` adds the broker and the bridge)."""

from __future__ import annotations

import argparse
import os
import sys

import uvloop

from openfx.config import ConfigError, load_stack
from openfx.gateway.app import add_arguments, configure_logging, serve, settings_from
from openfx.parent import die_with_parent_if_asked


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m openfx.gateway")
    parser.add_argument("-f", "--file", default=os.environ.get("OPENFX_STACK", "openfx.yaml"))
    parser.add_argument("--no-functions", action="store_true", help="start with no function deployed")
    add_arguments(parser)
    args = parser.parse_args(argv)
    settings = settings_from(args)
    configure_logging(settings)
    try:
        stack = None if args.no_functions else load_stack(args.file)
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    die_with_parent_if_asked()
    uvloop.run(serve(settings, stack))


if __name__ == "__main__":
    main()

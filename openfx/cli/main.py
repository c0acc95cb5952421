"""Root of `openfx-cli` (alias `ofx`)."""

from __future__ import annotations

import click

from openfx import __version__
from openfx.cli.aliases import AliasGroup
from openfx.cli.fn import function
from openfx.cli.k8s import k8s
from openfx.cli.token import token
from openfx.cli.updown import down, up


class Root(AliasGroup):
    aliases = {"fn": "function", "r": "runtime"}


@click.group(cls=Root, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """OpenFx serverless functions on gRPC: build, deploy, call, and run the embedded platform."""


@cli.command()
def version() -> None:
    """Print the CLI version."""
    click.echo(f"Version: {__version__}")


@cli.group()
def runtime() -> None:
    """Function runtimes (templates for `fn init`)."""


@runtime.command("list")
def runtime_list() -> None:
    """List the runtimes `fn init --runtime` and `fn build` accept."""
    from openfx.runtimes import RUNTIMES

    for runtime in RUNTIMES.values():
        click.echo(f"{runtime.name:<10} {runtime.about}")


cli.add_command(function)
cli.add_command(k8s)
cli.add_command(up)
cli.add_command(down)
cli.add_command(token)


if __name__ == "__main__":
    cli()

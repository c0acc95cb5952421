"""Click groups whose commands also answer to short aliases (fn, rm, invoke ...)."""

from __future__ import annotations

import click


class AliasGroup(click.Group):
    """A group whose commands also answer to short aliases (fn, rm, invoke ...)."""

    aliases: dict[str, str] = {}

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, self.aliases.get(cmd_name, cmd_name))

    def resolve_command(self, ctx: click.Context, args: list[str]):  # type: ignore[no-untyped-def]
        name, cmd, rest = super().resolve_command(ctx, args)
        return (cmd.name if cmd else name), cmd, rest

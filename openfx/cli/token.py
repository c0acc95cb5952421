"""The local admin token: what lets `openfx-cli` manage the embedded platform and nobody else.

`openfx-cli up` makes it once (random, mode 0600) at the `openfx.token_file` of the user's
config (`$OPENFX_CONFIG` or `~/.openfx/config.yaml`; else `token` beside it, and the key is written),
and hands the file to the gateway. Every later `openfx-cli` call reads it from there, so the
user never types it; `openfx-cli token` prints it for other tools (curl, KETI's CLI via a proxy).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import click
import yaml

from openfx import env


def user_config_path() -> Path:
    return Path(env.optional("OPENFX_CONFIG") or Path.home() / ".openfx" / "config.yaml").expanduser()


def _read_config(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        return {}
    except (OSError, yaml.YAMLError) as exc:
        raise click.ClickException(f"{path}: cannot read the CLI config ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("openfx", {}), dict):
        raise click.ClickException(f"{path}: expected a mapping with an 'openfx:' section")
    return data


def configured_token_file() -> Path | None:
    """The user config's `openfx.token_file`, if it names one."""
    name = (_read_config(user_config_path()).get("openfx") or {}).get("token_file")
    return Path(name).expanduser() if name else None


def ensure_local_token() -> Path:
    """The admin token file, created (0600) if missing and recorded in the user config."""
    config_path = user_config_path()
    config = _read_config(config_path)
    section = config.setdefault("openfx", {}) or {}
    config["openfx"] = section
    # beside the config by default: ~/.openfx/token
    path = Path(section.get("token_file") or config_path.with_name("token")).expanduser()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32) + "\n")
    elif path.stat().st_mode & 0o077:
        raise click.ClickException(f"{path} is readable by others: chmod 600 {path}")
    if not section.get("token_file"):
        section["token_file"] = str(path)
        config_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def read_token(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise click.ClickException(f"cannot read token_file {path}: {exc.strerror}") from None


@click.command()
def token() -> None:
    """Print the local admin token (`openfx-cli up` creates it) for tools that send their own."""
    path = configured_token_file()
    if path is None or not path.exists():
        raise click.ClickException("no local token yet: 'openfx-cli up' creates it")
    click.echo(read_token(path))

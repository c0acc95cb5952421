"""The platform's state folder: `.openfx/` beside the stack file (or $OPENFX_HOME), git-ignored.

Everything a command leaves behind goes here (pid and log files, the broker's sessions, the
schedule's last ticks, the ready file, rendered build contexts), never into whatever folder the
command ran from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO


def state_dir(stack_file: str | Path) -> Path:
    home = os.environ.get("OPENFX_HOME")
    folder = Path(home) if home else Path(stack_file).resolve().parent / ".openfx"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def private_opener(path: str, flags: int) -> int:
    """An `open(..., opener=)` that creates the file 0600 and narrows one an older version left 0644:
    function output, refused tokens and callers' addresses end up in logs, which other local users
    must not read."""
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def open_private_log(path: str | Path) -> BinaryIO:
    """A log (for a child process's stdout and stderr) opened for appending, owner-only."""
    return open(path, "ab", opener=private_opener)  # noqa: SIM115

"""One readiness mechanism: a ready file.

A process says it is ready by creating a file (atomically, with one line saying what is up) and
removes it when it stops; whoever waits polls for the file while the process lives. The watcher's
lock file (the file OpenFx's probe checks), the MQTT bridge's ready file and the platform's
`.openfx/platform.ready` (which `openfx-cli up -d` waits for) all work this way, so no one parses
logs or speaks a protocol just to learn that something started.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Callable, Collection
from pathlib import Path

POLL_SECONDS = 0.05
PLATFORM_READY = "platform.ready"  # in the state folder: the launcher's ready line
MAX_BYTES = 4096  # a ready line or a load failure; more is not read


def mark_ready(path: str | Path, line: str = "ready") -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(line.rstrip("\n") + "\n")
    os.replace(tmp, path)


def clear(path: str | Path) -> None:
    Path(path).unlink(missing_ok=True)


def read(path: str | Path, owners: Collection[int] | None = None) -> str | None:
    """The file's first MAX_BYTES, stripped; None unless it is a regular file reached without a
    symlink and, with `owners`, owned by one of them. A replica's files sit in a folder its function
    controls and the gateway may be root: a symlink or a hard link there must not make the gateway
    read (and show) a file of its own, nor a FIFO or a device block or never end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # missing, a symlink (ELOOP), unreadable
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or (owners is not None and info.st_uid not in owners):
            return None
        return os.read(fd, MAX_BYTES).decode("utf-8", "replace").strip()
    finally:
        os.close(fd)


def wait(
    path: str | Path, alive: Callable[[], bool], timeout: float, owners: Collection[int] | None = None
) -> str | None:
    """The ready line, or None when `alive()` turns false or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        line = read(path, owners)
        if line is not None:
            return line
        time.sleep(POLL_SECONDS)
    return read(path, owners)


async def wait_async(
    path: str | Path, alive: Callable[[], bool], timeout: float, owners: Collection[int] | None = None
) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        line = read(path, owners)
        if line is not None:
            return line
        await asyncio.sleep(POLL_SECONDS)
    return read(path, owners)

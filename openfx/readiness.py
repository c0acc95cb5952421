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
import time
from collections.abc import Callable
from pathlib import Path

POLL_SECONDS = 0.05
PLATFORM_READY = "platform.ready"  # in the state folder: the launcher's ready line


def mark_ready(path: str | Path, line: str = "ready") -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(line.rstrip("\n") + "\n")
    os.replace(tmp, path)


def clear(path: str | Path) -> None:
    Path(path).unlink(missing_ok=True)


def read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text().strip()
    except FileNotFoundError:
        return None


def wait(path: str | Path, alive: Callable[[], bool], timeout: float) -> str | None:
    """The ready line, or None when `alive()` turns false or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        line = read(path)
        if line is not None:
            return line
        time.sleep(POLL_SECONDS)
    return read(path)


async def wait_async(path: str | Path, alive: Callable[[], bool], timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        line = read(path)
        if line is not None:
            return line
        await asyncio.sleep(POLL_SECONDS)
    return read(path)

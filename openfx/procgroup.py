"""A replica is a process group (the gateway starts each watcher with start_new_session): these
find its members in /proc, sum their memory, and end them, so a handler's children die with the
replica. Used by the gateway (stop, restart, recycle, RSS watchdog) and by the watcher itself on
its way out (the gateway may be gone: SIGKILLed, the watcher got SIGTERM by PDEATHSIG)."""

from __future__ import annotations

import contextlib
import os
import signal
import time

ENV = "OPENFX_REPLICA_GROUP"  # set by the embedded gateway: the watcher leads a group of its own
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read().decode("ascii", "replace")
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    return text[text.rfind(")") + 2 :].split()


def groups() -> dict[int, list[int]]:
    """{process group id: [pid, ...]} for every live process (zombies left out)."""
    found: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields and fields[0] != "Z":
            found.setdefault(int(fields[2]), []).append(int(entry))
    return found


def members(pgid: int) -> list[int]:
    return groups().get(pgid, [])


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of these processes together (each counted whole, shared pages included)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{pid}/statm", "rb") as statm:
                total += int(statm.read().split()[1]) * _PAGE
    return total


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def end_own_group(grace: float = 1.0) -> None:
    """The watcher's last act when the gateway started it as a group leader: SIGTERM the rest of
    its group, then SIGKILL whatever is still there after `grace` seconds (never itself)."""
    if not os.environ.get(ENV) or os.getpgrp() != os.getpid():
        return
    me = os.getpid()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    kill_group(me, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while True:
        others = [pid for pid in members(me) if pid != me]
        if not others:
            return
        if time.monotonic() > deadline:
            for pid in others:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.02)

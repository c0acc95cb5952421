"""A replica is a process group (the gateway starts each watcher with start_new_session): these
find its members in /proc, sum their memory, and end them, so a handler's children die with the
replica. Used by the gateway (stop, restart, recycle, RSS watchdog) and by the watcher itself on
its way out (the gateway may be gone: SIGKILLed, the watcher got SIGTERM by PDEATHSIG).

A child that called setsid has left the group; where the replica has a cgroup of its own, the
gateway names its cgroup.procs files in OPENFX_REPLICA_CGROUP and the watcher ends every process
listed there too. It runs as the same user as its children, so it may signal them, and it needs
no gateway: this file is self-contained because container images carry it (build/render.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import time

ENV = "OPENFX_REPLICA_GROUP"  # set by the embedded gateway: the watcher leads a group of its own
CGROUP_ENV = "OPENFX_REPLICA_CGROUP"  # the replica's own cgroup.procs files, one a line
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


def alive(pid: int) -> bool:
    """Running (a zombie is not: it has ended and waits only for its parent to reap it)."""
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] != "Z"


def own_cgroup_members(me: int | None = None) -> list[int]:
    """Live processes in the replica's own cgroup (OPENFX_REPLICA_CGROUP), `me` left out. Empty
    unless `me` is listed in every one of those files: a variable naming a cgroup this process is
    not in (a shared one, say) must never make it kill strangers."""
    me = os.getpid() if me is None else me
    found: set[int] = set()
    for path in filter(None, os.environ.get(CGROUP_ENV, "").split("\n")):
        try:
            with open(path) as procs:
                pids = {int(p) for p in procs.read().split() if p.isdigit()}
        except (OSError, ValueError):
            return []
        if me not in pids:
            return []
        found |= pids
    return sorted(pid for pid in found - {me} if alive(pid))


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def end_own_group(grace: float = 1.0) -> None:
    """The watcher's last act when the gateway started it as a group leader: SIGTERM the rest of
    its group and of its own cgroup (setsid children), then SIGKILL whatever is still there after
    `grace` seconds, again until nothing is left or another `grace` has passed (never itself)."""
    if not os.environ.get(ENV) or os.getpgrp() != os.getpid():
        return
    me = os.getpid()

    def others() -> list[int]:
        return sorted({pid for pid in members(me) if pid != me} | set(own_cgroup_members(me)))

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    kill_group(me, signal.SIGTERM)
    _signal(own_cgroup_members(me), signal.SIGTERM)
    term_until = time.monotonic() + grace
    kill_until = term_until + grace
    while True:
        left = others()
        now = time.monotonic()
        if not left or now > kill_until:
            return
        if now > term_until:
            _signal(left, signal.SIGKILL)  # children forked meanwhile included
        time.sleep(0.02)

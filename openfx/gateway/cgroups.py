"""Per-replica cgroups: the kernel holds a replica to `limits.memory` / `limits.cpu` and to the
gateway's `--max-pids` (so a fork bomb stays inside its replica), counts its OOM kills, CPU
throttling and refused forks, and lists every process of the replica, so all of them can be
killed, even a child that left the replica's process group with setsid.

Both layouts are handled: cgroup v1 (one hierarchy per controller, e.g. /sys/fs/cgroup/memory and
/sys/fs/cgroup/cpu) and v2 (one unified tree). Replica cgroups nest under the gateway's own
cgroup of each hierarchy (read from /proc/self/cgroup), in one folder per gateway,
`openfx-<pid>-<tag>`, removed when the gateway stops; one left behind by a gateway killed with
SIGKILL is emptied and removed by the next gateway started in the same cgroup.

v2's no-internal-processes rule: a cgroup holding processes cannot hand controllers to children.
When the gateway's own cgroup does not already delegate memory and cpu (`cgroup.subtree_control`),
the gateway moves itself into a leaf, `openfx-<pid>-gateway`, then enables them; if other
processes share its cgroup that fails and v2 is not used (memory falls back to the RSS watchdog).

A replica joins its cgroups before the watcher is exec'd (sandbox.command's trampoline), so
everything the watcher and its handler do is inside them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import signal
from pathlib import Path

from openfx.procgroup import alive

log = logging.getLogger("openfx.gateway")

CONTROLLERS = ("memory", "cpu", "pids")
CPU_PERIOD_US = 100_000
# a file the gateway's own cgroup has in that v1 hierarchy (the root one has no pids.* files)
_V1_PROBE = {"memory": "memory.limit_in_bytes", "cpu": "cpu.cfs_quota_us", "pids": "cgroup.procs"}
_STALE = re.compile(r"^openfx-(\d+)-(?:[0-9a-f]+|gateway)$")


def _write(path: Path, value: str) -> None:
    with open(path, "w") as out:
        out.write(value)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _counter(text: str, key: str) -> int:
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


class ReplicaCgroup:
    """One replica's cgroup: a folder per v1 hierarchy ({controller: dir}), or one v2 folder."""

    def __init__(self, version: int, dirs: dict[str, Path]) -> None:
        self.version = version
        self.dirs = dirs

    @property
    def folders(self) -> list[Path]:
        return list(dict.fromkeys(self.dirs.values()))

    def file(self, controller: str, name: str) -> Path:
        return self.dirs[controller] / name

    def set_memory(self, limit: int) -> None:
        d = self.dirs["memory"]
        if self.version == 1:
            _write(d / "memory.limit_in_bytes", str(limit))
            if (d / "memory.memsw.limit_in_bytes").exists():  # no escape into swap
                _write(d / "memory.memsw.limit_in_bytes", str(limit))
        else:
            _write(d / "memory.max", str(limit))
            for name, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                if (d / name).exists():
                    _write(d / name, value)

    def set_cpu(self, cores: float) -> None:
        d = self.dirs["cpu"]
        quota = max(1000, int(cores * CPU_PERIOD_US))
        if self.version == 1:
            _write(d / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(d / "cpu.cfs_quota_us", str(quota))
        else:
            _write(d / "cpu.max", f"{quota} {CPU_PERIOD_US}")

    def set_pids(self, limit: int) -> None:
        """At most `limit` processes and threads: a fork bomb fails inside the replica (EAGAIN)."""
        _write(self.dirs["pids"] / "pids.max", str(limit))

    def add(self, pid: int) -> None:
        for folder in self.folders:
            _write(folder / "cgroup.procs", str(pid))

    def pids(self) -> set[int]:
        found: set[int] = set()
        for folder in self.folders:
            found.update(int(p) for p in _read(folder / "cgroup.procs").split() if p.isdigit())
        return found

    def oom_kills(self) -> int:
        """Processes of this cgroup the kernel killed for going over memory."""
        if "memory" not in self.dirs:
            return 0
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        return _counter(_read(self.dirs["memory"] / name), "oom_kill")

    def forks_refused(self) -> int:
        """Forks and new threads the pids limit refused (pids.events max)."""
        return _counter(_read(self.dirs["pids"] / "pids.events"), "max") if "pids" in self.dirs else 0

    def throttled(self) -> int:
        """Periods in which the CPU quota stopped this cgroup (cpu.stat nr_throttled)."""
        return _counter(_read(self.dirs["cpu"] / "cpu.stat"), "nr_throttled") if "cpu" in self.dirs else 0

    def kill(self) -> None:
        """SIGKILL every process in the cgroup (v2: cgroup.kill where the kernel has it)."""
        for folder in self.folders:
            if self.version == 2 and (folder / "cgroup.kill").exists():
                with contextlib.suppress(OSError):
                    _write(folder / "cgroup.kill", "1")
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    async def kill_all(self, timeout: float = 5.0) -> bool:
        """Kill until the cgroup is empty (children forked meanwhile included); False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.pids():
            if loop.time() > deadline:
                return False
            self.kill()
            await asyncio.sleep(0.02)
        return True

    def remove(self) -> None:
        for folder in self.folders:
            try:
                os.rmdir(folder)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cgroup %s not removed: %s", folder, exc)


class Cgroups:
    """The gateway's folder in each usable hierarchy, and the replica cgroups made in it."""

    def __init__(self, version: int, bases: dict[str, Path]) -> None:
        self.version = version
        self.bases = bases  # controller -> the gateway's folder

    @property
    def controllers(self) -> dict[str, str]:
        """{controller: "cgroup v1"|"cgroup v2"} for what this gateway can enforce."""
        return {c: f"cgroup v{self.version}" for c in self.bases}

    def create(self, name: str) -> ReplicaCgroup:
        dirs = {}
        for controller, base in self.bases.items():
            folder = base / name
            folder.mkdir(exist_ok=True)
            dirs[controller] = folder
        return ReplicaCgroup(self.version, dirs)

    def close(self) -> None:
        for base in dict.fromkeys(self.bases.values()):
            with contextlib.suppress(OSError):
                os.rmdir(base)

    @classmethod
    def detect(
        cls,
        root: Path = Path("/sys/fs/cgroup"),
        self_cgroup: Path = Path("/proc/self/cgroup"),
        pid: int | None = None,
    ) -> Cgroups | None:
        """The usable cgroups for a gateway with `pid` (default: this process), or None."""
        pid = os.getpid() if pid is None else pid
        try:
            lines = self_cgroup.read_text().splitlines()
        except OSError:
            return None
        v1 = _detect_v1(root, lines, pid)
        if "memory" in v1 or "cpu" in v1:
            return cls(1, v1)
        v2 = _detect_v2(root, lines, pid)  # memory and cpu may be on v2 beside a v1 pids hierarchy
        if v2:
            cls(1, v1).close()
            return cls(2, v2)
        return cls(1, v1) if v1 else None


def _gateway_folder(own: Path, pid: int) -> Path | None:
    """Make this gateway's folder under `own`, after clearing those of gateways that died."""
    _clear_stale(own)
    base = own / f"openfx-{pid}-{secrets.token_hex(3)}"
    try:
        base.mkdir()
    except OSError:
        return None
    return base


def _detect_v1(root: Path, lines: list[str], pid: int) -> dict[str, Path]:
    bases: dict[str, Path] = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[1]:
            continue
        names = parts[1].split(",")
        for controller in CONTROLLERS:
            if controller not in names or controller in bases:
                continue
            for mount in (root / parts[1], root / controller):
                own = mount / parts[2].lstrip("/")
                if (own / _V1_PROBE[controller]).exists():
                    base = _gateway_folder(own, pid)
                    if base is not None:
                        bases[controller] = base
                    break
    return bases


def _detect_v2(root: Path, lines: list[str], pid: int) -> dict[str, Path]:
    path = next((line[3:] for line in lines if line.startswith("0::")), None)
    if path is None:
        return {}
    mount = root if (root / "cgroup.controllers").exists() else root / "unified"
    own = mount / path.lstrip("/")
    available = [c for c in CONTROLLERS if c in _read(own / "cgroup.controllers").split()]
    if not available:
        return {}
    enable = " ".join(f"+{c}" for c in available)
    if not _delegates(own, available):
        try:
            _write(own / "cgroup.subtree_control", enable)
        except OSError:
            # no internal processes: step the gateway into a leaf of its own, then try again
            leaf = own / f"openfx-{pid}-gateway"
            try:
                leaf.mkdir(exist_ok=True)
                _write(leaf / "cgroup.procs", str(pid))
                _write(own / "cgroup.subtree_control", enable)
            except OSError as exc:
                log.warning("cgroup v2 at %s cannot delegate %s: %s", own, enable, exc)
                return {}
    base = _gateway_folder(own, pid)
    if base is None:
        return {}
    try:
        _write(base / "cgroup.subtree_control", enable)
    except OSError as exc:
        log.warning("cgroup v2 at %s: %s", base, exc)
        return {}
    return {c: base for c in available}


def _delegates(folder: Path, controllers: list[str]) -> bool:
    enabled = {word.lstrip("+") for word in _read(folder / "cgroup.subtree_control").split()}
    return all(c in enabled for c in controllers)


def _clear_stale(own: Path) -> None:
    try:
        entries = list(own.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _STALE.match(entry.name)
        if not match or not entry.is_dir() or alive(int(match.group(1))):
            continue
        for child in [c for c in entry.iterdir() if c.is_dir()]:
            ReplicaCgroup(1, {"x": child}).kill()
            with contextlib.suppress(OSError):
                os.rmdir(child)
        with contextlib.suppress(OSError):
            os.rmdir(entry)

"""A function's `limits.memory` / `limits.cpu` (Kubernetes quantities) and how the embedded
gateway enforces them.

The decision is made once, at Deploy/Update, so a limit is either enforced or refused there,
never silently ignored: memory by the replica's cgroup (v1 or v2) when one is writable, else by
the gateway's RSS watchdog over the replica's process group; CPU only by a cgroup (a CPU quota
has no user-space stand-in), so without one a CPU limit is FAILED_PRECONDITION. The gateway's
`--max-pids` (processes and threads per replica) is set by a pids cgroup where there is one; the
gateway refuses to start with an explicit `--max-pids` it cannot enforce. `describe()` is what
`fn info` shows, e.g. `256Mi (cgroup v1)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import grpc

from openfx.errors import InvokeError

_BINARY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "m": 10**-3}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([+-]?[0-9]+))?([A-Za-z]{0,2})$")
# below this no Python replica can start; a smaller limit is a typo (256 instead of 256Mi)
MIN_MEMORY_BYTES = 16 << 20
MIN_CPU = 0.01


def parse_quantity(text: str) -> float:
    """A Kubernetes quantity as a number: `256Mi` -> 268435456, `500m` -> 0.5, `1e3` -> 1000."""
    match = _QUANTITY.match(text.strip())
    if not match:
        raise ValueError(f"not a quantity: {text[:40]!r}")
    number, exponent, suffix = match.groups()
    value = float(number) * (10 ** int(exponent) if exponent else 1)
    if suffix in _BINARY:
        return value * _BINARY[suffix]
    if suffix in _DECIMAL:
        return value * _DECIMAL[suffix]
    if suffix:
        raise ValueError(f"unknown unit {suffix!r} in {text[:40]!r}")
    return value


def parse_memory(text: str) -> int:
    """Bytes, at least MIN_MEMORY_BYTES."""
    size = int(parse_quantity(text))
    if size < MIN_MEMORY_BYTES:
        raise ValueError(
            f"{text} is {size} bytes; at least {MIN_MEMORY_BYTES >> 20}Mi (did you mean {text}Mi?)"
        )
    return size


def parse_cpu(text: str) -> float:
    """Cores (`500m` -> 0.5)."""
    cores = parse_quantity(text)
    if cores < MIN_CPU:
        raise ValueError(f"{text} is {cores:g} cores; at least {MIN_CPU:g} (10m)")
    return cores


@dataclass(frozen=True)
class Enforcement:
    """What a function's replicas are held to, and by what."""

    memory_bytes: int | None = None
    memory_text: str = ""
    memory_by: str = ""  # "cgroup v1", "cgroup v2" or "RSS watchdog"
    cpu_cores: float | None = None
    cpu_text: str = ""
    cpu_by: str = ""
    pids: int | None = None  # processes and threads per replica (the gateway's --max-pids)
    pids_by: str = ""

    @property
    def memory_by_cgroup(self) -> bool:
        return self.memory_by.startswith("cgroup")

    def describe(self) -> dict[str, str]:
        """`fn info` annotations: limit and how it is enforced."""
        notes = {}
        if self.memory_bytes is not None:
            notes["openfx.limits.memory"] = f"{self.memory_text} ({self.memory_by})"
        if self.cpu_cores is not None:
            notes["openfx.limits.cpu"] = f"{self.cpu_text} ({self.cpu_by})"
        if self.pids is not None:
            notes["openfx.limits.pids"] = f"{self.pids} processes and threads ({self.pids_by})"
        return notes


def decide(
    name: str, limits: dict[str, str], cgroup_controllers: dict[str, str], max_pids: int = 0
) -> Enforcement:
    """How `limits` will be enforced, given {controller: "cgroup v1"|"cgroup v2"} usable here
    (`max_pids`: the gateway's per-replica cap, 0 for none; set only where a pids cgroup is).

    INVALID_ARGUMENT for a malformed quantity, FAILED_PRECONDITION for a CPU limit nothing here
    can enforce."""
    memory_text = (limits.get("memory") or "").strip()
    cpu_text = (limits.get("cpu") or "").strip()
    memory = cpu = None
    try:
        if memory_text:
            memory = parse_memory(memory_text)
        if cpu_text:
            cpu = parse_cpu(cpu_text)
    except ValueError as exc:
        raise InvokeError(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: limits: {exc}") from None
    cpu_by = ""
    if cpu is not None:
        cpu_by = cgroup_controllers.get("cpu", "")
        if not cpu_by:
            raise InvokeError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{name}: limits.cpu {cpu_text} cannot be enforced here (no writable cpu cgroup: run the "
                "gateway as root, or delegate the cgroup v2 cpu controller to it); remove limits.cpu",
            )
        cpu_by += " cpu quota"
    memory_by = ""
    if memory is not None:
        memory_by = cgroup_controllers.get("memory", "") or "RSS watchdog"
    pids_by = cgroup_controllers.get("pids", "") if max_pids else ""
    pids = max_pids if pids_by else None
    return Enforcement(memory, memory_text, memory_by, cpu, cpu_text, cpu_by, pids, pids_by)

"""Function-to-function calls: how deep a chain is and how long it has left.

A handler that calls another function (`fn.call`, KETI's `mesh.mesh_call`) sends the gateway the
number of calls that led to it plus one (gRPC metadata `openfx-hops`); the gateway hands that
number to the callee's handler (`Info.Hops`), so a chain that loops (a calls b calls a ...) is
stopped at `MAX_HOPS` with a clear error instead of filling every replica's worker pool. The
callee's `Info.Timeout` is the budget of this call (the caller's remaining deadline when it is
shorter than the function's timeout), so a nested call never outlives the call that made it.

Both halves live here because both processes need them: the gateway (`inbound`, set by the gRPC
front end for the call it is serving) and the watcher (`current`, set per call around the
handler). This module is part of the watcher runtime shipped in images.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass

METADATA_KEY = "openfx-hops"
MAX_HOPS = 8  # each hop holds a worker of its replica (16 by default) while it waits

# gateway side: the hop count the caller of the call being served sent (0 from outside)
inbound: ContextVar[int] = ContextVar("openfx_inbound_hops", default=0)


@dataclass(frozen=True)
class CallContext:
    """What a handler's outgoing calls inherit from the call it is serving. Built for every call, so
    it only keeps the raw `Info.Timeout` and when the call began; the deadline is worked out when a
    handler actually calls out (most never do)."""

    hops: int = 0
    timeout: str = ""  # Info.Timeout as received ("30s"); empty: no deadline
    began: float = 0.0  # time.monotonic() when the call reached the handler

    @property
    def deadline(self) -> float | None:
        """time.monotonic() by which the call must be answered, or None."""
        budget = parse_timeout(self.timeout) if self.timeout else None
        return None if budget is None else self.began + budget

    def remaining(self) -> float | None:
        deadline = self.deadline
        return None if deadline is None else deadline - time.monotonic()


# watcher side: the call this handler is serving (outside any call: no hops, no deadline)
OUTSIDE = CallContext()
current: ContextVar[CallContext] = ContextVar("openfx_call", default=OUTSIDE)  # noqa: B039 - frozen


def parse_timeout(text: str) -> float | None:
    """`Info.Timeout` ("30s", "2.5s") in seconds; None when absent or unreadable (KETI leaves it empty)."""
    try:
        seconds = float(text.strip().removesuffix("s"))
    except ValueError:
        return None
    return seconds if seconds > 0 else None


def parse_hops(value: str) -> int:
    """The hop count from metadata; anything unreadable counts as a call from outside."""
    return int(value) if value.isdigit() else 0


def too_deep(hops: int, name: str) -> str | None:
    """The one-line refusal for a chain past the limit, or None."""
    if hops <= MAX_HOPS:
        return None
    return (
        f"call to {name} refused: the call chain is {hops} function-to-function calls deep "
        f"(limit {MAX_HOPS}); do the functions call each other in a loop?"
    )

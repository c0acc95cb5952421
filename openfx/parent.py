"""Child processes that must not outlive their parent (watchers under the embedded gateway, a
gateway under a test run or a supervisor): with OPENFX_DIE_WITH_PARENT=1 the kernel sends
SIGTERM when the parent dies, even by SIGKILL, so nothing is left orphaned. (Linux ties this to
the thread that spawned the child: spawn from a thread that lives as long as the parent.)"""

from __future__ import annotations

import os
import signal

ENV = "OPENFX_DIE_WITH_PARENT"


def die_with_parent_if_asked() -> None:
    if not os.environ.get(ENV):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)

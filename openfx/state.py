"""The platform's state folder: `.openfx/` beside the stack file (or $OPENFX_HOME), git-ignored.

Everything a command leaves behind goes here (pid and log files, the broker's sessions, the
schedule's last ticks, the ready file, rendered build contexts), never into whatever folder the
command ran from.
"""

from __future__ import annotations

import os
from pathlib import Path


def state_dir(stack_file: str | Path) -> Path:
    home = os.environ.get("OPENFX_HOME")
    folder = Path(home) if home else Path(stack_file).resolve().parent / ".openfx"
    folder.mkdir(parents=True, exist_ok=True)
    return folder

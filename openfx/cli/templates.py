"""Runtime templates for `fn init` (the files live in openfx/templates/<runtime>/)."""

from __future__ import annotations

from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
RUNTIMES = {"python3": "python3", "python": "python3"}  # the workshop writes `--runtime python`


def template_dir(runtime: str) -> Path:
    return TEMPLATES / RUNTIMES[runtime]

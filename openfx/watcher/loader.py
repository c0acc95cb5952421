"""Find and prepare the user's `Handler`.

A function author writes either `def Handler(req)` or `class Handler` whose
`__init__()` runs once (load a model) and whose instance is called per request.
Loading uses importlib (OpenFx's `imp` is gone in Python 3.12) and puts the
handler's folder on `sys.path` so sibling modules import as they would in a container.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HandlerFn = Callable[[Any], Any]


class HandlerLoadError(Exception):
    """The handler file is missing, fails to import, or lacks the named callable."""


def load_handler(file: str | Path, name: str = "Handler") -> HandlerFn:
    """Import `file` and return a per-request callable (instantiating a class once)."""
    path = Path(file).resolve()
    if not path.is_file():
        raise HandlerLoadError(f"handler file not found: {path}")
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(f"openfx_handler_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise HandlerLoadError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise HandlerLoadError(f"importing {path.name} failed: {type(exc).__name__}: {exc}") from exc
    target = getattr(module, name, None)
    if target is None:
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise HandlerLoadError(f"{path.name} should define {name!r}; found: {', '.join(found) or 'nothing'}")
    if inspect.isclass(target):
        try:
            return target()
        except Exception as exc:
            raise HandlerLoadError(f"{name}.__init__ failed: {type(exc).__name__}: {exc}") from exc
    if not callable(target):
        raise HandlerLoadError(f"{name} in {path.name} is a {type(target).__name__}, not callable")
    return target

"""Find and prepare the user's `Handler`.

A function author writes either `def Handler(req)` or `class Handler` whose
`__init__()` runs once (load a model) and whose instance is called per request.
Loading uses importlib (OpenFx's `imp` is gone in Python 3.12) and puts the
handler's folder on `sys.path` so sibling modules import as they would in a container.

A failure says which kind it is (`HandlerLoadError.kind`) and points at the user's own code
(file and line), never at the platform's frames: that is what `fn info` and `fn list` show.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HandlerFn = Callable[[Any], Any]

# KETI's `mesh` module for handlers written for KETI (`import mesh`), after the handler's own folder
SHIM_DIR = Path(__file__).resolve().parent / "shim"

# the kinds of load failure, as `fn info` names them
FILE_MISSING = "handler file missing"
SYNTAX_ERROR = "syntax error"
IMPORT_ERROR = "import failed"
NOT_FOUND = "handler not found"
NOT_CALLABLE = "handler not callable"
INIT_FAILED = "init failed"


class HandlerLoadError(Exception):
    """The handler file is missing, fails to import, or lacks the named callable."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _where(exc: BaseException, folder: Path, default: str) -> str:
    """'file.py:12': the innermost frame in the user's folder (the platform's frames are noise)."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if Path(f.filename).resolve().is_relative_to(folder)
    ]
    if not frames:
        return default
    frame = frames[-1]
    return f"{Path(frame.filename).resolve().relative_to(folder)}:{frame.lineno}"


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text[:300]}"


def load_handler(file: str | Path, name: str = "Handler", *, chdir: bool = False) -> HandlerFn:
    """Import `file` and return a per-request callable (instantiating a class once).

    `chdir`: make the handler's folder the process's working directory first, as KETI runs a
    handler (in `/openfx/handler`, beside `handler.py`), so it opens the files beside it by a
    relative name, at import or per call. The watcher passes it, so the embedded platform, `fn run`
    and images all agree; tests and benches loading a handler in their own process do not."""
    path = Path(file).resolve()
    if not path.is_file():
        raise HandlerLoadError(FILE_MISSING, f"handler file not found: {path}")
    folder = path.parent
    if chdir:
        os.chdir(folder)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    if str(SHIM_DIR) not in sys.path:
        sys.path.append(str(SHIM_DIR))
    spec = importlib.util.spec_from_file_location(f"openfx_handler_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise HandlerLoadError(IMPORT_ERROR, f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        where = Path(exc.filename or path).name
        raise HandlerLoadError(SYNTAX_ERROR, f"{where}:{exc.lineno}: {exc.msg}") from exc
    except Exception as exc:
        raise HandlerLoadError(IMPORT_ERROR, f"{_where(exc, folder, path.name)}: {_describe(exc)}") from exc
    target = getattr(module, name, None)
    if target is None:
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        message = f"{path.name} should define {name!r}; found: {', '.join(found) or 'nothing'}"
        raise HandlerLoadError(NOT_FOUND, message)
    if inspect.isclass(target):
        try:
            return target()
        except Exception as exc:
            where = _where(exc, folder, path.name)
            raise HandlerLoadError(
                INIT_FAILED, f"{name}.__init__ failed: {_describe(exc)} (at {where})"
            ) from exc
    if not callable(target):
        raise HandlerLoadError(
            NOT_CALLABLE, f"{name} in {path.name} is a {type(target).__name__}, not callable"
        )
    return target

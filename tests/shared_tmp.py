"""A temporary folder the function user can write too.

When the tests run as root, the gateway runs replicas as the function user (openfx-fn), and
pytest's own `tmp_path` (under /tmp/pytest-of-root, mode 0700) is out of its reach: tests whose
handlers write marker files use this folder instead (sticky, world-writable, like /tmp)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def shared_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="openfx-test-"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)

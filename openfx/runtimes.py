"""The runtimes a function can name (`runtime:` in its config, `fn init --runtime`): one list, so
`runtime list`, `fn init` and `fn build` always agree.

A runtime pairs the handler template `fn init` copies (openfx/templates/<name>/) with the
Dockerfile template `fn build` renders (dockerfiles/<name>/).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import openfx

HANDLER_TEMPLATES = Path(openfx.__file__).resolve().parent / "templates"
DOCKERFILES = Path(openfx.__file__).resolve().parent / "bundled" / "dockerfiles"  # -> dockerfiles/


@dataclass(frozen=True)
class Runtime:
    name: str
    handler_template: str  # folder in openfx/templates/
    dockerfile: str  # folder in dockerfiles/
    about: str

    @property
    def handler_dir(self) -> Path:
        return HANDLER_TEMPLATES / self.handler_template

    @property
    def dockerfile_dir(self) -> Path:
        folder = DOCKERFILES / self.dockerfile
        if not (folder / "Dockerfile").is_file():
            raise ValueError(f"no Dockerfile template at {folder}")
        return folder


RUNTIMES = {
    "python3": Runtime("python3", "python3", "python3", "Python 3.11 (the shared template)"),
    "pyspark": Runtime("pyspark", "python3", "pyspark", "Python 3.11 + Java 17, Spark, MLeap's jars"),
}
ALIASES = {"python": "python3"}  # the workshop writes `--runtime python`


def get(name: str) -> Runtime:
    runtime = RUNTIMES.get(ALIASES.get(name, name))
    if runtime is None:
        raise ValueError(f"unknown runtime {name!r}; available: {', '.join(RUNTIMES)}")
    return runtime

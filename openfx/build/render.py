"""Build contexts for function images.

Every function is built from one template (`dockerfiles/<runtime>/`). The context holds only what
the image needs: the template, the watcher runtime (not the gateway or the CLI, which would bloat
every function image and widen its attack surface) and the function's folder as it is on disk.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import openfx
from openfx import runtimes
from openfx.config import FunctionSpec

# The runtime a watcher process needs inside the image, relative to the openfx package.
WATCHER_RUNTIME = (
    "__init__.py",
    "defaults.py",
    "errors.py",
    "fn.py",
    "framing.py",
    "hops.py",
    "parent.py",
    "procgroup.py",
    "readiness.py",
    "pb",
    "watcher",
)
# .openfx: the state folder (and its image store, `fn build`'s output) may sit in the function folder
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", ".venv", ".pytest_cache", "build", ".openfx")


def render_context(name: str, spec: FunctionSpec, output: Path) -> Path:
    """Write `output/<name>/` afresh: template files, `openfx/` (watcher only), `function/`."""
    template = runtimes.get(spec.runtime).dockerfile_dir
    if not spec.handler_file.is_file():
        raise ValueError(f"{name}: handler file {spec.handler_file} does not exist")
    context = output / name
    if context.exists():
        shutil.rmtree(context)
    context.mkdir(parents=True)
    for item in template.iterdir():
        if item.is_file():
            shutil.copy2(item, context / item.name)
    package = Path(openfx.__file__).resolve().parent
    for part in WATCHER_RUNTIME:
        source = package / part
        if source.is_dir():
            shutil.copytree(source, context / "openfx" / part, ignore=_SKIP)
        else:
            (context / "openfx").mkdir(exist_ok=True)
            shutil.copy2(source, context / "openfx" / part)
    shutil.copytree(spec.source_dir, context / "function", ignore=_SKIP)
    requirements = context / "function" / "requirements.txt"
    if not requirements.exists():
        requirements.write_text("")  # the template's COPY needs the file even when nothing is required
    return context


def docker_build_command(name: str, spec: FunctionSpec, context: Path, nocache: bool = False) -> list[str]:
    """The `docker build` invocation for a rendered context (printed when no engine is reachable)."""
    command = ["docker", "build", "-t", spec.image or name]
    if nocache:
        command.append("--no-cache")
    build_args = [f"handler_file={spec.handler.file}", f"handler_name={spec.handler.name}"]
    if spec.build_options:
        build_args.append("ADDITIONAL_PACKAGE=" + " ".join(spec.build_options))
    build_args += spec.build_args
    for arg in build_args:
        command += ["--build-arg", arg]
    command.append(str(context))
    return command


def docker_available(timeout: float = 10.0) -> bool:
    """True when a Docker engine answers (`docker info`), not merely when the CLI is installed."""
    if shutil.which("docker") is None:
        return False
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0

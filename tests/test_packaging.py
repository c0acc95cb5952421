"""A non-editable install (a wheel, as `pip install openfx-py` would give) carries everything the
platform reads at run time: the OpenAPI description, the handler and Dockerfile templates, the
broker's config. Built and installed into a scratch folder, then used with no repository around."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_carries_package_data_and_fn_build_works_from_it(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    source = tmp_path / "source"  # setuptools writes build/ into the tree it builds: not ours
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in files.stdout.splitlines():
        if (ROOT / name).exists() or (ROOT / name).is_symlink():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name, follow_symlinks=False)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("openfx_py-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "openfx/gateway/openapi.yaml",
        "openfx/console/static/index.html",  # the console: nothing may load from the internet
        "openfx/console/static/console.js",
        "openfx/console/static/console.css",
        "openfx/templates/python3/handler.py",
        "openfx/bundled/mosquitto.conf",
        "openfx/bundled/dockerfiles/python3/Dockerfile",
        "openfx/bundled/dockerfiles/pyspark/Dockerfile",
    ):
        assert needed in names, needed
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # run from an empty folder with the wheel's copy first on the path: no repository to lean on
    work = tmp_path / "work"
    (work / "fn" / "src").mkdir(parents=True)
    (work / "fn" / "src" / "handler.py").write_text("def Handler(req):\n    return req.input\n")
    (work / "fn" / "config.yaml").write_text(
        "functions:\n  fn:\n    runtime: python3\n"
        "    handler: {dir: ./src, file: handler.py}\n    image: fn\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "HOME": str(tmp_path / "home")}  # fn build: image store
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import openfx, openfx.bridge.mosquitto as m, openfx.runtimes as r;"
            "print(openfx.__file__); print(m.CONF_TEMPLATE.read_text()[:20]);"
            "print(r.get('pyspark').dockerfile_dir)",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines()[0].startswith(str(site))
    assert str(site) in probe.stdout.splitlines()[-1]
    build = subprocess.run(
        [sys.executable, "-m", "openfx.cli.main", "fn", "build", "-f", "fn/config.yaml", "-o", "out"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stderr
    assert (work / "out" / "fn" / "Dockerfile").is_file()
    assert (work / "out" / "fn" / "openfx" / "watcher" / "server.py").is_file()


@pytest.mark.parametrize("module", ["openfx.watcher.server", "openfx.watcher.probe", "openfx.fn"])
def test_an_image_build_context_carries_all_the_watcher_imports(tmp_path: Path, module: str) -> None:
    """The image holds only the watcher's part of the package: every module it imports must be there."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "openfx.cli.main",
            "fn",
            "build",
            "-f",
            "functions/echo/config.yaml",
            "-o",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    context = tmp_path / "echo"
    probe = subprocess.run(
        [sys.executable, "-c", f"import {module}, openfx; print(openfx.__file__)"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(context)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().startswith(str(context))

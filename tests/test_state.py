"""What commands leave behind goes into the state folder beside the stack file, not the cwd."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

CLI = str(Path(sys.executable).parent / "openfx-cli")


def test_fn_build_renders_into_the_state_folder_not_the_cwd(tmp_path: Path) -> None:
    function = tmp_path / "echo"
    shutil.copytree(ROOT / "functions" / "echo", function)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run(
        [CLI, "fn", "build", "-f", str(function / "config.yaml")],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env={**os.environ, "HOME": str(tmp_path / "home")},  # fn build also stores the image there
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert (function / ".openfx" / "build" / "echo" / "Dockerfile").is_file()
    assert (tmp_path / "home" / ".openfx" / "images").is_dir()
    assert list(elsewhere.iterdir()) == []
    assert not (function / "build").exists()

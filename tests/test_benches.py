"""Every bench runs in its smoke mode (tiny sizes, seconds): a bench that breaks fails CI. The
numbers printed here mean nothing; the tables in bench/README.md come from full runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.shared_tmp import shared_tmp

BENCHES = [
    "echo",
    "functions",
    "video",
    "load",
    "soak",
    "mqtt",
    "pyspark",
    "mnist",
    "isolation",
    "guards",
    "scaling",
]


@pytest.mark.parametrize("bench", BENCHES)
def test_bench_smoke(bench: str) -> None:
    """...and leaves nothing of its own in the temp dir (stack files, logs, gateways' folders)."""
    script = ROOT / "bench" / f"{bench}.py"
    with shared_tmp() as temp:  # the function user may need to reach folders made in it
        out = subprocess.run(
            [sys.executable, str(script), "--smoke"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=600,
            env={**os.environ, "TMPDIR": str(temp)},
        )
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        assert "|" in out.stdout, f"bench/{bench}.py printed no table:\n{out.stdout[-2000:]}"
        assert not list(temp.glob("openfx-*")), sorted(p.name for p in temp.iterdir())

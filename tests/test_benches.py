"""Every bench runs in its smoke mode (tiny sizes, seconds): a bench that breaks fails CI. The
numbers printed here mean nothing; the tables in bench/README.md come from full runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

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
    script = ROOT / "bench" / f"{bench}.py"
    out = subprocess.run(
        [sys.executable, str(script), "--smoke"], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "|" in out.stdout, f"bench/{bench}.py printed no table:\n{out.stdout[-2000:]}"

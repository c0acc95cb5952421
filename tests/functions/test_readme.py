"""The README's commands, run as written against a live platform (`openfx-cli up -d` with the
repo's openfx.yaml on the default ports), the way click's docs tests run their examples.

Every `$ ` line in a fenced block runs in bash from the repository root with the virtualenv
activated (as the README tells a user to), and its output (stdout and stderr) must match the
lines shown under it, where `...` stands for any text. A command that cannot run here (a Docker
engine, a cluster, a camera, the internet, a command that runs until Ctrl-C) carries a visible
`# not run here: <reason>` marker in the README itself. The test prints how many ran and how many
were skipped, and fails if any command's output differs.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

# a whole platform (Spark included) comes up first: minutes on a loaded 2-core machine
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

README = ROOT / "README.md"
NOT_RUN = "# not run here:"
VENV_BIN = Path(sys.executable).parent
DEFAULT_PORTS = (31113, 31114, 1883, 9101)


@dataclass
class Example:
    line: int
    command: str
    expected: list[str]

    @property
    def skipped(self) -> bool:
        return NOT_RUN in self.command


def examples(text: str) -> list[Example]:
    """`$ ` lines of fenced blocks (indented ones too) with the output lines that follow them."""
    found: list[Example] = []
    fenced, indent = False, ""
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            fenced = not fenced
            indent = raw[: len(raw) - len(raw.lstrip())]
            continue
        if not fenced:
            continue
        line = raw[len(indent) :] if raw.startswith(indent) else raw.lstrip()
        if line.startswith("$ "):
            found.append(Example(number, line[2:], []))
        elif found and found[-1].line < number and _in_block(found[-1], number):
            found[-1].expected.append(line.rstrip())
    return found


def _in_block(example: Example, number: int) -> bool:
    return number - example.line <= 1 + len(example.expected)


def matches(expected: list[str], actual: str) -> bool:
    pattern = ".*?".join(re.escape(part) for part in "\n".join(expected).strip("\n").split("..."))
    lines = [line.rstrip() for line in actual.rstrip("\n").splitlines()]
    return re.fullmatch(pattern, "\n".join(lines), re.DOTALL) is not None


def test_examples_parser_reads_commands_outputs_and_markers() -> None:
    text = "```sh\n$ echo a\na\n$ false   # not run here: why\n```\n  ```sh\n  $ echo b\n  b\n  ```\n"
    found = examples(text)
    assert [(e.command, e.expected, e.skipped) for e in found] == [
        ("echo a", ["a"], False),
        ("false   # not run here: why", [], True),
        ("echo b", ["b"], False),
    ]
    assert matches(["1,...", "x ... z"], "1,abc\nx y z\n") and not matches(["a"], "b")


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    for port in DEFAULT_PORTS:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"port {port} is taken: the README's commands need the default ports")
    tmp = tmp_path_factory.mktemp("readme")
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        "VIRTUAL_ENV": str(VENV_BIN.parent),
        "OPENFX_HOME": str(tmp / "state"),
        "OPENFX_CONFIG": str(tmp / "home" / "config.yaml"),
    }
    env.pop("OPENFX_TOKEN", None)
    up = subprocess.run(
        ["openfx-cli", "up", "-d"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
    )
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        _wait_for_spark(env)
        yield env
    finally:
        subprocess.run(["openfx-cli", "down"], cwd=ROOT, env=env, capture_output=True, timeout=120)
        for leftover in ("faces.jpg", "out.mp4"):
            (ROOT / leftover).unlink(missing_ok=True)


def _wait_for_spark(env: dict[str, str], timeout: float = 180) -> None:
    """The pyspark function answers rows at once but its accuracy line only once its Spark session
    is up: the call waits for it (up to the function's 120 s timeout, UNAVAILABLE after), as a
    user's first `fn call pyspark` does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["openfx-cli", "fn", "call", "pyspark"],
            input="",
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if out.returncode == 0:
            return
        time.sleep(1)
    raise AssertionError(f"pyspark's accuracy line not available after {timeout:g}s: {out.stderr}")


def test_samples_are_current(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "samples", tmp_path / "samples")
    shutil.copytree(ROOT / "clients", tmp_path / "clients")
    make = tmp_path / "samples" / "make.py"
    out = subprocess.run([sys.executable, str(make)], capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("square.jpg", "test.mp4"):
        assert (tmp_path / "samples" / name).read_bytes() == (ROOT / "samples" / name).read_bytes(), name


def test_readme_commands_run_as_written(platform: dict[str, str]) -> None:
    found = examples(README.read_text())
    ran, skipped, failures = 0, 0, []
    for example in found:
        if example.skipped:
            skipped += 1
            continue
        out = subprocess.run(
            ["bash", "-c", example.command],
            cwd=ROOT,
            env=platform,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=300,
        )
        ran += 1
        if not matches(example.expected, out.stdout):
            failures.append(
                f"README.md:{example.line}: $ {example.command}\n--- expected\n"
                + "\n".join(example.expected)
                + f"\n--- got (exit {out.returncode})\n{out.stdout}"
            )
    print(f"\nREADME commands: {ran} ran, {skipped} not run here (marked), {len(failures)} differ")
    assert ran >= 10 and not failures, "\n\n".join(failures)

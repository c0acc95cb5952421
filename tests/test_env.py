"""Environment variables read one way (openfx/env.py): the old spellings of on/off still work, and a
bad value stops a program with one line naming the variable and what it accepts, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from openfx import env


@pytest.mark.parametrize("word", ["1", "on", "ON", "true", "yes", " yes "])
def test_every_old_spelling_of_on_is_on(word: str) -> None:
    assert env.flag("X", False, {"X": word}) is True


@pytest.mark.parametrize("word", ["0", "off", "False", "no"])
def test_every_old_spelling_of_off_is_off(word: str) -> None:
    assert env.flag("X", True, {"X": word}) is False


def test_unset_or_empty_numbers_and_flags_take_the_default_but_an_empty_string_stays_empty() -> None:
    assert env.flag("X", True, {"X": ""}) is True and env.integer("X", 7, environ={}) == 7
    assert env.number("X", 2.5, {"X": " "}) == 2.5
    assert env.string("X", "d", {"X": ""}) == "" and env.string("X", "d", {}) == "d"  # '': no console
    assert env.optional("X", {"X": ""}) is None


@pytest.mark.parametrize(
    ("read", "message"),
    [
        (
            lambda: env.integer("N", 1, minimum=1, environ={"N": "0"}),
            "N must be a whole number >= 1, got '0'",
        ),
        (lambda: env.integer("N", 1, environ={"N": "1.5"}), "N must be a whole number >= 0, got '1.5'"),
        (lambda: env.number("T", 1.0, {"T": "-1"}), "T must be a number >= 0 (e.g. 2 or 0.5), got '-1'"),
        (lambda: env.number("T", 1.0, {"T": "nan"}), "T must be a number >= 0 (e.g. 2 or 0.5), got 'nan'"),
        (lambda: env.flag("F", True, {"F": "maybe"}), "F must be 'on' or 'off', got 'maybe'"),
        (
            lambda: env.flag("C", True, {"C": "x"}, also_on=("auto",)),
            "C must be 'auto', 'on' or 'off', got 'x'",
        ),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(read, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(env.EnvError) as caught:
        read()
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("variable", "value", "module", "expected"),
    [
        (
            "OPENFX_HTTP_BODY_TIMEOUT",
            "abc",
            "openfx.gateway",
            "gateway: OPENFX_HTTP_BODY_TIMEOUT must be a number >= 0 (e.g. 2 or 0.5), got 'abc'",
        ),
        (
            "OPENFX_MAX_STREAMS",
            "many",
            "openfx.gateway",
            "gateway: OPENFX_MAX_STREAMS must be a whole number >= 1",
        ),
        (
            "OPENFX_OPEN_MANAGEMENT",
            "maybe",
            "openfx.launcher",
            "gateway: OPENFX_OPEN_MANAGEMENT must be 'on' or",
        ),
        ("WATCHER_THREADS", "lots", "openfx.watcher", "watcher: WATCHER_THREADS must be a whole number >= 1"),
        ("WATCHER_LOG_PREFIX", "2", "openfx.watcher", "watcher: WATCHER_LOG_PREFIX must be 'on' or 'off'"),
        ("WATCHER_PORT", "x", "openfx.watcher.probe", "probe: WATCHER_PORT must be a whole number >= 1"),
    ],
)
def test_a_program_given_a_bad_value_exits_with_that_one_line(
    variable: str, value: str, module: str, expected: str, tmp_path: Path
) -> None:
    # the gateway's reads come before its flags are parsed: with --help an accepted value would
    # print the usage and exit 0; a watcher that accepted it would listen on a free loopback port
    argv = ["--help"] if module.startswith("openfx.gateway") or module == "openfx.launcher" else []
    watcher = {
        "WATCHER_ADDR": "127.0.0.1:0",
        "HANDLER_FILE": "/nonexistent.py",
        "LOCK_FILE": str(tmp_path / "l"),
    }
    out = subprocess.run(
        [sys.executable, "-m", module, *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **watcher, variable: value},
        timeout=30,
    )
    assert out.returncode == 1, out.stdout[:200]
    assert out.stderr.startswith(expected) and len(out.stderr.strip().splitlines()) == 1, out.stderr

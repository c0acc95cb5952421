"""Environment variables, read one way.

Settings come from flags first and environment variables second (as OpenFx's gateway and watcher
take theirs); before this module each reader parsed its own, with three spellings of on/off and a
traceback for `OPENFX_HTTP_BODY_TIMEOUT=abc`. Here a bad value is `EnvError`: one line naming the
variable, what it accepts and what it got. It is a ValueError, because the same readers parse a
deployed function's environment inside the gateway, which must not exit over it; a program's
entry point wraps its start in `exit_on_error` to stop with that line instead of a traceback.

An empty number or flag counts as unset (`OPENFX_X= cmd` is a common way to clear one); an empty
string stays empty where that means something (`OPENFX_CONSOLE_ADDR=`: no console).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

T = TypeVar("T", int, float)
ON = ("1", "on", "true", "yes")
OFF = ("0", "off", "false", "no")


class EnvError(ValueError):
    """A variable's value is not what it may be; the message is one line."""

    def __init__(self, name: str, accepts: str, value: str) -> None:
        super().__init__(f"{name} must be {accepts}, got {value[:40]!r}")


@contextlib.contextmanager
def exit_on_error(program: str) -> Iterator[None]:
    """Around a program's start: a bad variable ends it with `program: <the line>` on stderr and
    status 1 (a SystemExit whose code is that line, so a caller such as `openfx-cli up` can reword it)."""
    try:
        yield
    except EnvError as exc:
        raise SystemExit(f"{program}: {exc}") from None


def _raw(name: str, environ: Mapping[str, str] | None) -> str | None:
    value = (os.environ if environ is None else environ).get(name, "").strip()
    return value or None


def string(name: str, default: str = "", environ: Mapping[str, str] | None = None) -> str:
    """The value as written, `default` only when unset."""
    return (os.environ if environ is None else environ).get(name, default)


def optional(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The value, or None when unset or empty (a path or token that may be absent)."""
    return _raw(name, environ)


def _parsed(
    name: str,
    environ: Mapping[str, str] | None,
    parse: Callable[[str], T],
    ok: Callable[[T], bool],
    accepts: str,
) -> T | None:
    value = _raw(name, environ)
    if value is None:
        return None
    try:
        result = parse(value)
    except ValueError:
        raise EnvError(name, accepts, value) from None
    if not ok(result):
        raise EnvError(name, accepts, value)
    return result


def integer(name: str, default: int, minimum: int = 0, environ: Mapping[str, str] | None = None) -> int:
    result = optional_integer(name, minimum, environ)
    return default if result is None else result


def optional_integer(name: str, minimum: int = 0, environ: Mapping[str, str] | None = None) -> int | None:
    """A whole number, or None when unset (where the default depends on the machine)."""
    return _parsed(name, environ, int, lambda n: n >= minimum, f"a whole number >= {minimum}")


def number(name: str, default: float, environ: Mapping[str, str] | None = None) -> float:
    """A non-negative number (seconds, most often): 2, 0.5."""
    result = _parsed(name, environ, float, lambda x: 0 <= x < math.inf, "a number >= 0 (e.g. 2 or 0.5)")
    return default if result is None else result


def flag(
    name: str, default: bool, environ: Mapping[str, str] | None = None, also_on: tuple[str, ...] = ()
) -> bool:
    """On or off. The error names on/off (what the README writes); 1/0, true/false and yes/no (any
    case) are accepted too, the spellings these variables had before. `also_on`: a variable's own
    word for on (OPENFX_CGROUPS=auto)."""
    value = _raw(name, environ)
    if value is None:
        return default
    word = value.lower()
    if word in ON or word in also_on:
        return True
    if word in OFF:
        return False
    words = [f"'{word}'" for word in (*also_on, "on")]
    raise EnvError(name, f"{', '.join(words)} or 'off'", value)

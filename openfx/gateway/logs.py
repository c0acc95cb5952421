"""A function's output as the gateway keeps it.

`LineCutter` turns a replica's stdout/stderr bytes into lines of any length without ever holding
more than `MAX_LINE_BYTES` of one (a 200,000-byte line is kept as its first 4 KiB and a marker),
so the pump keeps reading and a handler never blocks on a full pipe. `RecentOutput` is what
`fn log` answers: the last lines, bounded in count and in bytes.
"""

from __future__ import annotations

import collections
import logging.handlers
from collections.abc import Iterator

from openfx.state import private_opener

MAX_LINE_BYTES = 4096
LOG_LINES = 2000
LOG_BYTES = 1 << 20


# C0 controls except tab, plus DEL and the C1 controls, shown as visible escapes: a handler printing "\r" or
# ESC must not forge a gateway log line or send terminal escapes to whoever reads `fn log`
_CONTROLS = {
    c: {0x0D: "\\r", 0x0A: "\\n"}.get(c, f"\\x{c:02x}")
    for c in (*range(0x20), *range(0x7F, 0xA0))
    if c != 0x09
}


def escape_controls(text: str) -> str:
    return text.translate(_CONTROLS)


class LineCutter:
    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self.max_line = max_line
        self._kept = bytearray()
        self._cut = 0

    def feed(self, chunk: bytes) -> Iterator[str]:
        """The complete lines `chunk` ends (the rest waits for its newline)."""
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            self._keep(chunk[start : len(chunk) if end < 0 else end])
            if end < 0:
                return
            yield self._line()
            start = end + 1

    def flush(self) -> Iterator[str]:
        """The last line, when the output ended without a newline."""
        if self._kept or self._cut:
            yield self._line()

    def _keep(self, piece: bytes) -> None:
        room = self.max_line - len(self._kept)
        self._kept += piece[:room]
        self._cut += max(0, len(piece) - room)

    def _line(self) -> str:
        text = escape_controls(self._kept.decode("utf-8", "replace").rstrip("\r"))
        if self._cut:
            text += f"…[cut {self._cut} bytes]"
        self._kept = bytearray()
        self._cut = 0
        return text


class RecentOutput:
    """The last lines of output: at most `lines` of them and `size` bytes in all."""

    def __init__(self, lines: int = LOG_LINES, size: int = LOG_BYTES) -> None:
        self.size = size
        self._lines: collections.deque[str] = collections.deque(maxlen=lines)
        self._bytes = 0

    def append(self, line: str) -> None:
        if len(self._lines) == self._lines.maxlen:
            self._bytes -= _size(self._lines[0])
        self._lines.append(line)
        self._bytes += _size(line)
        while self._bytes > self.size and len(self._lines) > 1:
            self._bytes -= _size(self._lines.popleft())

    def __len__(self) -> int:
        return len(self._lines)

    def __iter__(self) -> Iterator[str]:
        return iter(self._lines)

    def text(self) -> str:
        return "\n".join(self._lines) + "\n" if self._lines else ""


def _size(line: str) -> int:
    return len(line.encode("utf-8", "replace")) + 1


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """The gateway's log file, and every file it rotates into, readable by its owner only: it
    holds functions' output and callers' refused requests."""

    def _open(self):  # type: ignore[no-untyped-def]
        return open(
            self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors, opener=private_opener
        )

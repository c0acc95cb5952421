"""Client side of the framed embedded hop (see openfx/framing.py): one persistent,
multiplexed Unix-socket connection per replica, replies matched to callers by id.

A caller that gives up at its timeout leaves the call running in the watcher: the client keeps
when each unanswered call started (`started`, oldest first) until its reply arrives, however
late, so the replica can be recycled when one runs past the function's timeout. A reply frame
over the message limit is read through and dropped, never buffered: its caller gets
RESOURCE_EXHAUSTED. When the connection ends, callers get `lost_error()`'s error (the replica
says why: recycled, over its memory limit) or UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable

import grpc

from openfx import framing
from openfx.errors import CODE_BY_VALUE, InvokeError
from openfx.pb import fxwatcher_pb2 as wpb

SLACK = 4096  # a Reply with a content type is a few bytes over its output
_CHUNK = 1 << 20


class FramedClient:
    def __init__(
        self,
        path: str,
        what: str,
        max_message_bytes: int = 64 << 20,
        lost_error: Callable[[], InvokeError | None] | None = None,
    ) -> None:
        self.path = path
        self.what = what  # e.g. "echo[0]", for error messages
        self.max_message_bytes = max_message_bytes
        self.lost_error = lost_error
        self.started: dict[int, float] = {}  # request id -> monotonic start, until answered
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self.closed = True

    async def connect(self) -> None:
        reader, writer = await asyncio.open_unix_connection(self.path, limit=1 << 20)
        self._writer = writer
        self.closed = False
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop(reader))

    async def call(self, payload: bytes, timeout: float) -> wpb.Reply:
        writer = self._writer
        if self.closed or writer is None:
            raise InvokeError(grpc.StatusCode.UNAVAILABLE, f"{self.what} is not connected")
        loop = asyncio.get_running_loop()
        request_id = next(self._ids) & 0xFFFFFFFF
        future: asyncio.Future[tuple[int, bytes]] = loop.create_future()
        self._pending[request_id] = future
        self.started[request_id] = time.monotonic()
        timer = loop.call_later(timeout, _expire, future)
        try:
            writer.write(framing.frame(request_id, framing.CALL, payload))
            if writer.transport.get_write_buffer_size() > 1 << 20:
                await writer.drain()
            status, data = await future
        finally:
            timer.cancel()
            self._pending.pop(request_id, None)
        if status == 0:
            return wpb.Reply(Output=data)
        if status == framing.OK_REPLY:
            return wpb.Reply.FromString(data)
        raise InvokeError(CODE_BY_VALUE.get(status, grpc.StatusCode.UNKNOWN), data.decode("utf-8", "replace"))

    def overdue(self, timeout: float, now: float) -> tuple[int, float]:
        """(how many unanswered calls started more than `timeout` ago, the oldest one's age)."""
        count, oldest = 0, 0.0
        for started in self.started.values():  # oldest first: ids only grow
            age = now - started
            if age <= timeout:
                break
            count += 1
            oldest = max(oldest, age)
        return count, oldest

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        header = framing.HEADER
        limit = self.max_message_bytes + SLACK
        try:
            while True:
                length, request_id, status = header.unpack(await reader.readexactly(header.size))
                self.started.pop(request_id, None)
                if length > limit:
                    await _skip(reader, length)
                    status = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
                    data = f"result of {length} bytes is over the message limit of {self.max_message_bytes}"
                    data = data.encode()
                else:
                    data = await reader.readexactly(length) if length else b""
                future = self._pending.get(request_id)
                if future is not None and not future.done():
                    future.set_result((status, data))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.closed = True
            self.fail_pending()

    def fail_pending(self, error: InvokeError | None = None) -> None:
        """End every waiting call with `error` (default: why the connection was lost)."""
        if error is None and self.lost_error is not None:
            error = self.lost_error()
        if error is None:
            error = InvokeError(grpc.StatusCode.UNAVAILABLE, f"{self.what} exited during the call")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)

    async def close(self) -> None:
        self.closed = True
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task


async def _skip(reader: asyncio.StreamReader, length: int) -> None:
    while length > 0:
        length -= len(await reader.readexactly(min(length, _CHUNK)))


def _expire(future: asyncio.Future[tuple[int, bytes]]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())

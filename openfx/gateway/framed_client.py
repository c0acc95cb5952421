"""Client side of the framed embedded hop (see openfx/framing.py): one persistent,
multiplexed Unix-socket connection per replica, replies matched to callers by id."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import grpc

from openfx import framing
from openfx.errors import CODE_BY_VALUE, InvokeError
from openfx.pb import fxwatcher_pb2 as wpb


class FramedClient:
    def __init__(self, path: str, what: str) -> None:
        self.path = path
        self.what = what  # e.g. "echo[0]", for error messages
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

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        header = framing.HEADER
        try:
            while True:
                length, request_id, status = header.unpack(await reader.readexactly(header.size))
                data = await reader.readexactly(length) if length else b""
                future = self._pending.get(request_id)
                if future is not None and not future.done():
                    future.set_result((status, data))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.closed = True
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


def _expire(future: asyncio.Future[tuple[int, bytes]]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())

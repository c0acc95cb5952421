"""paho-mqtt driven by an asyncio loop instead of its own network thread.

paho's threaded loop hands every message from its thread to ours and every reply back, and the
two fight over the GIL: measured, a third of the bridge's CPU per message. paho also documents an
external-loop mode (`loop_read` / `loop_write` / `loop_misc` and the socket callbacks): here the
loop watches the socket, so receiving, invoking and publishing all run on one thread, with every
MQTT 5 feature the bridge relies on (manual acks, response topics, correlation data, user
properties, persistent sessions) unchanged. In this mode paho does not reconnect by itself: the
`connect` coroutine below does, with capped backoff, and `on_disconnect` restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from typing import Any

import paho.mqtt.client as mqtt

log = logging.getLogger("openfx.bridge")
KEEPALIVE_TICK = 1.0  # loop_misc: PINGREQ when due, and drop a connection whose PINGRESP is late


class BufferedClient(mqtt.Client):
    """paho reads a packet's fixed header a byte at a time (three or four `recv` calls per
    message) and writes each packet with its own `send`; this client reads what the socket has
    into a buffer and serves paho from it, and sends what one `loop_write` produced at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._inbox = bytearray()
        self._outbox = bytearray()

    def _sock_send(self, buf: bytes | bytearray) -> int:
        if self._sock is None:
            raise ConnectionError("not connected")
        self._outbox += buf  # sent by loop_write below, with the rest of this turn's packets
        self._call_socket_register_write()
        return len(buf)

    def want_write(self) -> bool:
        return bool(self._outbox) or super().want_write()

    def loop_write(self) -> mqtt.MQTTErrorCode:
        rc = super().loop_write()
        outbox, sock = self._outbox, self._sock
        if outbox and sock is not None:
            try:
                del outbox[: super()._sock_send(outbox)]
            except BlockingIOError:
                pass  # the socket is full: the writer stays registered and we come back
            except OSError:
                pass  # the connection is gone: the next read says so and paho reconnects
            if not self.want_write():
                self._call_socket_unregister_write()
        return rc

    def _sock_recv(self, bufsize: int) -> bytes:
        inbox = self._inbox
        if not inbox:
            data = super()._sock_recv(65536)  # BlockingIOError when empty: paho's "try later"
            if len(data) <= bufsize or not data:
                return data
            inbox += data
        chunk = bytes(inbox[:bufsize])
        del inbox[:bufsize]
        return chunk

    def buffered(self) -> bool:
        """Bytes already read but not handled: the socket will not wake the loop for them."""
        if self._inbox:
            return True
        sock = self._sock
        return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0

    def _sock_close(self) -> None:
        self._inbox.clear()  # a new connection never continues the old one's bytes
        self._outbox.clear()  # (paho resends unacknowledged QoS 1 publishes itself)
        super()._sock_close()


class AsyncioMqtt:
    """Attach a paho client to the running loop; `connect()` (re)connects until `stop()`."""

    def __init__(self, client: BufferedClient, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.loop = loop
        self.thread = threading.get_ident()
        self.stopping = False
        self.connected = asyncio.Event()
        self._connecting: asyncio.Task[None] | None = None
        self._misc = loop.create_task(self._tick())
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write

    def _in_loop(self, fn: Any, *args: Any) -> None:
        """paho calls the socket callbacks from `reconnect`, which runs in a worker thread; the
        loop gets file descriptors taken at the call (the socket may be closed when it runs)."""
        if threading.get_ident() == self.thread:
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # paho never does: 40 ms stalls
        except (OSError, AttributeError):
            pass
        self._in_loop(self.loop.add_reader, sock.fileno(), self._read)

    def _on_socket_close(self, client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
        self._in_loop(self._forget, sock.fileno())

    def _forget(self, fd: int) -> None:
        self.loop.remove_reader(fd)
        self.loop.remove_writer(fd)

    def _on_register_write(self, client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
        self._in_loop(self.loop.add_writer, sock.fileno(), client.loop_write)

    def _on_unregister_write(self, client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
        self._in_loop(self.loop.remove_writer, sock.fileno())

    def _read(self) -> None:
        client = self.client
        while client.loop_read() == mqtt.MQTT_ERR_SUCCESS and client.buffered():
            pass

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(KEEPALIVE_TICK)
            self.client.loop_misc()

    def reconnect_soon(self) -> None:
        """After a lost connection: reconnect in the background (once at a time)."""
        if not self.stopping and (self._connecting is None or self._connecting.done()):
            self._connecting = self.loop.create_task(self.connect())

    async def connect(self, first: bool = False, min_delay: float = 0.1, max_delay: float = 2.0) -> None:
        """Connect (the first time, with `connect_async`'s stored settings) and retry until it works."""
        delay = min_delay
        while not self.stopping:
            try:
                await asyncio.to_thread(self.client.reconnect)  # DNS, TCP and TLS would block the loop
                return
            except (OSError, ssl.SSLError) as exc:  # refused, unreachable, TLS failed
                if first:
                    log.warning("cannot reach the broker (%s); retrying", exc)
                    first = False
            await asyncio.sleep(delay)
            delay = min(max_delay, delay * 2)

    async def close(self) -> None:
        self.stopping = True
        if self._connecting is not None:
            self._connecting.cancel()
        self.client.disconnect()
        self._misc.cancel()

"""paho-mqtt driven by an asyncio loop instead of its own network thread.

paho's threaded loop hands every message from its thread to ours and every reply back, and the
two fight over the GIL: measured, a third of the bridge's CPU per message. paho also documents an
external-loop mode (`loop_read` / `loop_write` / `loop_misc` and the socket callbacks): here the
loop watches the socket, so receiving, invoking and publishing all run on one thread, with every
MQTT 5 feature the bridge relies on (manual acks, response topics, correlation data, user
properties, persistent sessions) unchanged. In this mode paho does not reconnect by itself: one
supervising task does, with capped backoff, and names each cause of being kept out (a refused
login, an untrusted certificate, a broker that is down) once, not once per attempt.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt

log = logging.getLogger("openfx.bridge")
KEEPALIVE_TICK = 1.0  # loop_misc: PINGREQ when due, and drop a connection whose PINGRESP is late
BACKOFF = (0.1, 2.0)  # first and longest wait between attempts
STABLE = 10.0  # a connection that lasted this long resets the backoff (else two bridges with one
# client id, each taking over the other's session, would reconnect in a tight loop)


class BufferedClient(mqtt.Client):
    """paho reads a packet's fixed header a byte at a time (three or four `recv` calls per
    message) and writes each packet with its own `send`; this client reads what the socket has
    into a buffer and serves paho from it, and sends what one `loop_write` produced at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._inbox = bytearray()
        self._outbox = bytearray()
        self._premade: Any = None

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
        outbox, sock = self._outbox, self._sock
        if outbox and sock is not None:  # paho closes right after queueing DISCONNECT: send it
            try:
                super()._sock_send(outbox)  # best effort, never blocks: the socket is non-blocking
            except (OSError, ValueError):
                pass
        self._inbox.clear()  # a new connection never continues the old one's bytes
        outbox.clear()  # (paho resends unacknowledged QoS 1 publishes itself)
        super()._sock_close()

    def open_socket(self) -> Any:
        """The blocking part of connecting (DNS, TCP, TLS handshake), for a worker thread."""
        return super()._create_socket()

    def reconnect_on(self, sock: Any) -> None:
        """paho's reconnect (state reset, CONNECT queued) on a socket `open_socket` made: all of it
        on the loop's thread, so nothing else touches paho's state at the same time."""
        self._premade = sock
        try:
            self.reconnect()
        finally:
            self._premade = None

    def _create_socket(self) -> Any:
        return self._premade if self._premade is not None else super()._create_socket()


class AsyncioMqtt:
    """Attach a paho client to the running loop and keep it connected from `start()` to `close()`.

    The owner reports what paho tells it: `accepted()` on a CONNACK that lets us in, `lost()` on
    every disconnect, `problem(text)` for a refusal."""

    def __init__(self, client: BufferedClient, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.loop = loop
        self.thread = threading.get_ident()
        self.stopping = False
        self.connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._since: float | None = None  # when the broker last let us in (None: not in now)
        self._said: set[str] = set()  # causes logged since we were last in
        self._supervisor: asyncio.Task[None] | None = None
        self._misc = loop.create_task(self._tick())
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        # paho says why a socket failed (a TLS alert after the handshake, say) only in its log
        client.enable_logger(_PahoErrors(self.problem))

    # -- connection state, reported by the owner's paho callbacks --------------------------------

    def start(self) -> None:
        """Connect with `connect_async`'s stored settings, in the background, and stay connected."""
        self._lost.set()
        self._supervisor = self.loop.create_task(self._keep_connected())

    def accepted(self) -> None:
        self._since = time.monotonic()
        self._said.clear()
        self.connected.set()

    def lost(self) -> bool:
        """Mark the connection lost; True when it had been accepted (a real disconnect)."""
        was = self.connected.is_set()
        self.connected.clear()
        self._lost.set()
        return was

    def problem(self, cause: str) -> None:
        """Log why we are kept out, once per cause (attempts repeat every few seconds)."""
        if cause not in self._said and not self.stopping:
            if len(self._said) > 100:
                self._said.clear()
            self._said.add(cause)
            log.warning("%s; retrying", cause)

    async def _keep_connected(self) -> None:
        delay, first = BACKOFF[0], True
        while not self.stopping:
            await self._lost.wait()
            if self.stopping:
                return
            self._lost.clear()
            if first or (self._since is not None and time.monotonic() - self._since > STABLE):
                delay, first = BACKOFF[0], False  # the first attempt, or a long-lived connection ended
            else:
                await asyncio.sleep(delay)
                delay = min(BACKOFF[1], delay * 2)
            self._since = None  # until the broker accepts (CONNACK), this is not a connection yet
            try:
                sock = await asyncio.to_thread(self.client.open_socket)  # would block the loop
                if self.stopping:
                    sock.close()
                    return
                self.client.reconnect_on(sock)
            except Exception as exc:  # refused, unreachable, certificate not trusted, a bad host name
                self.problem(f"cannot reach the broker at {self.client.host}:{self.client.port}: {exc}")
                self._lost.set()

    # -- the socket, watched by the loop ------------------------------------------------------

    def _in_loop(self, fn: Any, *args: Any) -> None:
        """Socket callbacks from any other thread go through the loop (paho's own calls all come
        from the loop's thread: `reconnect_on` runs there); file descriptors are taken at the call."""
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

    async def close(self) -> None:
        self.stopping = True
        self._lost.set()
        if self._supervisor is not None:
            self._supervisor.cancel()
        self.client.disconnect()
        self._misc.cancel()


class _PahoErrors(logging.Logger):
    """paho's logger: errors go to `problem` (named once per cause); nothing else is formatted."""

    def __init__(self, problem: Any) -> None:
        super().__init__("openfx.bridge.paho", logging.ERROR)
        self._problem = problem

    def handle(self, record: logging.LogRecord) -> None:
        self._problem(f"connection to the broker failed: {record.getMessage()}")

"""The bridge: MQTT 5 messages in, gateway calls, replies out, at least once.

Delivery rules (each prevents a failure measured against mosquitto; tests/test_bridge*.py replay them):
- subscribe at QoS 1 with manual acknowledgement; a message is PUBACKed only after the
  invoke succeeded (or was refused) AND its reply / dead-letter publishes were PUBACKed,
  so a bridge killed at any moment leaves the message with the broker, which redelivers it;
- a persistent session (clean_start false, session expiry, stable client id) keeps
  messages while the bridge is away; acks never cross a reconnect (a new connection's
  mids are different messages);
- UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED are retried with capped backoff
  within a time budget, then dead-lettered; NOT_FOUND, INVALID_ARGUMENT and other
  refusals are dead-lettered at once; every outcome is answered to the device;
- Receive Maximum = max_inflight bounds the work the broker hands us (back-pressure,
  no unbounded queue); TCP_NODELAY avoids Nagle's 40 ms stalls.

Everything runs on one asyncio loop (mqtt_loop.py drives paho from it; gateway_client.py calls
the gateway): no thread hands a message to another, and nothing needs a lock.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import struct
import time
from dataclasses import dataclass, field
from typing import ClassVar

import grpc
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers
from paho.mqtt.subscribeoptions import SubscribeOptions
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from openfx import readiness
from openfx.bridge import gateway_client
from openfx.bridge.config import BridgeConfig, valid_function_name
from openfx.bridge.mqtt_loop import AsyncioMqtt, BufferedClient
from openfx.triggers.base import TriggerMetrics

log = logging.getLogger("openfx.bridge")
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@dataclass
class Job:
    topic: str
    payload: bytes
    qos: int
    mid: int
    generation: int
    function: str | None
    response_topic: str | None
    correlation: bytes | None
    started: float = field(default_factory=time.monotonic)
    attempts: int = 0
    publishes_left: int = 0


class ReplyProperties:
    """A reply's MQTT 5 properties (user property `status`, correlation data), packed as the spec
    lays them out. paho's Properties.pack walks all 27 property names on every message (a tenth of
    the bridge's CPU); paho only ever calls `pack` on what it is given to publish."""

    _STATUS: ClassVar[dict[str, bytes]] = {}
    CORRELATION_DATA, USER_PROPERTY = 0x09, 0x26

    def __init__(self, status: str, correlation: bytes | None) -> None:
        self.status, self.correlation = status, correlation

    def pack(self) -> bytes:
        body = self._STATUS.get(self.status)
        if body is None:
            body = self._STATUS[self.status] = (
                bytes([self.USER_PROPERTY]) + _utf8(b"status") + _utf8(self.status.encode())
            )
        if self.correlation is not None:  # in paho's order: the same bytes as Properties.pack
            body = bytes([self.CORRELATION_DATA]) + _utf8(self.correlation) + body
        return VariableByteIntegers.encode(len(body)) + body

    def __repr__(self) -> str:
        return f"[UserProperty: [('status', {self.status!r})], CorrelationData: {self.correlation!r}]"


def publishable(topic: str | None) -> bool:
    """A topic name a PUBLISH may carry: no wildcards, no NUL, at most 65,535 bytes (MQTT 5, 4.7)."""
    if not topic:
        return False
    return "+" not in topic and "#" not in topic and "\x00" not in topic and len(topic.encode()) <= 65535


def _utf8(data: bytes) -> bytes:
    """A length-prefixed string or binary field (two bytes of length, then the bytes)."""
    return struct.pack("!H", len(data)) + data


class BridgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("bridge_messages_received_total", "MQTT requests received", registry=r)
        self.invoked = Counter("bridge_invocations_total", "Gateway calls by status", ["code"], registry=r)
        self.replied = Counter("bridge_replies_total", "Replies published and acknowledged", registry=r)
        self.retried = Counter("bridge_retries_total", "Invocations retried", registry=r)
        self.dead = Counter("bridge_dead_letters_total", "Requests sent to the dead-letter topic", registry=r)
        # read when scraped (the bridge sets a function), never written per message
        self.inflight = Gauge("bridge_inflight", "Requests received and not yet acknowledged", registry=r)
        self.trigger = TriggerMetrics(r)  # trigger_invocations_total{trigger="mqtt",...}


class Bridge:
    """Built and run on one event loop: `await start()`, then `await stop()`."""

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        # devices publish to the same topics again and again: match the route filters once per topic
        self._function_for = functools.lru_cache(maxsize=4096)(config.function_for)
        self.metrics = BridgeMetrics()
        self.generation = 0
        self._publishes: dict[int, Job] = {}
        self._inflight = 0
        self.metrics.inflight.set_function(lambda: self._inflight)
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        self.gateway = gateway_client.connect(config)
        self.client = self._make_client()
        self.mqtt = AsyncioMqtt(self.client, asyncio.get_running_loop())

    # -- MQTT ----------------------------------------------------------------

    def _make_client(self) -> BufferedClient:
        c = self.config
        client = BufferedClient(
            mqtt.CallbackAPIVersion.VERSION2, client_id=c.client_id, protocol=mqtt.MQTTv5, manual_ack=True
        )
        if c.username:
            client.username_pw_set(c.username, c.password)
        if c.tls is not None:
            client.tls_set(
                ca_certs=c.tls.ca_certs,
                certfile=c.tls.certfile,
                keyfile=c.tls.keyfile,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        client.max_inflight_messages_set(max(20, c.max_inflight))
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        return client

    async def start(self) -> None:
        """Connect in the background (a broker that is not up yet is retried); returns at once."""
        c = self.config
        if c.metrics_address:
            host, _, port = c.metrics_address.rpartition(":")
            start_http_server(int(port), addr=host, registry=self.metrics.registry)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = c.session_expiry
        props.ReceiveMaximum = c.max_inflight
        self.client.connect_async(c.host, c.port, keepalive=30, clean_start=False, properties=props)
        self.mqtt.start()

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object
    ) -> None:
        if getattr(reason, "is_failure", False):
            self.mqtt.problem(f"the broker refused the connection: {reason}")  # it closes it next
            return
        self.generation += 1
        options = SubscribeOptions(qos=1, noLocal=True)
        client.subscribe([(route.filter, options) for route in self.config.routes])
        self.mqtt.accepted()
        log.info(
            "connected to %s:%d as %s (session present: %s); routes: %s; gateway: %s",
            self.config.host,
            self.config.port,
            self.config.client_id,
            getattr(flags, "session_present", "?"),
            ", ".join(f"{r.filter} -> {r.function}" for r in self.config.routes),
            self.config.gateway_target(),
        )

    def _on_subscribe(
        self, client: mqtt.Client, userdata: object, mid: int, reasons: list, props: object
    ) -> None:
        failed = [str(r) for r in reasons if getattr(r, "is_failure", False)]
        if failed:
            log.error("subscription refused: %s", ", ".join(failed))
        else:
            log.info("subscribed to %d topic filter(s); ready", len(reasons))
            if self.config.ready_file:
                readiness.mark_ready(self.config.ready_file, f"subscribed to {len(reasons)} topic filter(s)")

    def _on_disconnect(
        self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object
    ) -> None:
        if self.mqtt.lost() and not self.stopping:  # (a refused attempt said why already)
            log.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if self.stopping:
            return  # not taken, not acknowledged: the broker keeps it for the next bridge
        config = self.config
        if config.is_own_output(msg.topic):
            self._ack(msg.mid, msg.qos, self.generation)
            return
        self.metrics.received.inc()
        props = getattr(msg, "properties", None)
        job = Job(
            topic=msg.topic,
            payload=msg.payload,
            qos=msg.qos,
            mid=msg.mid,
            generation=self.generation,
            function=self._function_for(msg.topic),
            response_topic=getattr(props, "ResponseTopic", None),
            correlation=getattr(props, "CorrelationData", None),
        )
        self._inflight += 1
        self._idle.clear()
        if config.ack == "on-receipt":
            self._ack(job.mid, job.qos, job.generation)
        task = asyncio.get_running_loop().create_task(self._invoke(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- invoking ------------------------------------------------------------

    async def _invoke(self, job: Job) -> None:
        if not job.function or not valid_function_name(job.function):
            # answered like every refusal: "<CODE>: <message>" (README, MQTT)
            self._finish(
                job, grpc.StatusCode.NOT_FOUND, f"NOT_FOUND: no function for topic {job.topic!r}".encode()
            )
            return
        retry = self.config.retry
        while True:
            job.attempts += 1
            try:
                code, output = await self.gateway.invoke(job.function, job.payload, job.topic)
            except Exception as exc:  # a bug of ours must still answer the device, never strand it
                log.exception("calling %s for %s failed", job.function, job.topic)
                code, output = grpc.StatusCode.INTERNAL, f"INTERNAL: bridge: {exc!r}".encode()
            self.metrics.invoked.labels(code.name).inc()
            self.metrics.trigger.count("mqtt", job.function, code)
            if code not in RETRYABLE:
                break
            delay = min(retry.max_delay, retry.first_delay * 2 ** (job.attempts - 1))
            if time.monotonic() + delay - job.started >= retry.budget_seconds:
                break
            self.metrics.retried.inc()
            await self._backoff(delay)
        self._finish(job, code, output)

    async def _backoff(self, delay: float) -> None:
        await asyncio.sleep(delay)

    def _finish(self, job: Job, code: grpc.StatusCode, output: bytes) -> None:
        """Answer the device (and dead-letter a refusal), then ack once every publish is settled:
        acknowledged by the broker, or impossible (a topic MQTT does not allow), never pending."""
        status = code.name
        reply_props = ReplyProperties(status, job.correlation)
        default_reply = self.config.reply_topic(job.topic, job.function or "")
        reply_topic = job.response_topic if publishable(job.response_topic) else default_reply
        publishes: list[tuple[str, bytes, object]] = [(reply_topic, output, reply_props)]
        if code != grpc.StatusCode.OK:
            dead_props = Properties(PacketTypes.PUBLISH)
            dead_props.UserProperty = [
                ("status", status),
                ("function", job.function or ""),
                ("error", output.decode("utf-8", "replace")[:512]),
            ]
            if job.correlation is not None:
                dead_props.CorrelationData = job.correlation
            publishes.append((f"{self.config.dead_letter_prefix}{job.topic}", job.payload, dead_props))
            self.metrics.dead.inc()
        job.publishes_left = len(publishes)
        for topic, payload, props in publishes:
            mid = self._publish(topic, payload, props)
            if mid is None:
                job.publishes_left -= 1  # nothing will ever acknowledge it
            else:
                self._publishes[mid] = job  # PUBACKs are read on this loop, never before this line
        if job.publishes_left == 0:
            self._done(job)

    def _publish(self, topic: str, payload: bytes, props: object) -> int | None:
        """The publish's mid, or None when it cannot be sent at all (said in the log)."""
        try:
            info = self.client.publish(topic, payload, qos=1, properties=props)  # type: ignore[arg-type]
        except ValueError as exc:  # wildcards in a device's response topic, over 65,535 bytes
            log.warning("cannot publish to %r: %s", topic[:200], exc)
            return None
        if info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: sent on reconnect
            return info.mid
        log.error("cannot publish to %r: %s", topic[:200], mqtt.error_string(info.rc))
        return None

    def _on_publish(
        self, client: mqtt.Client, userdata: object, mid: int, reason: object, props: object
    ) -> None:
        job = self._publishes.pop(mid, None)
        if job is None:  # a mid from before a reconnect, already settled
            return
        if getattr(reason, "is_failure", False):  # e.g. not authorised to publish to that topic
            log.warning("the broker refused the answer to %r: %s", job.topic[:200], reason)
        job.publishes_left -= 1
        if job.publishes_left == 0:
            self._done(job)

    def _done(self, job: Job) -> None:
        self.metrics.replied.inc()
        if self.config.ack == "after-reply":
            self._ack(job.mid, job.qos, job.generation)
        self._inflight -= 1
        if not self._inflight:
            self._idle.set()

    def _ack(self, mid: int, qos: int, generation: int) -> None:
        if qos and generation == self.generation:  # an older connection's mid is another message
            self.client.ack(mid, qos)

    # -- stopping ------------------------------------------------------------

    async def stop(self, grace: float = 10.0) -> None:
        """Finish what is in flight (bounded), then disconnect; unacked messages stay with the broker."""
        self.stopping = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            log.warning("stopping with %d request(s) unanswered (the broker redelivers them)", self._inflight)
        await self.mqtt.close()
        for task in list(self._tasks):
            task.cancel()
        await self.gateway.close()

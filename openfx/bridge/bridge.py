"""The bridge: MQTT 5 messages in, gateway `Invoke` calls, replies out, at least once.

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

Calls are asynchronous end to end (gRPC futures, publish callbacks): no thread waits.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from openfx import readiness
from openfx.bridge.config import BridgeConfig, valid_function_name
from openfx.client_channel import gateway_channel
from openfx.pb import fxgateway_pb2 as gpb
from openfx.pb import fxgateway_pb2_grpc as gpb_grpc
from openfx.triggers.base import TOPIC_KEY, TRIGGER_KEY, TriggerMetrics

log = logging.getLogger("openfx.bridge")
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class Scheduler:
    """One thread running delayed callbacks (retries) in time order."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._stopped = False
        threading.Thread(target=self._run, name="bridge-retries", daemon=True).start()

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), fn))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cond.wait(None if not self._heap else max(0.0, self._heap[0][0] - time.monotonic()))
                if self._stopped:
                    return
                _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:
                log.exception("retry callback failed")

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()


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


class BridgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("bridge_messages_received_total", "MQTT requests received", registry=r)
        self.invoked = Counter("bridge_invocations_total", "Gateway calls by status", ["code"], registry=r)
        self.replied = Counter("bridge_replies_total", "Replies published and acknowledged", registry=r)
        self.retried = Counter("bridge_retries_total", "Invocations retried", registry=r)
        self.dead = Counter("bridge_dead_letters_total", "Requests sent to the dead-letter topic", registry=r)
        self.inflight = Gauge("bridge_inflight", "Requests received and not yet acknowledged", registry=r)
        self.trigger = TriggerMetrics(r)  # trigger_invocations_total{trigger="mqtt",...}


class Bridge:
    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        # devices publish to the same topics again and again: match the route filters once per topic
        self._function_for = functools.lru_cache(maxsize=4096)(config.function_for)
        self.metrics = BridgeMetrics()
        self.scheduler = Scheduler()
        self.generation = 0
        self.connected = threading.Event()
        self._lock = threading.Lock()
        self._publishes: dict[int, Job] = {}
        self._early_acks: set[int] = set()
        self._inflight = 0
        self._idle = threading.Condition(self._lock)
        self.stopping = False
        self.channel = gateway_channel(
            config.gateway,
            config.token,
            config.gateway_tls_ca,
            options=[
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )
        self.stub = gpb_grpc.FxGatewayStub(self.channel)
        self.client = self._make_client()

    # -- MQTT ----------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        c = self.config
        client = mqtt.Client(
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
        client.reconnect_delay_set(min_delay=0.1, max_delay=2)
        client.max_inflight_messages_set(max(20, c.max_inflight))
        client.max_queued_messages_set(0)
        client.on_socket_open = self._on_socket_open
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        return client

    def start(self) -> None:
        c = self.config
        if c.metrics_address:
            host, _, port = c.metrics_address.rpartition(":")
            start_http_server(int(port), addr=host, registry=self.metrics.registry)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = c.session_expiry
        props.ReceiveMaximum = c.max_inflight
        self.client.connect_async(c.host, c.port, keepalive=30, clean_start=False, properties=props)
        self.client.loop_start()

    @staticmethod
    def _on_socket_open(client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # paho never does: 40 ms stalls
        except (OSError, AttributeError):
            pass

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object
    ) -> None:
        if getattr(reason, "is_failure", False):
            log.error("broker refused the connection: %s", reason)
            return
        with self._lock:
            self.generation += 1
        options = SubscribeOptions(qos=1, noLocal=True)
        client.subscribe([(route.filter, options) for route in self.config.routes])
        self.connected.set()
        log.info(
            "connected to %s:%d as %s (session present: %s); routes: %s",
            self.config.host,
            self.config.port,
            self.config.client_id,
            getattr(flags, "session_present", "?"),
            ", ".join(f"{r.filter} -> {r.function}" for r in self.config.routes),
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
        self.connected.clear()
        if not self.stopping:
            log.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
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
        with self._lock:
            self._inflight += 1
            self.metrics.inflight.set(self._inflight)
        if config.ack == "on-receipt":
            self._ack(job.mid, job.qos, job.generation)
        self._invoke(job)

    # -- invoking ------------------------------------------------------------

    def _invoke(self, job: Job) -> None:
        if not job.function or not valid_function_name(job.function):
            # answered like every refusal: "<CODE>: <message>" (README, MQTT)
            self._finish(
                job, grpc.StatusCode.NOT_FOUND, f"NOT_FOUND: no function for topic {job.topic!r}".encode()
            )
            return
        job.attempts += 1
        metadata = ((TRIGGER_KEY, "mqtt"), (TOPIC_KEY, job.topic))
        future = self.stub.Invoke.future(
            gpb.InvokeServiceRequest(Service=job.function, Input=job.payload),
            timeout=self.config.invoke_timeout,
            metadata=metadata,
        )
        future.add_done_callback(lambda f: self._invoked(job, f))

    def _invoked(self, job: Job, future: grpc.Future) -> None:
        try:
            output, code = future.result().Msg, grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            output = f"{code.name}: {exc.details()}".encode()
        self.metrics.invoked.labels(code.name).inc()
        self.metrics.trigger.count("mqtt", job.function or "", code)
        if code in RETRYABLE:
            retry = self.config.retry
            delay = min(retry.max_delay, retry.first_delay * 2 ** (job.attempts - 1))
            if time.monotonic() + delay - job.started < retry.budget_seconds:
                self.metrics.retried.inc()
                self.scheduler.call_later(delay, lambda: self._invoke(job))
                return
        self._finish(job, code, output)

    def _finish(self, job: Job, code: grpc.StatusCode, output: bytes) -> None:
        """Answer the device (and dead-letter a refusal), then ack once every publish is acknowledged."""
        status = code.name
        reply_props = Properties(PacketTypes.PUBLISH)
        reply_props.UserProperty = [("status", status)]
        if job.correlation is not None:
            reply_props.CorrelationData = job.correlation
        reply_topic = job.response_topic or self.config.reply_topic(job.topic, job.function or "")
        publishes: list[tuple[str, bytes, Properties]] = [(reply_topic, output, reply_props)]
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
        # publish outside our lock: paho calls _on_publish holding its own lock (no lock-order inversion)
        mids = []
        for topic, payload, props in publishes:
            info = self.client.publish(topic, payload, qos=1, properties=props)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                log.error("publish to %s failed: %s", topic, mqtt.error_string(info.rc))
            mids.append(info.mid)
        with self._lock:
            job.publishes_left = len(mids)
            for mid in mids:
                if mid in self._early_acks:  # PUBACK arrived before we got here
                    self._early_acks.discard(mid)
                    job.publishes_left -= 1
                else:
                    self._publishes[mid] = job
            done = job.publishes_left == 0
        if done:
            self._done(job)

    def _on_publish(
        self, client: mqtt.Client, userdata: object, mid: int, reason: object, props: object
    ) -> None:
        with self._lock:
            job = self._publishes.pop(mid, None)
            if job is None:
                if len(self._early_acks) > 100_000:  # stale mids (e.g. from before a reconnect)
                    self._early_acks.clear()
                self._early_acks.add(mid)
                return
            job.publishes_left -= 1
            done = job.publishes_left == 0
        if done:
            self._done(job)

    def _done(self, job: Job) -> None:
        self.metrics.replied.inc()
        if self.config.ack == "after-reply":
            self._ack(job.mid, job.qos, job.generation)
        with self._lock:
            self._inflight -= 1
            self.metrics.inflight.set(self._inflight)
            self._idle.notify_all()

    def _ack(self, mid: int, qos: int, generation: int) -> None:
        if qos == 0:
            return
        with self._lock:
            current = generation == self.generation
        if current:  # an ack for an older connection would acknowledge a different message
            self.client.ack(mid, qos)

    # -- stopping ------------------------------------------------------------

    def stop(self, grace: float = 10.0) -> None:
        """Finish what is in flight (bounded), then disconnect; unacked messages stay with the broker."""
        self.stopping = True
        deadline = time.monotonic() + grace
        with self._lock:
            while self._inflight and time.monotonic() < deadline:
                self._idle.wait(0.1)
        self.client.disconnect()
        self.client.loop_stop()
        self.scheduler.stop()
        self.channel.close()

"""The one shape every trigger has.

A trigger is whatever calls functions besides a client's own gRPC or HTTP request: the MQTT
bridge, a cron schedule, tomorrow a Kafka consumer. Each kind is a `Trigger` subclass that the
platform builds from the stack file (`from_stack`), starts, waits for (`ready`) and stops, all
the same way, and each calls functions only through the gateway, saying who it is in the call's
metadata so the handler sees `req.info.Trigger.Name` and the gateway's limits, auth and metrics
apply as to any caller. Every kind counts `trigger_invocations_total{trigger,function_name,code}`
with the gateway's label names and codes (the HTTP status the outcome maps to).

A kind also declares what it adds around the platform, so that nothing outside this package names
it: its stack-file key and per-function config keys (pydantic models, which openfx/config.py
merges into the formats it validates), how those function keys travel in a Deploy (annotations)
and are checked when one arrives, and the /metrics endpoints of its own processes (what
Prometheus scrapes besides the gateway).
"""

from __future__ import annotations

import abc
import asyncio
import functools
import logging
import signal
import subprocess
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import grpc
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel

from openfx.config import FunctionSpec, StackFile
from openfx.errors import http_status

# gRPC metadata (or HTTP headers) a trigger sets on its call: the handler's req.info.Trigger.Name
# and .Topic; over HTTP, the deadline in seconds (gRPC carries its own) and, on every refusal, the
# gRPC status name the HTTP status was mapped from (several codes share one HTTP status)
TRIGGER_KEY = "x-openfx-trigger"
TOPIC_KEY = "x-openfx-topic"
TIMEOUT_KEY = "x-openfx-timeout"
STATUS_KEY = "x-openfx-status"
MAX_TOPIC = 1024


@functools.lru_cache(maxsize=4096)  # devices publish to the same topics again and again
def encode_topic(topic: str) -> str:
    """A topic as the TOPIC_KEY value: percent-encoded UTF-8, so any MQTT topic (non-ASCII, even
    CR/LF) fits in gRPC metadata and HTTP headers (printable ASCII only) and comes back exact."""
    return urllib.parse.quote(topic, safe="/+#$")


def decode_topic(value: str) -> str:
    return urllib.parse.unquote(value)[:MAX_TOPIC]


SUPERVISE_BACKOFF = (0.5, 10.0)

log = logging.getLogger("openfx.platform")


class TriggerMetrics:
    """`trigger_invocations_total`, labelled like `gateway_function_invocation_total`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.invocations = Counter(
            "trigger_invocations_total",
            "Function invocations made by a trigger, by the status code they ended with",
            ["trigger", "function_name", "code"],
            registry=registry,
        )

    def count(self, trigger: str, function: str, code: grpc.StatusCode) -> None:
        self.invocations.labels(trigger, function, str(http_status(code))).inc()


@dataclass
class PlatformContext:
    """What the platform hands every trigger."""

    stack: StackFile
    stack_path: Path
    state_dir: Path
    gateway: str  # the gateway's gRPC address
    token: str | None = None  # the platform's token for the gateway, if it needs one
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)  # the gateway's /metrics
    gateway_http: str = ""  # the gateway's HTTP base URL (the MQTT bridge calls its trigger route)
    invoke_token: str | None = None  # for triggers that only invoke (the bridge): no manage scope
    metrics: TriggerMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = TriggerMetrics(self.registry)


class Trigger(abc.ABC):
    """One kind of trigger. Subclasses set `kind` and implement the four methods; the class
    attributes and class methods after them are optional (a kind without keys leaves them be)."""

    kind: ClassVar[str]
    # `<stack_key>: {...}` in the stack file, validated by stack_model (openfx.yaml's `mqtt:`)
    stack_key: ClassVar[str | None] = None
    stack_model: ClassVar[type[BaseModel] | None] = None
    # keys of a function's config (`schedule:`): a model (derive from openfx.config.Strict) whose
    # fields FunctionSpec gains; the spec load_stack returns is an instance of it
    function_keys: ClassVar[type[BaseModel] | None] = None

    def __init__(self) -> None:
        self.ready = asyncio.Event()  # set once the trigger delivers events (subscribed, scheduled)

    @classmethod
    @abc.abstractmethod
    def from_stack(cls, context: PlatformContext) -> Trigger | None:
        """The trigger the stack file asks for, or None when it uses none of this kind."""

    async def prepare(self) -> None:  # noqa: B027 (optional hook: most kinds need nothing here)
        """Before the gateway starts its functions: claim what can fail fast (a broker's port)."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin delivering; set `self.ready` when events flow. Raise TriggerError to stop the platform."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Finish what is in flight, then stop."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One phrase for the platform's ready line, e.g. 'mqtt 127.0.0.1:1883 (topic fn/<function>)'."""

    @classmethod
    def stack_spec(cls, stack: StackFile) -> Any:
        """This kind's section of the stack file (a `stack_model`), or None when it is absent."""
        return getattr(stack, cls.stack_key, None) if cls.stack_key else None

    @classmethod
    def annotations(cls, spec: FunctionSpec) -> dict[str, str]:
        """A function's keys of this kind as Deploy annotations (`openfx.<kind>...`): a Deploy
        has no fields for them, and the gateway (or this trigger, reading its function list)
        finds them there. Only called with a spec holding `function_keys`' fields."""
        return {}

    @classmethod
    def check_annotations(cls, annotations: Mapping[str, str]) -> str | None:
        """What is wrong with this kind's annotations on a Deploy (a client may send any), or None."""
        return None

    @classmethod
    def scrape_targets(cls, stack: StackFile, stack_path: Path) -> dict[str, str]:
        """Prometheus job name -> host:port of the /metrics of this kind's own processes, for the
        stack file's platform (metrics counted in the gateway need nothing: it is scraped anyway)."""
        return {}


class TriggerError(Exception):
    """A trigger cannot start (its broker is missing, its port taken): one line saying what to do."""


async def supervise(
    name: str,
    start: Callable[[], subprocess.Popen[bytes]],
    stop: asyncio.Event,
    first: subprocess.Popen[bytes] | None = None,
) -> None:
    """Keep a helper process of a trigger (a broker, a bridge) running: restart it with capped
    backoff when it dies, SIGTERM it (then kill) when `stop` is set. `first`: already started."""
    delay = SUPERVISE_BACKOFF[0]
    while not stop.is_set():
        try:
            process = first or await asyncio.to_thread(start)
            first = None
        except Exception as exc:  # e.g. the broker's port taken meanwhile
            log.warning("platform: %s failed to start: %s; retrying in %gs", name, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, SUPERVISE_BACKOFF[1])
            continue
        waiter = asyncio.create_task(asyncio.to_thread(process.wait))
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(waiter, 20)
                except TimeoutError:
                    process.kill()
            return
        stopper.cancel()
        log.warning("platform: %s exited with code %s; restarting in %gs", name, process.returncode, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, SUPERVISE_BACKOFF[1])

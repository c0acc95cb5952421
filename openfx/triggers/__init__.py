"""Triggers: what calls functions besides a client's own gRPC or HTTP request.

Every kind is one module here with one `Trigger` subclass (see base.py for the shape), listed in
`KINDS`. The platform (openfx/launcher.py) builds each from the stack file, starts it after the
gateway, waits for it to be ready, and stops it before the gateway, the same way for all kinds.
To add a kind (Kafka, a file watcher): write `openfx/triggers/<kind>.py`, add it to `KINDS`,
document its config keys in the README's "Triggers" section. Nothing else changes: the gateway
accepts every name in `KINDS` as a relayed trigger name.
"""

from __future__ import annotations

from openfx.triggers.base import (
    MAX_TOPIC,
    STATUS_KEY,
    TIMEOUT_KEY,
    TOPIC_KEY,
    TRIGGER_KEY,
    PlatformContext,
    Trigger,
    TriggerError,
    decode_topic,
    encode_topic,
)
from openfx.triggers.mqtt import MqttTrigger
from openfx.triggers.schedule import ScheduleTrigger

KINDS: dict[str, type[Trigger]] = {"mqtt": MqttTrigger, "schedule": ScheduleTrigger}

__all__ = [
    "KINDS",
    "MAX_TOPIC",
    "STATUS_KEY",
    "TIMEOUT_KEY",
    "TOPIC_KEY",
    "TRIGGER_KEY",
    "PlatformContext",
    "Trigger",
    "TriggerError",
    "decode_topic",
    "encode_topic",
]

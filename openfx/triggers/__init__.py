"""Triggers: what calls functions besides a client's own gRPC or HTTP request.

Every kind is one module here with one `Trigger` subclass (see base.py for the shape), listed in
`KINDS`. The platform (openfx/launcher.py) builds each from the stack file, starts it after the
gateway, waits for it to be ready, and stops it before the gateway, the same way for all kinds.
To add a kind (Kafka, a file watcher): write `openfx/triggers/<kind>.py`, add it to `KINDS`,
document its config keys in the README's "Triggers" section. Nothing else changes: everything
outside this package reads `KINDS` through the functions below (config keys, Deploy annotations,
Prometheus targets), and the gateway accepts every name in `KINDS` as a relayed trigger name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from openfx.config import FunctionSpec, StackFile
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


def function_annotations(spec: FunctionSpec) -> dict[str, str]:
    """Every kind's keys of one function, as its Deploy's annotations."""
    annotations: dict[str, str] = {}
    for kind in KINDS.values():
        if kind.function_keys is not None and isinstance(spec, kind.function_keys):
            annotations.update(kind.annotations(spec))
    return annotations


def annotation_problem(annotations: Mapping[str, str]) -> str | None:
    """The first kind's complaint about a Deploy's annotations, or None."""
    for kind in KINDS.values():
        if problem := kind.check_annotations(annotations):
            return problem
    return None


def scrape_targets(stack: StackFile, stack_path: Path) -> dict[str, str]:
    """Job name -> host:port of every trigger process's own /metrics that this stack runs."""
    targets: dict[str, str] = {}
    for kind in KINDS.values():
        targets.update(kind.scrape_targets(stack, stack_path))
    return targets


__all__ = [
    "KINDS",
    "annotation_problem",
    "function_annotations",
    "scrape_targets",
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

"""Bridge configuration (`broker/bridge.yaml`): broker, gateway, routes, delivery settings.

Routes map MQTT topic filters (with `+` and `#`) to functions. A route's `function` is a
literal name or `{N}`, the topic's level N (0-based): `fn/+` with `{1}` sends `fn/echo`
to `echo`. The first matching route wins.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from paho.mqtt.client import topic_matches_sub
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from openfx import defaults
from openfx.config import NAME_RE, ConfigError, read_yaml


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Route(_Strict):
    filter: str
    function: str = "{1}"

    @field_validator("filter")
    @classmethod
    def _valid_filter(cls, value: str) -> str:
        levels = value.split("/")
        if (
            not value
            or any(("+" in lv and lv != "+") or ("#" in lv and lv != "#") for lv in levels)
            or ("#" in levels[:-1])
        ):
            raise ValueError(f"not a valid MQTT topic filter: {value!r}")
        return value

    def resolve(self, topic: str) -> str | None:
        """The function for `topic`, or None when the route does not match it."""
        if not topic_matches_sub(self.filter, topic):
            return None
        levels = topic.split("/")

        def level(match: re.Match[str]) -> str:
            index = int(match.group(1))
            return levels[index] if index < len(levels) else ""

        return re.sub(r"\{(\d+)\}", level, self.function)


class TLS(_Strict):
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None


class Retry(_Strict):
    budget_seconds: float = Field(default=30.0, gt=0)
    first_delay: float = Field(default=0.05, gt=0)
    max_delay: float = Field(default=1.0, gt=0)


class BridgeConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = defaults.MQTT_PORT
    username: str | None = None
    password: str | None = None
    tls: TLS | None = None
    gateway: str = defaults.GATEWAY_GRPC  # the gateway's gRPC address (transport: grpc)
    gateway_http: str = f"http://{defaults.GATEWAY_HTTP}"  # its HTTP trigger (transport: http)
    transport: Literal["http", "grpc"] = "http"  # http: keep-alive calls, a third of gRPC's CPU
    token: str | None = (
        None  # bearer token for the gateway; default OPENFX_TOKEN (keep it out of files in git)
    )
    gateway_tls_ca: str | None = None  # CA to reach the gateway over TLS; default OPENFX_TLS_CA
    client_id: str = "openfx-bridge-0"
    session_expiry: int = Field(default=3600, ge=0)
    max_inflight: int = Field(default=64, ge=1, le=65535)  # MQTT 5 Receive Maximum = concurrent invokes
    invoke_timeout: float = Field(default=30.0, gt=0)
    routes: list[Route] = Field(default_factory=lambda: [Route(filter="fn/+", function="{1}")])
    reply_suffix: str = "/reply"
    dead_letter_prefix: str = "dlq/"
    retry: Retry = Field(default_factory=Retry)
    ack: Literal["after-reply", "on-receipt"] = "after-reply"  # on-receipt only to show what it loses
    metrics_address: str | None = "127.0.0.1:9101"
    ready_file: str | None = None  # touched once subscribed (the platform waits for it)

    @field_validator("gateway_http")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        scheme, _, rest = value.partition("://")
        if scheme not in ("http", "https") or not rest or rest.startswith("/"):
            raise ValueError(f"not an http:// or https:// URL: {value!r}")
        return value

    def gateway_target(self) -> str:
        return self.gateway_http if self.transport == "http" else f"{self.gateway} (gRPC)"

    def function_for(self, topic: str) -> str | None:
        for route in self.routes:
            name = route.resolve(topic)
            if name is not None:
                return name
        return None

    def is_own_output(self, topic: str) -> bool:
        """Reply and dead-letter topics: never treated as requests (a `#` route must not loop)."""
        return topic.endswith(self.reply_suffix) or topic.startswith(self.dead_letter_prefix)

    def reply_topic(self, topic: str, function: str) -> str:
        return f"{topic}{self.reply_suffix}"


def valid_function_name(name: str) -> bool:
    return bool(NAME_RE.match(name))


def load_bridge_config(path: str | Path | None, **overrides: object) -> BridgeConfig:
    data: dict[str, object] = {}
    if path is not None:
        data = read_yaml(Path(path))
    given = {k: v for k, v in overrides.items() if v is not None}
    if "gateway" in given and "gateway_http" not in given and "transport" not in given:
        given["transport"] = "grpc"  # `--gateway ADDRESS` alone: that is where to call, never a default URL
    data.update(given)
    try:
        return BridgeConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"{path}: unknown key '{where}'") from None
        raise ConfigError(f"{path}: '{where}': {err['msg']}") from None

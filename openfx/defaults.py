"""The numbers the contracts fix, in one place: the ports (OpenFx's gateway NodePort 31113, our
HTTP trigger 31114 and console 31115, the watcher's 50051 in a container, MQTT's 1883), the message
size limit, and the defaults a function gets when its config says nothing. Everything else
imports them from here, so a port is changed in one line."""

from __future__ import annotations

GATEWAY_GRPC_PORT = 31113  # OpenFx's NodePort
GATEWAY_HTTP_PORT = 31114
GATEWAY_GRPC = f"127.0.0.1:{GATEWAY_GRPC_PORT}"
GATEWAY_HTTP = f"127.0.0.1:{GATEWAY_HTTP_PORT}"
CONSOLE_PORT = 31115  # the operator's console: an origin of its own (openfx/console)
CONSOLE_HTTP = f"127.0.0.1:{CONSOLE_PORT}"
WATCHER_PORT = 50051  # a function's FxWatcher in a container
MQTT_PORT = 1883
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # every gRPC end and the HTTP body

TIMEOUT_SECONDS = 30.0  # a function's `timeout`
MAX_INFLIGHT = 100  # a function's `max_inflight`
MAX_REPLICAS = 64  # Deploy, Update and scaling in embedded mode
# processes and threads per embedded replica where a pids cgroup is writable (a Spark replica,
# its two JVMs included, peaks at ~160); a fork bomb ends there instead of filling the machine
MAX_PIDS = 1024

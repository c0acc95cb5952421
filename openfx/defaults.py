"""The numbers the contracts fix, in one place: the ports (OpenFx's gateway NodePort 31113, our
HTTP trigger 31114 and console 31115, the watcher's 50051 in a container, MQTT's 1883), the message
size limit, and the defaults a function gets when its config says nothing. Everything else
imports them from here, so a port is changed in one line."""

from __future__ import annotations

import os

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
# processes and threads per embedded replica where a pids cgroup is writable: a fork bomb ends
# there instead of filling the machine. A pyspark replica (both JVMs up) peaks at ~160 tasks on 2
# cores, and JVMs start threads per core (GC, JIT, Spark's task and network pools), hence 32 per
# core on machines with more than 32 cores. Fewer than MIN_PIDS would not leave a watcher room.
MAX_PIDS = max(1024, 32 * (os.cpu_count() or 1))
MIN_PIDS = 32

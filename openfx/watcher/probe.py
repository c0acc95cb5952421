"""`python -m openfx.watcher.probe`: exit 0 when the watcher's gRPC health says SERVING.

The image's HEALTHCHECK and Kubernetes exec probes run this (Kubernetes can also use its
native gRPC probe on the same port); it really asks the watcher, unlike OpenFx's lock file."""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from openfx import defaults, env


def main() -> int:
    with env.exit_on_error("probe"):
        port = env.integer("WATCHER_PORT", defaults.WATCHER_PORT, minimum=1)
    address = env.optional("PROBE_ADDR") or f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(address) as channel:
            status = (
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
            )
    except grpc.RpcError as exc:
        print(f"probe: {address}: {exc.code().name}", file=sys.stderr)
        return 1
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())

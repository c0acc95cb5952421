"""Prometheus metrics under OpenFx/OpenFaaS names, counted on every path (gRPC, HTTP, MQTT via gRPC).

OpenFx labelled every call `code="200"` and counted only successful gRPC calls;
here `code` is the HTTP status the call maps to, whatever the path. Each gateway
owns its registry so several can live in one process (tests).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from openfx.errors import InvokeError

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.invocations = Counter(
            "gateway_function_invocation_total",
            "Function invocations by status code",
            ["function_name", "code"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "gateway_functions_seconds",
            "Function invocation time taken",
            ["function_name"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.replicas = Gauge(
            "gateway_service_count", "Ready replicas per function", ["function_name"], registry=self.registry
        )

        self.recycled = Counter(
            "gateway_replica_recycled_total",
            "Replicas killed and restarted by the gateway (memory: over limits.memory; "
            "timeout: a call ran past the function's timeout plus the grace)",
            ["function_name", "reason"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "gateway_auth_rejected_total",
            "Requests refused by authentication (401) or authorization (403)",
            ["code"],
            registry=self.registry,
        )

    def auth_rejected(self, error: InvokeError) -> None:
        self.rejected.labels(str(error.http)).inc()

    def observe(self, function: str, http_code: int, seconds: float) -> None:
        self.invocations.labels(function, str(http_code)).inc()
        self.seconds.labels(function).observe(seconds)

    def replica_recycled(self, function: str, reason: str) -> None:
        self.recycled.labels(function, reason).inc()

    def set_replicas(self, function: str, count: int) -> None:
        self.replicas.labels(function).set(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus metrics under OpenFx/OpenFaaS names, counted on every path (gRPC, HTTP, MQTT via gRPC).

OpenFx labelled every call `code="200"` and counted only successful gRPC calls;
here `code` is the HTTP status the call maps to, whatever the path. Each gateway
owns its registry so several can live in one process (tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from openfx.errors import InvokeError

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# the one function_name every call to a name that is not deployed is counted under
UNKNOWN_FUNCTION = "<unknown>"
# an echo through the embedded backend takes ~0.2 ms, an image model seconds: buckets span both
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip


@dataclass
class FunctionStats:
    """One function's counts since the gateway started: calls, failed calls (status not 200) and the
    latency histogram's cumulative bucket counts (all triggers together), for the console."""

    calls: float = 0.0
    errors: float = 0.0
    buckets: tuple[float, ...] = (0.0,) * (len(LATENCY_BUCKETS) + 1)

    def minus(self, earlier: FunctionStats) -> FunctionStats:
        return FunctionStats(
            self.calls - earlier.calls,
            self.errors - earlier.errors,
            tuple(a - b for a, b in zip(self.buckets, earlier.buckets, strict=True)),
        )

    def quantile(self, q: float) -> float | None:
        """Prometheus's histogram_quantile: linear inside the bucket that holds the rank."""
        total = self.buckets[-1]
        if total <= 0:
            return None
        rank = q * total
        lower, below = 0.0, 0.0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.buckets, strict=True):
            if count >= rank:
                if bound == float("inf"):
                    return LATENCY_BUCKETS[-1]
                inside = count - below
                return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
            lower, below = bound, count
        return LATENCY_BUCKETS[-1]


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
            ["function_name", "trigger"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        # label lookups cost more than the increments: one pair of children per (function, code, trigger)
        self._children: dict[tuple[str, int, str], tuple[object, object]] = {}
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

    def observe(self, function: str, http_code: int, seconds: float, trigger: str = "http") -> None:
        key = (function, http_code, trigger)
        children = self._children.get(key)
        if children is None:
            children = (
                self.invocations.labels(function, str(http_code)),
                self.seconds.labels(function, trigger),
            )
            self._children[key] = children
        children[0].inc()  # type: ignore[attr-defined]
        children[1].observe(seconds)  # type: ignore[attr-defined]

    def function_stats(self) -> dict[str, FunctionStats]:
        """Every function's counts, read from the same series /metrics exposes."""
        stats: dict[str, FunctionStats] = {}
        for family in self.invocations.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    one = stats.setdefault(sample.labels["function_name"], FunctionStats())
                    one.calls += sample.value
                    if sample.labels["code"] != "200":
                        one.errors += sample.value
        bounds = {str(float(b)): i for i, b in enumerate(LATENCY_BUCKETS)} | {"+Inf": len(LATENCY_BUCKETS)}
        counts: dict[str, list[float]] = {}
        for family in self.seconds.collect():
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    row = counts.setdefault(sample.labels["function_name"], [0.0] * len(bounds))
                    row[bounds[sample.labels["le"]]] += sample.value
        for name, row in counts.items():
            stats.setdefault(name, FunctionStats()).buckets = tuple(row)
        return stats

    def replica_recycled(self, function: str, reason: str) -> None:
        self.recycled.labels(function, reason).inc()

    def set_replicas(self, function: str, count: int) -> None:
        self.replicas.labels(function).set(count)

    def scaled(self, function: str, desired: int, event: str = "") -> None:
        """The desired replicas (autoscaler, activator or pin) and, unless `event` is empty, one scale
        event (up, down, zero, activate, pin). Made on first use, beside the ready-replica gauge."""
        if not hasattr(self, "desired"):
            self.desired = Gauge(
                "gateway_service_desired_count",
                "Desired replicas per function (ready: gateway_service_count)",
                ["function_name"],
                registry=self.registry,
            )
            self.scale_events = Counter(
                "gateway_scale_events_total",
                "Replica count changes by the autoscaler (up/down/zero), the activator or a pin",
                ["function_name", "event"],
                registry=self.registry,
            )
        self.desired.labels(function).set(desired)
        if event:
            self.scale_events.labels(function, event).inc()

    def watch_in_flight(self, read: Callable[[], Iterable[tuple[str, int]]]) -> None:
        """`gateway_function_inflight{function_name}`: calls in flight per function (those waiting
        for a cold start included), read from `read()` at scrape time, so no call pays for it. A
        Kubernetes HPA scales on it through prometheus-adapter (openfx-cli k8s render
        --hpa-metric inflight)."""
        self.registry.register(_InFlight(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


IN_FLIGHT = "gateway_function_inflight"


class _InFlight:
    """A collector reading the functions' in-flight counts when scraped."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, int]]]) -> None:
        self.read = read

    def _family(self) -> GaugeMetricFamily:
        help_text = "Calls in flight per function, waiting for a cold start included"
        return GaugeMetricFamily(IN_FLIGHT, help_text, labels=["function_name"])

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield self._family()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = self._family()
        for name, count in self.read():
            family.add_metric([name], count)
        yield family

"""Prometheus scrape configs (Kubernetes, and the embedded platform on one machine: the gateway and
each trigger process with /metrics of its own, from openfx.triggers.scrape_targets) and a Grafana
dashboard for the gateway's and the MQTT bridge's metrics. Every PromQL expression here is
evaluated against a real Prometheus by tests/test_prometheus.py, so the dashboard cannot ship a
query that returns nothing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from openfx.k8s.manifests import GATEWAY_NAMESPACE

ERRORS = 'sum by (function_name, code) (rate(gateway_function_invocation_total{code!="200"}[1m]))'


def prometheus_config(namespace: str = GATEWAY_NAMESPACE) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "5s", "evaluation_interval": "15s"},
        "scrape_configs": [
            {
                "job_name": "fxgateway",
                "metrics_path": "/metrics",
                "kubernetes_sd_configs": [{"role": "endpoints", "namespaces": {"names": [namespace]}}],
                "relabel_configs": [
                    {
                        "source_labels": [
                            "__meta_kubernetes_service_name",
                            "__meta_kubernetes_endpoint_port_name",
                        ],
                        "regex": "fxgateway;http",
                        "action": "keep",
                    }
                ],
            }
        ],
    }


def embedded_prometheus_config(
    gateway_http: str, triggers: Mapping[str, str] | None = None, interval: str = "5s"
) -> dict[str, Any]:
    """`openfx-cli up --monitoring`: the gateway's /metrics (functions, schedules, auth) and those of
    the trigger processes, `triggers` (job name -> host:port: openfx.triggers.scrape_targets)."""
    targets = {"fxgateway": gateway_http, **(triggers or {})}
    jobs = [
        {"job_name": job, "metrics_path": "/metrics", "static_configs": [{"targets": [address]}]}
        for job, address in targets.items()
        if address
    ]
    return {"global": {"scrape_interval": interval, "evaluation_interval": interval}, "scrape_configs": jobs}


def dashboard_queries(dashboard: dict[str, Any] | None = None) -> list[str]:
    """Every PromQL expression of the dashboard's panels."""
    board = grafana_dashboard() if dashboard is None else dashboard
    return [target["expr"] for panel in board["panels"] for target in panel["targets"]]


def _panel(
    panel_id: int, title: str, exprs: list[tuple[str, str]], unit: str, x: int, y: int
) -> dict[str, Any]:
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(65 + i), "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(exprs)
        ],
    }


def grafana_dashboard() -> dict[str, Any]:
    q = "histogram_quantile({q}, sum by (le, function_name) (rate(gateway_functions_seconds_bucket[1m])))"
    return {
        "title": "OpenFx gateway",
        "uid": "openfx-gateway",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}
            ]
        },
        "panels": [
            _panel(
                1,
                "Invocations per second by function and status",
                [
                    (
                        "sum by (function_name, code) (rate(gateway_function_invocation_total[1m]))",
                        "{{function_name}} {{code}}",
                    )
                ],
                "reqps",
                0,
                0,
            ),
            _panel(
                2,
                "Latency p50 / p99",
                [(q.format(q="0.5"), "p50 {{function_name}}"), (q.format(q="0.99"), "p99 {{function_name}}")],
                "s",
                12,
                0,
            ),
            _panel(3, "Ready replicas", [("gateway_service_count", "{{function_name}}")], "short", 0, 8),
            _panel(
                4,
                "Errors and refused requests",
                [
                    (ERRORS, "{{function_name}} {{code}}"),
                    ("sum by (code) (rate(gateway_auth_rejected_total[1m]))", "auth {{code}}"),
                    ("sum by (reason) (rate(gateway_http_refused_total[1m]))", "http {{reason}}"),
                ],
                "reqps",
                12,
                8,
            ),
            _panel(
                5,
                "Trigger invocations (MQTT bridge, schedules) and skipped ticks",
                [
                    (
                        "sum by (trigger, function_name, code) (rate(trigger_invocations_total[1m]))",
                        "{{trigger}} {{function_name}} {{code}}",
                    ),
                    (
                        "sum by (function_name, reason) (rate(trigger_ticks_skipped_total[5m]))",
                        "skipped {{function_name}} {{reason}}",
                    ),
                ],
                "reqps",
                0,
                16,
            ),
            _panel(
                6,
                "Latency p99 by trigger",
                [
                    (
                        "histogram_quantile(0.99, sum by (le, function_name, trigger) "
                        "(rate(gateway_functions_seconds_bucket[1m])))",
                        "{{function_name}} {{trigger}}",
                    )
                ],
                "s",
                12,
                16,
            ),
            _panel(
                7,
                "MQTT bridge: messages, gateway calls by status, in flight",
                [
                    ("sum(rate(bridge_messages_received_total[1m]))", "received"),
                    ("sum by (code) (rate(bridge_invocations_total[1m]))", "invoked {{code}}"),
                    ("sum(rate(bridge_replies_total[1m]))", "replied"),
                    ("sum(bridge_inflight)", "in flight"),
                ],
                "short",
                0,
                24,
            ),
        ],
    }

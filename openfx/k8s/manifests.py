"""One function -> Deployment + headless Service + HorizontalPodAutoscaler; the platform ->
namespaces, the gateway (ServiceAccount, least-privilege Role, Deployment, NodePort Service).

Current APIs only (apps/v1, autoscaling/v2, native gRPC probes, `nvidia.com/gpu`), where
OpenFx used APIs removed in Kubernetes 1.16-1.25. The same dicts are written as YAML by the
CLI and sent to the API server by the gateway's Kubernetes backend.
"""

from __future__ import annotations

from typing import Any

from openfx import defaults
from openfx.function_def import FunctionDef

GATEWAY_NAMESPACE = "openfx"
FUNCTION_NAMESPACE = "openfx-fn"
WATCHER_PORT = defaults.WATCHER_PORT
GRPC, HTTP = defaults.GATEWAY_GRPC_PORT, defaults.GATEWAY_HTTP_PORT
LABEL = "openfx_fn"
GATEWAY_IMAGE = "localhost:5000/openfx/fxgateway:0.1.0"

Manifest = dict[str, Any]


def _resources(limits: dict[str, str], requests: dict[str, str]) -> dict[str, dict[str, str]]:
    def convert(values: dict[str, str]) -> dict[str, str]:
        out = {}
        for key, value in values.items():
            if value:
                out["nvidia.com/gpu" if key.lower() == "gpu" else key.lower()] = str(value)
        return out

    resources = {"limits": convert(limits), "requests": convert(requests)}
    if "nvidia.com/gpu" in resources["limits"]:
        resources["requests"]["nvidia.com/gpu"] = resources["limits"]["nvidia.com/gpu"]  # must be equal
    return {k: v for k, v in resources.items() if v}


IN_FLIGHT = "gateway_function_inflight"  # the gateway's gauge (openfx/gateway/metrics.py)
HPA_METRICS = ("cpu", "inflight")
SCALE_TO_ZERO_NOTE = (
    "scale_to_zero_after: not on Kubernetes by these manifests (an HPA keeps at least 1 pod); scale to "
    "zero needs an activator in front of the pods: KEDA's HTTP add-on or Knative Serving"
)


def _quantity(value: float) -> str:
    """A Kubernetes quantity: 10.0 -> "10", 2.5 -> "2500m"."""
    return str(int(value)) if value == int(value) else f"{round(value * 1000)}m"


def _hpa_metric(fn: FunctionDef, metric: str) -> tuple[Manifest, str]:
    """The HPA's metric and what concurrency_target became in it (an annotation says which)."""
    target = fn.concurrency_target
    if metric == "inflight":
        # the gateway counts each function's calls in flight (one series per gateway pod, none per
        # function pod, so not a Pods metric): an External metric whose AverageValue target divides
        # it by the function's pods is concurrency_target as the embedded autoscaler reads it
        return {
            "type": "External",
            "external": {
                "metric": {"name": IN_FLIGHT, "selector": {"matchLabels": {"function_name": fn.name}}},
                "target": {"type": "AverageValue", "averageValue": _quantity(target)},
            },
        }, (
            f"{target:g} calls in flight per pod: External metric {IN_FLIGHT} (the gateway's gauge) through "
            "prometheus-adapter (prometheus-adapter/values.yaml)"
        )
    return {
        "type": "Resource",
        "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}},
    }, (
        f"{target:g} calls in flight per pod: not what this HPA reads (CPU at 80%, needing no adapter); "
        "openfx-cli k8s render --hpa-metric inflight scales on it through prometheus-adapter"
    )


def function_manifests(
    fn: FunctionDef, namespace: str = FUNCTION_NAMESPACE, hpa_metric: str = "cpu"
) -> list[Manifest]:
    """`hpa_metric`: what the HPA scales on, `cpu` (needs only metrics-server) or `inflight` (the
    gateway's in-flight gauge against concurrency_target, needs prometheus-adapter)."""
    if hpa_metric not in HPA_METRICS:
        raise ValueError(f"hpa metric must be one of {', '.join(HPA_METRICS)}, not {hpa_metric!r}")
    labels = {**dict(sorted(fn.labels.items())), LABEL: fn.name}
    annotations = {k: v for k, v in sorted(fn.annotations.items()) if k != "openfx.source"}  # a local path
    deployment_notes = {"openfx.scale-to-zero": SCALE_TO_ZERO_NOTE} if fn.scale_to_zero_after else {}
    probe = {"grpc": {"port": WATCHER_PORT}, "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3}
    container: Manifest = {
        "name": fn.name,
        "image": fn.image or fn.name,
        "ports": [{"name": "fxwatcher", "containerPort": WATCHER_PORT, "protocol": "TCP"}],
        "env": [{"name": k, "value": v} for k, v in sorted(fn.env.items())],
        "readinessProbe": {**probe, "initialDelaySeconds": 1},
        "livenessProbe": {**probe, "initialDelaySeconds": 10},
        "startupProbe": {**probe, "failureThreshold": 60, "periodSeconds": 2},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    resources = _resources(fn.limits, fn.requests)
    if resources:
        container["resources"] = resources
    deployment: Manifest = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": fn.name,
            "namespace": namespace,
            "labels": labels,
            "annotations": {**annotations, **deployment_notes},
        },
        "spec": {
            "replicas": fn.replicas,
            "selector": {"matchLabels": {LABEL: fn.name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": {
                    "containers": [container],
                    "terminationGracePeriodSeconds": int(fn.timeout) + 5,  # SIGTERM drains in-flight calls
                },
            },
        },
    }
    # headless: the gateway's round_robin channel sees every pod (one HTTP/2 connection to a
    # ClusterIP would pin all calls to one pod)
    service: Manifest = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": fn.name, "namespace": namespace, "labels": labels},
        "spec": {
            "clusterIP": "None",
            "selector": {LABEL: fn.name},
            "ports": [{"name": "grpc-fxwatcher", "port": WATCHER_PORT, "targetPort": WATCHER_PORT}],
        },
    }
    manifests = [deployment, service]
    # min_replicas/max_replicas bound the HPA; concurrency_target is its target with --hpa-metric
    # inflight (else it scales on CPU). An HPA never goes below 1: scale to zero (min_replicas 0,
    # scale_to_zero_after) on Kubernetes needs an activator outside it, KEDA's HTTP add-on or
    # Knative Serving (README "Scaling"); the Deployment's openfx.scale-to-zero annotation says so
    if fn.max_replicas > max(fn.min_replicas, 1):
        metric, mapped = _hpa_metric(fn, hpa_metric)
        notes = {"openfx.hpa-metric": mapped, **deployment_notes}
        manifests.append(
            {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": fn.name, "namespace": namespace, "labels": labels, "annotations": notes},
                "spec": {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": fn.name},
                    "minReplicas": max(fn.min_replicas, 1),
                    "maxReplicas": fn.max_replicas,
                    "metrics": [metric],
                },
            }
        )
    return manifests


def prometheus_adapter_values(prometheus_url: str = "http://prometheus.openfx.svc") -> Manifest:
    """Values for the prometheus-adapter Helm chart: serves the gateway's in-flight gauge as the
    External metric the `--hpa-metric inflight` HPAs read (summed over gateway pods)."""
    return {
        "prometheus": {"url": prometheus_url, "port": 9090},
        "rules": {
            "default": False,
            "external": [
                {
                    "seriesQuery": f'{IN_FLIGHT}{{function_name!=""}}',
                    "resources": {"namespaced": False},  # the gateway's namespace is not the HPA's
                    "name": {"as": IN_FLIGHT},
                    "metricsQuery": "sum(<<.Series>>{<<.LabelMatchers>>}) by (function_name)",
                }
            ],
        },
    }


def platform_manifests(
    gateway_image: str = GATEWAY_IMAGE,
    namespace: str = GATEWAY_NAMESPACE,
    functions: str = FUNCTION_NAMESPACE,
    allowed_hosts: tuple[str, ...] = (),
) -> list[Manifest]:
    """`allowed_hosts`: the node names/addresses users reach the NodePort by (the HTTP Host check
    already admits the Service's DNS names and the pod's own IP, which Prometheus scrapes)."""
    labels = {"app": "fxgateway"}
    service_names = [
        f"fxgateway.{namespace}",
        f"fxgateway.{namespace}.svc",
        f"fxgateway.{namespace}.svc.cluster.local",
    ]
    host_args = [f"--allowed-host={h}" for h in ("$(POD_IP)", "fxgateway", *service_names, *allowed_hosts)]
    namespaces = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"openfx": "true"}}}
        for name in (namespace, functions)
    ]
    account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": "fxgateway", "namespace": namespace},
    }
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "fxgateway", "namespace": functions},
        "rules": [  # only what the Kubernetes backend calls, only in the functions' namespace
            {
                "apiGroups": ["apps"],
                "resources": ["deployments"],
                "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
            },
            {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["get", "patch", "update"]},
            {
                "apiGroups": [""],
                "resources": ["services"],
                "verbs": ["get", "list", "create", "update", "patch", "delete"],
            },
            {"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list"]},
            {
                "apiGroups": ["autoscaling"],
                "resources": ["horizontalpodautoscalers"],
                "verbs": ["get", "list", "create", "update", "patch", "delete"],
            },
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "fxgateway", "namespace": functions},
        "subjects": [{"kind": "ServiceAccount", "name": "fxgateway", "namespace": namespace}],
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "fxgateway"},
    }
    probe = {"grpc": {"port": GRPC}, "periodSeconds": 10, "timeoutSeconds": 2}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "fxgateway", "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(HTTP)},
                },
                "spec": {
                    "serviceAccountName": "fxgateway",
                    "containers": [
                        {
                            "name": "fxgateway",
                            "image": gateway_image,
                            "args": [
                                "--backend",
                                "kubernetes",
                                "--namespace",
                                functions,
                                "--no-functions",
                                "--grpc",
                                f"0.0.0.0:{GRPC}",
                                "--http",
                                f"0.0.0.0:{HTTP}",
                                *host_args,
                            ],
                            "env": [
                                {"name": "OPENFX_TOKENS_FILE", "value": "/etc/openfx/tokens.yaml"},
                                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                            ],
                            "ports": [
                                {"name": "grpc", "containerPort": GRPC},
                                {"name": "http", "containerPort": HTTP},
                            ],
                            "readinessProbe": probe,
                            "livenessProbe": {**probe, "initialDelaySeconds": 10},
                            "resources": {
                                "requests": {"cpu": "250m", "memory": "128Mi"},
                                "limits": {"memory": "512Mi"},
                            },
                            "volumeMounts": [
                                {"name": "tokens", "mountPath": "/etc/openfx", "readOnly": True}
                            ],
                            "securityContext": {
                                "runAsNonRoot": True,
                                "runAsUser": 10001,
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                            },
                        }
                    ],
                    "volumes": [{"name": "tokens", "secret": {"secretName": "fxgateway-tokens"}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "fxgateway", "namespace": namespace, "labels": labels},
        "spec": {
            "type": "NodePort",
            "selector": labels,
            "ports": [
                {"name": "grpc", "port": GRPC, "targetPort": GRPC, "nodePort": GRPC},
                {"name": "http", "port": HTTP, "targetPort": HTTP, "nodePort": HTTP},
            ],
        },
    }
    return [*namespaces, account, role, binding, deployment, service]

"""`openfx-cli k8s render`: the cluster-mode manifests, rendered from the stack file."""

from __future__ import annotations

import json
from pathlib import Path

import click
import yaml

from openfx.config import ConfigError, load_stack
from openfx.function_def import FunctionDef, to_request
from openfx.k8s.manifests import (
    FUNCTION_NAMESPACE,
    GATEWAY_IMAGE,
    GATEWAY_NAMESPACE,
    HPA_METRICS,
    function_manifests,
    platform_manifests,
    prometheus_adapter_values,
)
from openfx.k8s.observability import grafana_dashboard, prometheus_config


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data: object) -> bool:
        return True  # plain YAML that kubectl users read, no &id001 anchors


def write_yaml(path: Path, documents: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.dump_all(documents, Dumper=_NoAliases, sort_keys=False))


def render(
    stack_file: str,
    output: Path,
    gateway_image: str = GATEWAY_IMAGE,
    namespace: str = FUNCTION_NAMESPACE,
    allowed_hosts: tuple[str, ...] = (),
    hpa_metric: str = "cpu",
) -> list[Path]:
    """`hpa_metric` inflight: HPAs on the gateway's in-flight gauge (concurrency_target), plus the
    prometheus-adapter values that serve it."""
    stack = load_stack(stack_file)
    written = [output / "platform.yaml"]
    write_yaml(
        written[0], platform_manifests(gateway_image, functions=namespace, allowed_hosts=allowed_hosts)
    )
    for name, spec in stack.functions.items():
        fn = FunctionDef.from_request(to_request(name, spec))
        path = output / "functions" / f"{name}.yaml"
        write_yaml(path, function_manifests(fn, namespace, hpa_metric))
        written.append(path)
    if hpa_metric == "inflight":
        adapter = output / "prometheus-adapter" / "values.yaml"
        write_yaml(adapter, [prometheus_adapter_values()])
        written.append(adapter)
    prometheus = output / "prometheus" / "prometheus.yml"
    prometheus.parent.mkdir(parents=True, exist_ok=True)
    prometheus.write_text(yaml.safe_dump(prometheus_config(), sort_keys=False))
    dashboard = output / "grafana" / "openfx-gateway.json"
    dashboard.parent.mkdir(parents=True, exist_ok=True)
    dashboard.write_text(json.dumps(grafana_dashboard(), indent=2) + "\n")
    return [*written, prometheus, dashboard]


@click.group()
def k8s() -> None:
    """Cluster mode: Kubernetes manifests."""


@k8s.command("render")
@click.option("-f", "--file", "stack_file", default="openfx.yaml", show_default=True, help="stack file")
@click.option("-o", "--output", default="deploy", show_default=True, help="output folder")
@click.option("--gateway-image", default=GATEWAY_IMAGE, show_default=True)
@click.option("--namespace", default=FUNCTION_NAMESPACE, show_default=True, help="the functions' namespace")
@click.option(
    "--allowed-host",
    multiple=True,
    help="a node name or address users reach the HTTP NodePort by (repeatable; the gateway checks Host)",
)
@click.option(
    "--hpa-metric",
    type=click.Choice(HPA_METRICS),
    default="cpu",
    show_default=True,
    help="what HPAs scale on: cpu (metrics-server), or inflight: calls in flight per pod against "
    "concurrency_target, from the gateway's gauge through prometheus-adapter (values written too)",
)
def render_command(
    stack_file: str,
    output: str,
    gateway_image: str,
    namespace: str,
    allowed_host: tuple[str, ...],
    hpa_metric: str,
) -> None:
    """Write namespaces, gateway, per-function Deployment/Service/HPA, Prometheus and Grafana files."""
    try:
        paths = render(stack_file, Path(output), gateway_image, namespace, allowed_host, hpa_metric)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    for path in paths:
        click.echo(f"wrote {path}")
    if hpa_metric == "inflight":
        click.echo(
            f"install prometheus-adapter with: helm install prometheus-adapter "
            f"prometheus-community/prometheus-adapter -n {GATEWAY_NAMESPACE} "
            f"-f {output}/prometheus-adapter/values.yaml"
        )
    click.echo(f"apply with: kubectl apply -f {output}/platform.yaml -f {output}/functions/")

"""Cluster mode without a cluster: Dockerfiles through hadolint, build contexts for every function,
manifests validated offline against the Kubernetes schemas, and the gateway's Kubernetes backend
against a fake of the Kubernetes API at the HTTP level (tests/fake_k8s.py: no cluster or Docker
engine can run here), invoking a real watcher process through it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import kubernetes_validate
import pytest
import yaml

from openfx.config import FunctionSpec, load_stack
from openfx.function_def import FunctionDef, to_request
from openfx.k8s.manifests import function_manifests, platform_manifests
from openfx.pb import fxgateway_pb2 as gpb
from openfx.watcher.server import WatcherSettings
from tests.conftest import FIXTURES, ROOT, RunningGateway, free_port, start_gateway
from tests.fake_k8s import FakeKubernetes

K8S_VERSION = "1.37.0"
CLI = str(Path(sys.executable).parent / "openfx-cli")


@pytest.mark.parametrize("variant", ["python3", "pyspark"])
def test_dockerfiles_pass_hadolint(variant: str) -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    out = subprocess.run(
        [hadolint, str(ROOT / "dockerfiles" / variant / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_build_context_for_every_function(tmp_path: Path) -> None:
    out = subprocess.run(
        [CLI, "fn", "build", "-f", str(ROOT / "openfx.yaml"), "-o", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "HOME": str(tmp_path / "home")},  # the image store: not the user's own
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    for name, spec in load_stack(ROOT / "openfx.yaml").functions.items():
        context = tmp_path / name
        dockerfile = (context / "Dockerfile").read_text()
        assert "FROM python:" in dockerfile and "USER 10001" in dockerfile
        assert (context / "function/src/handler.py").read_bytes() == spec.handler_file.read_bytes()
        assert (context / "function/requirements.txt").read_text() == (
            spec.source_dir / "requirements.txt"
        ).read_text()
        assert (context / "openfx/watcher/server.py").exists() and (
            context / "openfx/watcher/probe.py"
        ).exists()
        assert not (context / "openfx/gateway").exists() and not (context / "openfx/cli").exists()
        assert f"docker build -t {spec.image}" in out.stdout
    # the MLeap pieces are symlinks into mleap-support/ in the tree: a context must hold the files
    support = ROOT / "mleap-support"
    copies = {
        "pyspark/pom.xml": "pom.xml",
        "pyspark/MleapServer.java": "MleapServer.java",
        "pyspark/function/src/mleap_bundle.py": "mleap_bundle.py",
        "mnist/function/src/mleap_bundle.py": "mleap_bundle.py",
    }
    for built, source in copies.items():
        path = tmp_path / built
        assert path.is_file() and not path.is_symlink(), built
        assert path.read_bytes() == (support / source).read_bytes(), built


def all_manifests() -> list[dict]:
    docs = platform_manifests()
    for name, spec in load_stack(ROOT / "openfx.yaml").functions.items():
        gpu = spec.model_copy(
            update={"max_replicas": 5, "limits": spec.limits.model_copy(update={"gpu": "1"})}
        )
        docs += function_manifests(FunctionDef.from_request(to_request(name, gpu)))
    return docs


def test_manifests_validate_against_kubernetes_schemas() -> None:
    docs = all_manifests()
    kinds = {(d["apiVersion"], d["kind"]) for d in docs}
    assert ("autoscaling/v2", "HorizontalPodAutoscaler") in kinds and ("apps/v1", "Deployment") in kinds
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    echo = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "echo")
    container = echo["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["grpc"]["port"] == 50051
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "echo")
    assert service["spec"]["clusterIP"] == "None"
    gateway = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "fxgateway")
    assert {p["nodePort"] for p in gateway["spec"]["ports"]} == {31113, 31114}


def test_scaling_keys_map_to_the_hpa_and_scale_to_zero_is_documented(tmp_path: Path) -> None:
    keys = {"max_replicas": 4, "concurrency_target": 2.5, "scale_to_zero_after": "5m"}
    fn = FunctionDef.from_request(to_request("lazy", FunctionSpec.model_validate(keys)))
    by_kind = {d["kind"]: d for d in function_manifests(fn)}
    hpa, deployment = by_kind["HorizontalPodAutoscaler"], by_kind["Deployment"]
    # by default on CPU (metrics-server only), and the HPA says what became of concurrency_target
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)  # an HPA never goes to 0
    assert "--hpa-metric inflight" in hpa["metadata"]["annotations"]["openfx.hpa-metric"]
    note = deployment["metadata"]["annotations"]["openfx.scale-to-zero"]
    assert "KEDA's HTTP add-on" in note and "Knative Serving" in note
    # --hpa-metric inflight: the gateway's in-flight gauge per pod against concurrency_target
    inflight = next(
        d for d in function_manifests(fn, hpa_metric="inflight") if d["kind"] == "HorizontalPodAutoscaler"
    )
    assert inflight["spec"]["metrics"] == [
        {
            "type": "External",
            "external": {
                "metric": {
                    "name": "gateway_function_inflight",
                    "selector": {"matchLabels": {"function_name": "lazy"}},
                },
                "target": {"type": "AverageValue", "averageValue": "2500m"},
            },
        }
    ]
    for doc in (hpa, inflight, deployment):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    with pytest.raises(ValueError, match="hpa metric must be one of cpu, inflight"):
        function_manifests(fn, hpa_metric="memory")
    fixed = FunctionDef.from_request(to_request("fixed", FunctionSpec()))
    assert [d["kind"] for d in function_manifests(fixed)] == ["Deployment", "Service"]  # no HPA, no note
    # the CLI renders the adapter's values beside the manifests, serving the gauge the HPAs read
    stack = tmp_path / "stack.yaml"
    stack.write_text(
        f"include: [{ROOT}/functions/echo/config.yaml]\nfunctions: {{echo: {{max_replicas: 3}}}}\n"
    )
    out = subprocess.run(
        [CLI, "k8s", "render", "-f", str(stack), "-o", str(tmp_path / "out"), "--hpa-metric", "inflight"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "helm install prometheus-adapter" in out.stdout
    rules = yaml.safe_load((tmp_path / "out/prometheus-adapter/values.yaml").read_text())["rules"]["external"]
    assert rules[0]["name"]["as"] == "gateway_function_inflight"
    echo = list(yaml.safe_load_all((tmp_path / "out/functions/echo.yaml").read_text()))
    assert echo[-1]["spec"]["metrics"][0]["external"]["metric"]["name"] == "gateway_function_inflight"
    bad = subprocess.run(
        [CLI, "k8s", "render", "-f", str(stack), "-o", str(tmp_path / "bad"), "--hpa-metric", "gpu"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "Invalid value for '--hpa-metric'" in bad.stderr


def test_gateway_manifest_admits_its_service_names_and_pod_ip_in_host() -> None:
    """Prometheus scrapes the pod IP and in-cluster clients use the Service name: the rendered args,
    parsed by the gateway's own flags (with the pod IP Kubernetes substitutes), admit both, and a
    rebinding page's name stays out."""
    import argparse

    from openfx.gateway.app import add_arguments, settings_from
    from openfx.gateway.guards import HostNames

    docs = platform_manifests(allowed_hosts=("node1.example",))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in container["env"]
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-functions", action="store_true")
    add_arguments(parser)
    args = [a.replace("$(POD_IP)", "10.244.1.7") for a in container["args"]]
    settings = settings_from(parser.parse_args(args))
    hosts = HostNames.for_listener("0.0.0.0", 31114, settings.allowed_hosts)
    for host in ("10.244.1.7:31114", "fxgateway.openfx:31114", "node1.example:31114", "127.0.0.1:31114"):
        assert hosts.allows(host), host
    assert not hosts.allows("evil.example:31114") and not hosts.allows("0.0.0.0:31114")


def test_committed_deploy_folder_is_current_and_valid(tmp_path: Path) -> None:
    out = subprocess.run(
        [CLI, "k8s", "render", "-o", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.returncode == 0, out.stderr
    rendered = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    committed_files = {p.relative_to(ROOT / "deploy") for p in (ROOT / "deploy").rglob("*") if p.is_file()}
    functions = set(load_stack(ROOT / "openfx.yaml").functions)
    assert {
        Path("platform.yaml"),
        Path("prometheus/prometheus.yml"),
        Path("grafana/openfx-gateway.json"),
    } <= rendered
    assert {p.stem for p in rendered if p.parent == Path("functions")} == functions  # one file per function
    assert committed_files - rendered == set(), "stale files in deploy/ that render no longer writes"
    assert rendered - committed_files == set(), (
        "rendered files missing from deploy/: run openfx-cli k8s render"
    )
    for path in sorted(rendered):
        committed = ROOT / "deploy" / path
        assert committed.read_text() == (tmp_path / path).read_text(), (
            f"{committed} is stale: run openfx-cli k8s render"
        )
    for path in (ROOT / "deploy").rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["job_name"] == "fxgateway"
    dashboard = json.loads((ROOT / "deploy/grafana/openfx-gateway.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert any("gateway_function_invocation_total" in e for e in exprs)
    assert any("gateway_functions_seconds_bucket" in e for e in exprs)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[RunningGateway, FakeKubernetes, subprocess.Popen[bytes]]]:
    """A gateway with the Kubernetes backend on the fake API; function pods are one real watcher."""
    fake = FakeKubernetes()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(fake.kubeconfig())
    watcher_port = free_port()
    watcher = subprocess.Popen(
        [sys.executable, "-m", "openfx.watcher"],
        env={
            **os.environ,
            **WatcherSettings(
                handler_file=str(FIXTURES / "functions/info/src/handler.py"),
                function_name="info",
                address=f"127.0.0.1:{watcher_port}",
                lock_file=str(tmp_path / "lock"),
            ).to_env(),
        },
    )
    gw = start_gateway(
        FIXTURES / "stack.yaml",
        tmp_path / "gateway.log",
        "--backend",
        "kubernetes",
        "--namespace",
        "openfx-fn",
        "--function-address",
        f"127.0.0.1:{watcher_port}",
        env={"KUBECONFIG": str(kubeconfig)},
    )
    try:
        yield gw, fake, watcher
    finally:
        gw.stop()
        watcher.terminate()
        watcher.wait(10)
        fake.close()


def test_kubernetes_backend_against_fake_api(cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    gw, fake, _ = cluster
    from tests.test_gateway_manage import wait_for

    stub = gw.stub()
    wait_for(lambda: _ok(stub), what="gateway up")
    spec = load_stack(FIXTURES / "stack.yaml").functions["info"]
    request = to_request(
        "info", spec.model_copy(update={"max_replicas": 3, "image": "registry.local/info:1"})
    )
    assert stub.Deploy(request, timeout=30).Msg == b"OK"
    assert replicas(stub, "info") == (1, 0)  # created: no pod is ready yet
    fake.pods_ready("info", 1)
    wait_for(lambda: replicas(stub, "info") == (1, 1), what="the pod ready")

    created = {(m, p.split("?")[0].rsplit("/", 1)[-1]): b for m, p, b in fake.requests if m == "POST"}
    deployment = created[("POST", "deployments")]
    hpa = created[("POST", "horizontalpodautoscalers")]
    service = created[("POST", "services")]
    for obj in (deployment, hpa, service):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/info:1"
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["maxReplicas"] == 3
    assert service["spec"]["clusterIP"] == "None"

    # invoked over a persistent channel to <fn>.<namespace>:50051 (here: the real watcher)
    reply = stub.Invoke(gpb.InvokeServiceRequest(Service="info", Input=b""), timeout=10).Msg
    assert reply == b"info|grpc||True"
    frames = [gpb.InvokeServiceRequest(Service="info", Input=b"") for _ in range(3)]
    assert [m.Output for m in stub.Invokes(iter(frames), timeout=10)] == [reply] * 3

    listed = {f.Name: f for f in stub.List(gpb.Empty(), timeout=10).Functions}
    assert listed["info"].InvocationCount == 4

    stub.ReplicaUpdate(gpb.ScaleServiceRequest(ServiceName="info", Replicas=4), timeout=10)
    # the API reports 4 wanted, 1 ready, until the new pods pass their probes
    wait_for(lambda: replicas(stub, "info") == (4, 1), what="4 wanted, 1 available")
    fake.pods_ready("info", 4)
    wait_for(lambda: replicas(stub, "info") == (4, 4), what="4 available")
    assert (
        "PATCH",
        "/apis/apps/v1/namespaces/openfx-fn/deployments/info/scale",
        {"spec": {"replicas": 4}},
    ) in [(m, p, b) for m, p, b in fake.requests]
    log = stub.GetLog(gpb.FunctionRequest(FunctionName="info"), timeout=10).Msg.decode()
    assert log == "---\nName: info-7c9d-abcde\nLog:\nlog line from info-7c9d-abcde\n"

    with pytest.raises(grpc.RpcError) as dup:
        stub.Deploy(request, timeout=30)
    assert dup.value.code() == grpc.StatusCode.ALREADY_EXISTS

    updated = to_request("info", spec.model_copy(update={"image": "registry.local/info:2"}))
    stub.Update(updated, timeout=30)
    assert (
        fake.objects[("Deployment", "openfx-fn", "info")]["spec"]["template"]["spec"]["containers"][0][
            "image"
        ]
        == "registry.local/info:2"
    )
    assert ("HorizontalPodAutoscaler", "openfx-fn", "info") not in fake.objects  # no max_replicas: no HPA

    stub.Delete(gpb.DeleteFunctionRequest(FunctionName="info"), timeout=30)
    assert not [k for k in fake.objects if k[2] == "info"]
    with pytest.raises(grpc.RpcError) as gone:
        stub.Invoke(gpb.InvokeServiceRequest(Service="info"), timeout=10)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def test_functions_deployed_elsewhere_are_discovered(cluster) -> None:  # type: ignore[no-untyped-def]
    """A Deployment created by another gateway (or kubectl) is served after the next refresh."""
    gw, fake, _ = cluster
    from tests.test_gateway_manage import wait_for

    spec = load_stack(FIXTURES / "stack.yaml").functions["info"]
    for manifest in function_manifests(FunctionDef.from_request(to_request("info", spec))):
        key = (manifest["kind"], "openfx-fn", manifest["metadata"]["name"])
        fake.objects[key] = manifest
    fake.pods_ready("info", 1)
    stub = gw.stub()
    reply = wait_for(lambda: _invoke(stub, "info"), timeout=20, what="discovery")
    assert reply == b"info|grpc||True"
    assert wait_for(lambda: replicas(stub, "info") == (1, 1), what="listed as available")


def replicas(stub, name: str) -> tuple[int, int] | None:  # type: ignore[no-untyped-def]
    """(wanted, available) as the gateway lists them."""
    for f in stub.List(gpb.Empty(), timeout=10).Functions:
        if f.Name == name:
            return f.Replicas, f.AvailableReplicas
    return None


def _ok(stub) -> bool:  # type: ignore[no-untyped-def]
    try:
        return stub.HealthCheck(gpb.Empty(), timeout=2).Msg == b"OK"
    except grpc.RpcError:
        return False


def _invoke(stub, name: str) -> bytes | None:  # type: ignore[no-untyped-def]
    try:
        return stub.Invoke(gpb.InvokeServiceRequest(Service=name), timeout=5).Msg
    except grpc.RpcError:
        return None

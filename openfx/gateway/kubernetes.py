"""Kubernetes backend: functions are Deployments in a namespace, reached at `<fn>.<namespace>:50051`.

Deploy/Update/Delete/ReplicaUpdate/GetLog go through the Kubernetes API (official client,
run in a thread: it is synchronous). Calls go over one persistent gRPC channel per function
with round_robin over the headless Service's pod addresses, so load spreads over replicas
(one HTTP/2 connection through a ClusterIP would pin every call to one pod). The function
list is re-read from the API every few seconds, so functions deployed by another gateway
(or a KETI one) are served too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException

from openfx import defaults
from openfx.errors import InvokeError, not_found
from openfx.function_def import FunctionDef
from openfx.k8s.manifests import FUNCTION_NAMESPACE, LABEL, function_manifests
from openfx.pb import fxgateway_pb2 as gpb
from openfx.pb import fxwatcher_pb2 as wpb
from openfx.pb import fxwatcher_pb2_grpc as wpb_grpc

log = logging.getLogger("openfx.gateway")
DEFAULT_ADDRESS = f"dns:///{{name}}.{{namespace}}.svc.cluster.local:{defaults.WATCHER_PORT}"
REFRESH_SECONDS = 5.0


class ClusterReplica:
    """All pods of one function behind one channel (round_robin over the Service's addresses)."""

    connected = True

    def __init__(self, name: str, address: str, max_message_bytes: int) -> None:
        self.label = f"{name}@{address}"
        self.in_flight = 0
        self.channel = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.lb_policy_name", "round_robin"),
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ],
        )
        self.stub = wpb_grpc.FxWatcherStub(self.channel)

    async def call(self, request: wpb.Request, timeout: float) -> wpb.Reply:
        try:
            return await self.stub.Call(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError from None
            raise InvokeError(exc.code(), exc.details() or exc.code().name) from None

    def stream(self, requests: AsyncIterator[wpb.Request]) -> grpc.aio.StreamStreamCall:
        return self.stub.Calls(requests)


class ClusterFunction:
    def __init__(self, definition: FunctionDef, replica: ClusterReplica) -> None:
        self.definition = definition
        self.replica = replica
        self.invocations = 0
        self.in_flight = 0
        self.desired = definition.replicas
        self.available = 0
        self.last_error = ""

    @property
    def name(self) -> str:
        return self.definition.name

    def pick(self) -> ClusterReplica:
        if self.desired == 0:
            raise InvokeError(grpc.StatusCode.UNAVAILABLE, f"function {self.name} is scaled to zero replicas")
        return self.replica


def _definition(deployment: Any) -> FunctionDef:
    """Read a function back from its Deployment (also one another gateway created)."""
    meta = deployment.metadata
    container = deployment.spec.template.spec.containers[0]
    labels = {k: v for k, v in (meta.labels or {}).items() if k != LABEL}
    request = gpb.CreateFunctionRequest(
        Service=meta.name,
        Image=container.image or "",
        EnvVars={e.name: e.value or "" for e in container.env or []},
        Labels=labels,
        Annotations=meta.annotations or {},
        MinReplicas=deployment.spec.replicas or 0,
        MaxReplicas=max(deployment.spec.replicas or 0, 1),
    )
    return FunctionDef.from_request(request)


class KubernetesBackend:
    mode = "kubernetes"

    def __init__(
        self,
        namespace: str = FUNCTION_NAMESPACE,
        address_template: str = DEFAULT_ADDRESS,
        max_message_bytes: int = 64 * 1024 * 1024,
        api_client: k8s.ApiClient | None = None,
    ) -> None:
        self.namespace = namespace
        self.address_template = address_template
        self.max_message_bytes = max_message_bytes
        if api_client is None:
            try:
                k8s_config.load_incluster_config()
            except k8s_config.ConfigException:
                k8s_config.load_kube_config()
            api_client = k8s.ApiClient()
        self.apps = k8s.AppsV1Api(api_client)
        self.core = k8s.CoreV1Api(api_client)
        self.autoscaling = k8s.AutoscalingV2Api(api_client)
        self.functions: dict[str, ClusterFunction] = {}
        self.on_gauge: object = None
        self._refresher: asyncio.Task[None] | None = None

    # -- the function table ----------------------------------------------------

    def _track(self, definition: FunctionDef) -> ClusterFunction:
        fn = self.functions.get(definition.name)
        if fn is None:
            address = self.address_template.format(name=definition.name, namespace=self.namespace)
            fn = ClusterFunction(definition, ClusterReplica(definition.name, address, self.max_message_bytes))
            self.functions[definition.name] = fn
        else:
            fn.definition = definition
        return fn

    async def refresh(self) -> None:
        deployments = await self._api(
            self.apps.list_namespaced_deployment, self.namespace, label_selector=LABEL
        )
        seen = set()
        for item in deployments.items:
            try:
                fn = self._track(_definition(item))
            except InvokeError as exc:
                log.warning("skipping deployment %s: %s", item.metadata.name, exc.message)
                continue
            fn.desired = item.spec.replicas or 0
            fn.available = (item.status.available_replicas or 0) if item.status else 0
            if callable(self.on_gauge):
                self.on_gauge(fn.name, fn.available)
            seen.add(fn.name)
        for name in set(self.functions) - seen:
            await self._forget(name)

    async def _forget(self, name: str) -> None:
        fn = self.functions.pop(name, None)
        if fn is not None:
            await fn.replica.channel.close()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                await self.refresh()
            except Exception as exc:  # the API server may be briefly away; keep serving what we know
                log.warning("kubernetes: refreshing functions failed: %s", exc)

    async def start(self) -> None:
        await self.refresh()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    def get(self, name: str) -> ClusterFunction:
        fn = self.functions.get(name)
        if fn is None:
            raise not_found(name)
        return fn

    # -- management --------------------------------------------------------------

    async def _api(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(call, *args, **kwargs)
        except ApiException as exc:
            code = {
                404: grpc.StatusCode.NOT_FOUND,
                409: grpc.StatusCode.ALREADY_EXISTS,
                403: grpc.StatusCode.PERMISSION_DENIED,
                422: grpc.StatusCode.INVALID_ARGUMENT,
            }.get(exc.status, grpc.StatusCode.UNAVAILABLE)
            raise InvokeError(code, f"kubernetes API: {exc.status} {exc.reason}") from None
        except Exception as exc:  # unreachable API server, unexpected answer: a status, never a crash
            raise InvokeError(
                grpc.StatusCode.UNAVAILABLE, f"kubernetes API: {type(exc).__name__}: {exc}"
            ) from None

    def _apply_calls(self, kind: str) -> tuple[Any, Any, Any, Any]:
        """create, patch, read and delete for a manifest kind."""
        if kind == "Deployment":
            a = self.apps
            return (
                a.create_namespaced_deployment,
                a.patch_namespaced_deployment,
                a.read_namespaced_deployment,
                a.delete_namespaced_deployment,
            )
        if kind == "Service":
            c = self.core
            return (
                c.create_namespaced_service,
                c.patch_namespaced_service,
                c.read_namespaced_service,
                c.delete_namespaced_service,
            )
        h = self.autoscaling
        return (
            h.create_namespaced_horizontal_pod_autoscaler,
            h.patch_namespaced_horizontal_pod_autoscaler,
            h.read_namespaced_horizontal_pod_autoscaler,
            h.delete_namespaced_horizontal_pod_autoscaler,
        )

    async def deploy(self, definition: FunctionDef) -> None:
        manifests = function_manifests(definition, self.namespace)
        created: list[dict[str, Any]] = []
        try:
            for manifest in manifests:
                create = self._apply_calls(manifest["kind"])[0]
                await self._api(create, self.namespace, manifest)
                created.append(manifest)
        except InvokeError:
            for manifest in reversed(created):  # all or nothing: no half-deployed function left behind
                delete = self._apply_calls(manifest["kind"])[3]
                with contextlib.suppress(InvokeError):
                    await self._api(delete, manifest["metadata"]["name"], self.namespace)
            raise
        self._track(definition).desired = definition.replicas

    async def update(self, definition: FunctionDef) -> None:
        self.get(definition.name) if definition.name in self.functions else await self._require(
            definition.name
        )
        manifests = {m["kind"]: m for m in function_manifests(definition, self.namespace)}
        for kind in ("Deployment", "Service"):
            patch = self._apply_calls(kind)[1]
            await self._api(patch, definition.name, self.namespace, manifests[kind])
        create, patch, _, delete = self._apply_calls("HorizontalPodAutoscaler")
        if "HorizontalPodAutoscaler" in manifests:
            try:
                await self._api(patch, definition.name, self.namespace, manifests["HorizontalPodAutoscaler"])
            except InvokeError as exc:
                if exc.code != grpc.StatusCode.NOT_FOUND:
                    raise
                await self._api(create, self.namespace, manifests["HorizontalPodAutoscaler"])
        else:
            with contextlib.suppress(InvokeError):
                await self._api(delete, definition.name, self.namespace)
        self._track(definition).desired = definition.replicas

    async def _require(self, name: str) -> None:
        deployment = await self._api(self.apps.read_namespaced_deployment, name, self.namespace)
        if LABEL not in (deployment.metadata.labels or {}):
            raise not_found(name)

    async def delete(self, name: str) -> None:
        await self._require(name)
        await self._api(
            self.apps.delete_namespaced_deployment, name, self.namespace, propagation_policy="Foreground"
        )
        for kind in ("Service", "HorizontalPodAutoscaler"):
            with contextlib.suppress(InvokeError):
                await self._api(self._apply_calls(kind)[3], name, self.namespace)
        await self._forget(name)

    async def scale(self, name: str, count: int) -> None:
        await self._api(
            self.apps.patch_namespaced_deployment_scale, name, self.namespace, {"spec": {"replicas": count}}
        )
        if name in self.functions:
            self.functions[name].desired = count

    async def logs(self, name: str) -> str:
        """Each pod's recent output, as OpenFx's GetLog printed it."""
        pods = await self._api(
            self.core.list_namespaced_pod, self.namespace, label_selector=f"{LABEL}={name}"
        )
        if not pods.items and name not in self.functions:
            raise not_found(name)
        parts = []
        for pod in pods.items:
            text = await self._api(
                self.core.read_namespaced_pod_log, pod.metadata.name, self.namespace, tail_lines=200
            )
            parts.append(f"---\nName: {pod.metadata.name}\nLog:\n{text}")
        return "".join(parts)

    async def wait_ready(self, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await self.refresh()
            pending = [f.name for f in self.functions.values() if f.available < f.desired]
            if not pending:
                return []
            await asyncio.sleep(1)
        return [f.name for f in self.functions.values() if f.available < f.desired]

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        for name in list(self.functions):
            await self._forget(name)

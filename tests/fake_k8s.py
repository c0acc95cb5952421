"""A fake of the Kubernetes API at the HTTP level, for the gateway's Kubernetes backend.

No cluster runs here, so this small server answers the REST calls the official client makes
(create/read/list/patch/delete of Deployments, Services, HPAs, the scale subresource, pods and
their logs), keeps the objects in memory and records every request so tests can check exactly
what the gateway asked for. Like a real API server, a Deployment reports only the pods that are
ready as available: none right after it is created or scaled up, until the test says its pods
became ready (`pods_ready`); scaling down takes effect at once.
"""

from __future__ import annotations

import http.server
import json
import re
import threading
from typing import Any

ROUTES = [
    (
        re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments(?:/([^/]+))?(/scale)?$"),
        "Deployment",
        "apps/v1",
    ),
    (re.compile(r"^/api/v1/namespaces/([^/]+)/services(?:/([^/]+))?()$"), "Service", "v1"),
    (
        re.compile(r"^/apis/autoscaling/v2/namespaces/([^/]+)/horizontalpodautoscalers(?:/([^/]+))?()$"),
        "HorizontalPodAutoscaler",
        "autoscaling/v2",
    ),
]
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods(?:/([^/]+)/log)?$")


def merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base.get(k), v) if v is not None else None
        return {k: v for k, v in out.items() if v is not None}
    return patch


class FakeKubernetes:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.ready: dict[tuple[str, str], int] = {}  # (namespace, deployment) -> pods ready
        self.requests: list[tuple[str, str, Any]] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _body(self) -> Any:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length)) if length else None

            def _send(self, status: int, body: Any) -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header(
                    "Content-Type", "text/plain" if isinstance(body, str) else "application/json"
                )
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                path, _, query = self.path.partition("?")
                body = self._body() if method in ("POST", "PUT", "PATCH") else None
                with fake.lock:
                    fake.requests.append((method, self.path, body))
                    status, reply = fake.answer(method, path, query, body)
                self._send(status, reply)

            def do_GET(self) -> None:  # noqa: N802
                self._handle("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._handle("POST")

            def do_PATCH(self) -> None:  # noqa: N802
                self._handle("PATCH")

            def do_PUT(self) -> None:  # noqa: N802
                self._handle("PUT")

            def do_DELETE(self) -> None:  # noqa: N802
                self._handle("DELETE")

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()

    def kubeconfig(self) -> str:
        return (
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
            f"clusters: [{{name: fake, cluster: {{server: '{self.url}'}}}}]\n"
            "users: [{name: fake, user: {}}]\n"
            "contexts: [{name: fake, context: {cluster: fake, user: fake}}]\n"
        )

    @staticmethod
    def _status(code: int, reason: str) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code}

    def pods_ready(self, name: str, count: int, namespace: str = "openfx-fn") -> None:
        """`count` of the Deployment's pods pass their readiness probe."""
        with self.lock:
            self.ready[(namespace, name)] = count

    def _with_status(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        if kind == "Deployment":
            ns, name = obj["metadata"].get("namespace", "openfx-fn"), obj["metadata"]["name"]
            replicas = obj["spec"].get("replicas", 1)
            ready = min(replicas, self.ready.get((ns, name), 0))
            status: dict[str, Any] = {"replicas": replicas, "unavailableReplicas": replicas - ready}
            if ready:  # the API leaves the field out when it is zero
                status |= {"readyReplicas": ready, "availableReplicas": ready}
            obj = {**obj, "status": status}
        return obj

    def answer(self, method: str, path: str, query: str, body: Any) -> tuple[int, Any]:
        pods = PODS.match(path)
        if pods:
            ns, pod = pods.groups()
            if pod:
                return 200, f"log line from {pod}\n"
            selector = dict(p.split("=", 1) for p in query.split("&") if p.startswith("labelSelector="))
            want = selector.get("labelSelector", "").replace("%3D", "=").split("=")[-1]
            items = [
                {"metadata": {"name": f"{name}-7c9d-abcde", "namespace": ns, "labels": {"openfx_fn": name}}}
                for (kind, n, name) in self.objects
                if kind == "Deployment" and n == ns and name == want
            ]
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}
        for pattern, kind, api_version in ROUTES:
            match = pattern.match(path)
            if not match:
                continue
            ns, name, scale = match.groups()
            key = (kind, ns, name or "")
            if name is None:
                if method == "POST":
                    key = (kind, ns, body["metadata"]["name"])
                    if key in self.objects:
                        return 409, self._status(409, "AlreadyExists")
                    self.objects[key] = body
                    return 201, self._with_status(kind, body)
                items = [
                    self._with_status(kind, o)
                    for (k, n, _), o in self.objects.items()
                    if k == kind and n == ns
                ]
                return 200, {"kind": f"{kind}List", "apiVersion": api_version, "metadata": {}, "items": items}
            if key not in self.objects:
                return 404, self._status(404, "NotFound")
            if method == "DELETE":
                deleted = self.objects.pop(key)
                self.ready.pop((ns, name), None)
                if kind == "Service":
                    return 200, deleted  # the API answers a Service delete with the Service
                return 200, self._status(200, "Deleted") | {"status": "Success"}
            if scale:
                if method == "PATCH":
                    self.objects[key]["spec"]["replicas"] = body["spec"]["replicas"]
                replicas = self.objects[key]["spec"]["replicas"]
                return 200, {
                    "kind": "Scale",
                    "apiVersion": "autoscaling/v1",
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {"replicas": replicas},
                    "status": {"replicas": replicas},
                }
            if method == "PATCH":
                self.objects[key] = merge(self.objects[key], body)
            return 200, self._with_status(kind, self.objects[key])
        return 404, self._status(404, "NotFound")

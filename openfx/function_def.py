"""What a Deploy/Update request carries, in both directions.

`CreateFunctionRequest` (OpenFx's message) has no fields for our additions, so
they travel as annotations under the `openfx.` prefix: the function's source
folder and handler (how an embedded gateway starts it without an image), its
timeout and its in-flight limit. A KETI gateway stores annotations and ignores
them, so the same request deploys there too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from openfx import defaults
from openfx.config import CONCURRENCY_TARGET as CONCURRENCY_TARGET_DEFAULT
from openfx.config import NAME_RE, FunctionSpec
from openfx.config import STABLE_WINDOW as STABLE_WINDOW_DEFAULT
from openfx.errors import InvokeError
from openfx.pb import fxgateway_pb2 as gpb

SOURCE = "openfx.source"
HANDLER_FILE = "openfx.handler.file"
HANDLER_NAME = "openfx.handler.name"
TIMEOUT = "openfx.timeout"
MAX_INFLIGHT = "openfx.max_inflight"
MAX_REQUEST_BYTES = "openfx.max_request_bytes"
# autoscaling (MinReplicas/MaxReplicas carry the bounds): the starting count and the autoscaler's knobs
REPLICAS = "openfx.replicas"
CONCURRENCY_TARGET = "openfx.concurrency_target"
SCALE_TO_ZERO_AFTER = "openfx.scale_to_zero_after"
STABLE_WINDOW = "openfx.stable_window"
# ReplicaUpdate's Replicas (uint64) at its maximum, -1 as a uint64: give a pinned count back to the
# autoscaler (`openfx-cli fn scale NAME --auto`); any count up to MAX_REPLICAS pins it
SCALE_AUTO = 2**64 - 1

# Caps on what one Deploy may ask for: replicas are processes (the scale route has the same cap),
# and the environment is passed to exec, which refuses past the kernel's argument limits.
MAX_REPLICAS = defaults.MAX_REPLICAS
MAX_ENV_VARS = 256
MAX_ENV_VALUE_BYTES = 32 * 1024
MAX_ENV_TOTAL_BYTES = 256 * 1024
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
HANDLER_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_replicas(count: int, what: str = "replicas") -> None:
    if not 0 <= count <= MAX_REPLICAS:
        raise InvokeError(
            grpc.StatusCode.INVALID_ARGUMENT, f"{what} must be between 0 and {MAX_REPLICAS}, got {count}"
        )


def _check_env(env: dict[str, str]) -> None:
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if len(env) > MAX_ENV_VARS:
        raise InvokeError(bad, f"{len(env)} environment variables; at most {MAX_ENV_VARS}")
    total = 0
    for key, value in env.items():
        if not ENV_NAME_RE.match(key):
            raise InvokeError(bad, f"environment variable name {key[:64]!r} is not a valid name")
        if "\0" in value:
            raise InvokeError(bad, f"environment variable {key} holds a NUL byte")
        size = len(key.encode()) + len(value.encode()) + 2
        if size > MAX_ENV_VALUE_BYTES:
            raise InvokeError(bad, f"variable {key} is {size} bytes; at most {MAX_ENV_VALUE_BYTES}")
        total += size
    if total > MAX_ENV_TOTAL_BYTES:
        raise InvokeError(bad, f"environment of {total} bytes; at most {MAX_ENV_TOTAL_BYTES} in all")


def _check_handler(file: str, name: str) -> None:
    bad = grpc.StatusCode.INVALID_ARGUMENT
    parts = Path(file).parts
    if not file or Path(file).is_absolute() or ".." in parts:
        raise InvokeError(bad, f"{HANDLER_FILE} must be a path inside the source folder, got {file!r}")
    if not HANDLER_NAME_RE.match(name):
        raise InvokeError(bad, f"{HANDLER_NAME} must be a Python name, got {name!r}")


def to_request(name: str, spec: FunctionSpec) -> gpb.CreateFunctionRequest:
    from openfx import triggers  # late, here and in from_request: the schedule trigger imports us

    annotations = {
        SOURCE: str(spec.handler_dir),
        HANDLER_FILE: spec.handler.file,
        HANDLER_NAME: spec.handler.name,
        TIMEOUT: repr(spec.timeout),
        MAX_INFLIGHT: str(spec.max_inflight),
    }
    if spec.max_request_bytes:
        annotations[MAX_REQUEST_BYTES] = str(spec.max_request_bytes)
    annotations.update(triggers.function_annotations(spec))  # a schedule, ...
    if spec.max_count > spec.min_count or spec.scale_to_zero_after:
        annotations[REPLICAS] = str(spec.replicas)
        annotations[CONCURRENCY_TARGET] = repr(spec.concurrency_target)
        annotations[STABLE_WINDOW] = repr(spec.stable_window)
        if spec.scale_to_zero_after:
            annotations[SCALE_TO_ZERO_AFTER] = repr(spec.scale_to_zero_after)
    if spec.desc:
        annotations["desc"] = spec.desc
    if spec.maintainer:
        annotations["maintainer"] = spec.maintainer
    return gpb.CreateFunctionRequest(
        Service=name,
        Image=spec.image or name,
        EnvVars=spec.environment,
        Labels=spec.labels,
        Annotations=annotations,
        Constraints=spec.constraints,
        Secrets=spec.secrets,
        RegistryAuth=spec.registry_auth,
        Limits=gpb.FunctionResources(Memory=spec.limits.memory, CPU=spec.limits.cpu, GPU=spec.limits.gpu),
        Requests=gpb.FunctionResources(
            Memory=spec.requests.memory, CPU=spec.requests.cpu, GPU=spec.requests.gpu
        ),
        MinReplicas=spec.min_count,
        MaxReplicas=spec.max_count,
    )


@dataclass
class FunctionDef:
    """A deployed function as the gateway keeps it."""

    name: str
    image: str
    handler_dir: Path | None
    handler_file: str = "handler.py"
    handler_name: str = "Handler"
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    timeout: float = defaults.TIMEOUT_SECONDS
    max_inflight: int = 100
    replicas: int = 1
    max_request_bytes: int = 0  # 0: only the gateway-wide message limit
    max_replicas: int = 1
    min_replicas: int = 1
    concurrency_target: float = CONCURRENCY_TARGET_DEFAULT
    scale_to_zero_after: float = 0.0  # 0: never
    stable_window: float = STABLE_WINDOW_DEFAULT
    limits: dict[str, str] = field(default_factory=dict)
    requests: dict[str, str] = field(default_factory=dict)

    @property
    def autoscaling(self) -> bool:
        """The embedded gateway moves the count within [min_replicas, max_replicas] by load."""
        return self.max_replicas > self.min_replicas or self.scale_to_zero_after > 0

    @classmethod
    def from_request(cls, req: gpb.CreateFunctionRequest) -> FunctionDef:
        from openfx import triggers

        bad = grpc.StatusCode.INVALID_ARGUMENT
        if not NAME_RE.match(req.Service):
            raise InvokeError(
                bad,
                f"invalid function name {req.Service[:80]!r}: at most 63 lower-case letters, digits and '-'",
            )
        ann = dict(req.Annotations)
        try:
            timeout = float(ann.get(TIMEOUT, defaults.TIMEOUT_SECONDS))
            max_inflight = int(ann.get(MAX_INFLIGHT, defaults.MAX_INFLIGHT))
            max_request_bytes = int(ann.get(MAX_REQUEST_BYTES, "0"))
            target = float(ann.get(CONCURRENCY_TARGET, CONCURRENCY_TARGET_DEFAULT))
            to_zero = float(ann.get(SCALE_TO_ZERO_AFTER, "0"))
            window = float(ann.get(STABLE_WINDOW, STABLE_WINDOW_DEFAULT))
            starting = int(ann[REPLICAS]) if REPLICAS in ann else None
        except ValueError as exc:
            raise InvokeError(bad, f"bad annotation: {exc}") from None
        if timeout <= 0 or max_inflight < 1 or max_request_bytes < 0:
            raise InvokeError(bad, f"{TIMEOUT} must be > 0 and {MAX_INFLIGHT} >= 1")
        if not (target > 0 and to_zero >= 0 and window >= 0) or target != target:
            raise InvokeError(
                bad, f"{CONCURRENCY_TARGET} must be > 0, {SCALE_TO_ZERO_AFTER} and {STABLE_WINDOW} >= 0"
            )
        check_replicas(req.MinReplicas, "MinReplicas")
        check_replicas(req.MaxReplicas, "MaxReplicas")
        _check_env(dict(req.EnvVars))
        _check_handler(ann.get(HANDLER_FILE, "handler.py"), ann.get(HANDLER_NAME, "Handler"))
        if problem := triggers.annotation_problem(ann):
            raise InvokeError(bad, problem)
        if starting is not None:
            check_replicas(starting, REPLICAS)
        source = ann.get(SOURCE)
        # without openfx.replicas (KETI's CLI, older ones): MinReplicas is the fixed count, as before
        low = req.MinReplicas if req.MinReplicas or req.MaxReplicas else 1
        high = max(req.MaxReplicas, req.MinReplicas, 1)
        if starting is None:
            starting = low
        return cls(
            name=req.Service,
            image=req.Image,
            handler_dir=Path(source) if source else None,
            handler_file=ann.get(HANDLER_FILE, "handler.py"),
            handler_name=ann.get(HANDLER_NAME, "Handler"),
            env=dict(req.EnvVars),
            labels=dict(req.Labels),
            annotations=ann,
            timeout=timeout,
            max_inflight=max_inflight,
            max_request_bytes=max_request_bytes,
            replicas=min(max(starting, low), high),
            min_replicas=low,
            max_replicas=high,
            concurrency_target=target,
            scale_to_zero_after=to_zero if low == 0 else 0.0,
            stable_window=window,
            limits={"memory": req.Limits.Memory, "cpu": req.Limits.CPU, "gpu": req.Limits.GPU},
            requests={"memory": req.Requests.Memory, "cpu": req.Requests.CPU, "gpu": req.Requests.GPU},
        )

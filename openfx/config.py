"""openfx-cli config files (`functions/<name>/config.yaml`) and the stack file (`openfx.yaml`).

The schema is OpenFx's (openfx-cli's config.yaml); keys we add (timeout,
max_inflight, replicas, include) are additions, never renames. An unknown key is
a one-line error naming the key and the file, because a typo silently ignored is
a function deployed without its setting.

Trigger kinds bring keys of their own (`mqtt:` in the stack file, `schedule:` in a function's
config): each kind declares them as models in openfx/triggers (`Trigger.stack_key`/`stack_model`,
`Trigger.function_keys`), and `load_stack` validates with `FunctionSpec` and `StackFile` extended
by every kind in `KINDS`, so adding a kind needs no edit here.
"""

from __future__ import annotations

import functools
import glob
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from openfx import defaults

# a DNS label (Kubernetes Service names, Unix socket paths stay short): at most 63 characters
NAME_RE = re.compile(r"^(?=.{1,63}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DEFAULT_GATEWAY = defaults.GATEWAY_GRPC
CONCURRENCY_TARGET = 10.0  # autoscaling: calls in flight per replica it aims for (Knative's is 100)
STABLE_WINDOW = 60.0  # autoscaling: load under the target this long before replicas are removed


class ConfigError(Exception):
    """A config file is missing, unreadable or invalid; the message is one line."""


class Strict(BaseModel):
    """Every model of a config file, trigger kinds' included: an unknown key is an error."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class HandlerSpec(Strict):
    dir: str = "./src"
    file: str = "handler.py"
    name: str = "Handler"


class Resources(Strict):
    memory: str = ""
    cpu: str = ""
    gpu: str = ""


def _seconds(value: Any) -> float:
    """Accept 30, 30.5, "30s", "500ms", "2m" (Go-style durations like OpenFx's INVOKE_TIMEOUT)."""
    if isinstance(value, (int, float)):
        return float(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*", str(value))
    if not match:
        raise ValueError(f"not a duration: {value!r} (use e.g. 30, '30s', '500ms', '2m')")
    number, unit = float(match.group(1)), match.group(2) or "s"
    return number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


class FunctionSpec(Strict):
    runtime: str = "python3"
    desc: str = ""
    maintainer: str = ""
    handler: HandlerSpec = Field(default_factory=HandlerSpec)
    docker_registry: str = ""
    image: str = ""
    registry_auth: str = ""
    environment: dict[str, str] = Field(default_factory=dict)
    environment_file: list[str] = Field(default_factory=list)
    secrets: list[str] = Field(default_factory=list)
    constraints: list[str] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    limits: Resources = Field(default_factory=Resources)
    requests: Resources = Field(default_factory=Resources)
    build_options: list[str] = Field(default_factory=list)
    build_args: list[str] = Field(default_factory=list)
    # additions
    timeout: float = defaults.TIMEOUT_SECONDS
    max_inflight: int = Field(default=defaults.MAX_INFLIGHT, ge=1)
    replicas: int = Field(default=1, ge=0)  # the count it starts with (and keeps, autoscaling off)
    # autoscaling (README "Scaling"): on when max_replicas > min_replicas, or with scale_to_zero_after;
    # min/max default to replicas (0 for min with scale_to_zero_after); cluster mode maps them to an HPA
    min_replicas: int | None = Field(default=None, ge=0, le=defaults.MAX_REPLICAS)
    max_replicas: int = Field(default=0, ge=0, le=defaults.MAX_REPLICAS)  # 0: replicas
    concurrency_target: float = Field(default=CONCURRENCY_TARGET, gt=0)  # in flight per replica
    scale_to_zero_after: float = 0.0  # idle this long -> zero replicas (0: never)
    stable_window: float = STABLE_WINDOW  # load this long under the target before scaling down
    max_request_bytes: int = Field(default=0, ge=0)  # 0: only the gateway-wide limit
    # each trigger kind's keys (schedule, ...) come from its Trigger.function_keys: see function_spec_model

    # filled in by the loader: the folder the config file lives in
    base_dir: Path = Field(default=Path("."), exclude=True)

    @field_validator("timeout", mode="before")
    @classmethod
    def _parse_timeout(cls, value: Any) -> float:
        seconds = _seconds(value)
        if seconds <= 0:
            raise ValueError("timeout must be positive")
        return seconds

    @field_validator("scale_to_zero_after", "stable_window", mode="before")
    @classmethod
    def _parse_window(cls, value: Any) -> float:
        seconds = _seconds(value)
        if seconds < 0:
            raise ValueError("must not be negative")
        return seconds

    @model_validator(mode="after")
    def _check_scaling(self) -> FunctionSpec:
        if self.scale_to_zero_after and self.min_replicas:
            raise ValueError("scale_to_zero_after needs min_replicas: 0 (or unset)")
        if self.max_replicas and self.max_replicas < self.min_count:
            raise ValueError(f"max_replicas {self.max_replicas} is below min_replicas {self.min_count}")
        return self

    @property
    def min_count(self) -> int:
        """min_replicas as meant: 0 with scale_to_zero_after, else the starting count."""
        if self.min_replicas is not None:
            return self.min_replicas
        return 0 if self.scale_to_zero_after else self.replicas

    @property
    def max_count(self) -> int:
        return max(self.max_replicas or self.replicas, self.min_count, 1)

    @field_validator("environment", mode="before")
    @classmethod
    def _stringify_env(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): "" if v is None else str(v) for k, v in value.items()}
        return value

    @property
    def handler_dir(self) -> Path:
        return (self.base_dir / self.handler.dir).resolve()

    @property
    def handler_file(self) -> Path:
        return self.handler_dir / self.handler.file

    @property
    def source_dir(self) -> Path:
        """The function folder (the handler dir's parent, as OpenFx's build context)."""
        return self.handler_dir.parent


class GatewaySpec(Strict):
    gateway: str = DEFAULT_GATEWAY
    token_file: str | None = None  # a file holding the CLI's bearer token (never the token itself)
    tls_ca: str | None = None  # CA certificate to reach a gateway over TLS


class StackFile(Strict):
    functions: dict[str, FunctionSpec] = Field(default_factory=dict)
    openfx: GatewaySpec = Field(default_factory=GatewaySpec)
    include: list[str] = Field(default_factory=list)
    # each trigger kind's key (mqtt, ...) comes from its Trigger.stack_key: see stack_file_model

    if TYPE_CHECKING:  # so `stack.mqtt` type-checks: the kinds' keys are added at run time

        def __getattr__(self, name: str) -> Any: ...


def _trigger_kinds() -> tuple[Any, ...]:
    """The registered trigger kinds, imported late: their modules import this one for its models."""
    from openfx.triggers import KINDS

    return tuple(KINDS.values())


@functools.lru_cache(maxsize=8)
def _models(kinds: tuple[Any, ...]) -> tuple[type[FunctionSpec], type[StackFile]]:
    keys = tuple(kind.function_keys for kind in kinds if kind.function_keys is not None)
    function = create_model("FunctionSpec", __base__=(FunctionSpec, *keys), __module__=__name__)
    stack_keys: dict[str, Any] = {
        kind.stack_key: (kind.stack_model | None, None) for kind in kinds if kind.stack_key is not None
    }
    stack = create_model("StackFile", __base__=StackFile, __module__=__name__, **stack_keys)
    return function, stack


def function_spec_model() -> type[FunctionSpec]:
    """FunctionSpec with every trigger kind's per-function keys (a subclass of each kind's model)."""
    return _models(_trigger_kinds())[0]


def stack_file_model() -> type[StackFile]:
    """StackFile with every trigger kind's stack-file key (None when the file leaves it out)."""
    return _models(_trigger_kinds())[1]


def yaml_error(path: Path | str, exc: yaml.YAMLError) -> ConfigError:
    """PyYAML's message spans several lines; every config error is one line with the place."""
    mark = getattr(exc, "problem_mark", None)
    where = f" line {mark.line + 1}" if mark else ""
    problem = getattr(exc, "problem", None)
    if problem is None and isinstance(exc, yaml.reader.ReaderError):  # a character YAML refuses
        where = f" character {exc.position + 1}"
        problem = f"{exc.reason}: {chr(exc.character)!r}" if isinstance(exc.character, int) else exc.reason
    return ConfigError(f"{path}:{where} not valid YAML ({problem or 'parse error'})")


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping file; a missing file, a YAML error or another shape is one ConfigError line."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise yaml_error(path, exc) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _explain(path: Path, exc: ValidationError) -> ConfigError:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return ConfigError(f"{path}: unknown key '{where}'")
    return ConfigError(f"{path}: '{where}': {err['msg']}")


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_stack(path: str | Path) -> StackFile:
    """Load a config or stack file; `include` globs pull in per-function config files,
    whose entries the including file's own `functions` keys override."""
    path = Path(path).resolve()
    data = read_yaml(path)
    raw_functions: dict[str, tuple[dict[str, Any], Path]] = {}
    for pattern in data.get("include") or []:
        matches = sorted(glob.glob(str(path.parent / pattern)))
        if not matches:
            raise ConfigError(f"{path}: include '{pattern}' matches no file")
        for match in matches:
            included = read_yaml(Path(match))
            for name, spec in (included.get("functions") or {}).items():
                raw_functions[name] = (spec or {}, Path(match).parent)
    for name, spec in (data.get("functions") or {}).items():
        if name in raw_functions:
            base, folder = raw_functions[name]
            raw_functions[name] = (_merge(base, spec or {}), folder)
        else:
            raw_functions[name] = (spec or {}, path.parent)
    function_model = function_spec_model()
    try:
        stack = stack_file_model().model_validate({**data, "functions": {}})
        for name, (spec, folder) in raw_functions.items():
            if not NAME_RE.match(name):
                raise ConfigError(f"{path}: function name {name!r} must match {NAME_RE.pattern}")
            stack.functions[name] = function_model.model_validate({**spec, "base_dir": folder})
    except ValidationError as exc:
        raise _explain(path, exc) from None
    for name, fn in stack.functions.items():
        for env_file in fn.environment_file:
            extra = read_yaml(fn.base_dir / env_file).get("environment") or {}
            fn.environment.update({str(k): str(v) for k, v in extra.items()})
        if not fn.image:
            fn.image = f"{fn.docker_registry}/{name}" if fn.docker_registry else name
    return stack

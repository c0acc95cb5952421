"""A trigger kind is added inside openfx/triggers alone: a toy kind registered here (in KINDS, as a
new module would be) gets its stack-file key and function keys accepted by the config loader,
its keys carried and checked in a Deploy, and its /metrics in the Prometheus config, with no
edit to config.py, function_def.py or observability.py. The real kinds go through the same path."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import grpc
import pytest
import yaml

from openfx.config import ConfigError, FunctionSpec, StackFile, Strict, load_stack
from openfx.errors import InvokeError
from openfx.function_def import FunctionDef, to_request
from openfx.k8s.observability import embedded_prometheus_config
from openfx.triggers import KINDS, PlatformContext, Trigger, scrape_targets

EVERY = "openfx.toy.every"


class ToyKeys(Strict):
    toy_every: int | None = None  # a function's key
    toy_topic: str = "toys"


class ToySpec(Strict):
    metrics_address: str = ""  # the stack file's `toy:`


class ToyTrigger(Trigger):
    kind = "toy"
    stack_key = "toy"
    stack_model = ToySpec
    function_keys = ToyKeys

    @classmethod
    def from_stack(cls, context: PlatformContext) -> ToyTrigger | None:
        return None

    async def start(self) -> None:
        self.ready.set()

    async def stop(self) -> None:
        pass

    def describe(self) -> str:
        return "toy"

    @classmethod
    def annotations(cls, spec: FunctionSpec) -> dict[str, str]:
        assert isinstance(spec, ToyKeys)
        return {EVERY: str(spec.toy_every)} if spec.toy_every is not None else {}

    @classmethod
    def check_annotations(cls, annotations: Mapping[str, str]) -> str | None:
        value = annotations.get(EVERY)
        return f"{EVERY} must be a whole number, got {value!r}" if value and not value.isdigit() else None

    @classmethod
    def scrape_targets(cls, stack: StackFile, stack_path: Path) -> dict[str, str]:
        spec = cls.stack_spec(stack)
        return {"toy-trigger": spec.metrics_address} if spec is not None else {}


STACK = (
    "toy: {metrics_address: '127.0.0.1:9411'}\n"
    "functions:\n"
    "  ticker:\n"
    "    handler: {dir: ./src}\n"
    "    toy_every: 3\n"
    "    schedule: '* * * * * *'\n"  # the real kinds' keys stay accepted beside it
)


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(KINDS, "toy", ToyTrigger)


def test_without_the_kind_its_keys_are_unknown(tmp_path: Path) -> None:
    (tmp_path / "stack.yaml").write_text(STACK)
    with pytest.raises(ConfigError, match="unknown key 'toy'"):
        load_stack(tmp_path / "stack.yaml")


def test_a_registered_kind_s_keys_are_accepted_carried_checked_and_scraped(toy: None, tmp_path: Path) -> None:
    (tmp_path / "stack.yaml").write_text(STACK)
    stack = load_stack(tmp_path / "stack.yaml")
    spec = stack.functions["ticker"]
    assert isinstance(spec, ToyKeys) and spec.toy_every == 3 and spec.toy_topic == "toys"
    assert stack.toy == ToySpec(metrics_address="127.0.0.1:9411")
    assert stack.mqtt is None  # an absent kind's key: None, as before

    request = to_request("ticker", spec)
    assert request.Annotations[EVERY] == "3" and request.Annotations["openfx.schedule"] == "* * * * * *"
    assert FunctionDef.from_request(request).name == "ticker"
    request.Annotations[EVERY] = "soon"
    with pytest.raises(InvokeError) as refused:
        FunctionDef.from_request(request)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.message == "openfx.toy.every must be a whole number, got 'soon'"

    config = embedded_prometheus_config("127.0.0.1:31114", scrape_targets(stack, tmp_path / "stack.yaml"))
    jobs = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert jobs == {"fxgateway": ["127.0.0.1:31114"], "toy-trigger": ["127.0.0.1:9411"]}


def test_a_kind_s_keys_are_validated_by_its_model(toy: None, tmp_path: Path) -> None:
    (tmp_path / "stack.yaml").write_text(STACK.replace("toy_every: 3", "toy_every: often"))
    with pytest.raises(ConfigError, match="'toy_every': Input should be a valid integer"):
        load_stack(tmp_path / "stack.yaml")
    (tmp_path / "stack.yaml").write_text(STACK.replace("metrics_address:", "metrics_adress:"))
    with pytest.raises(ConfigError, match="unknown key 'toy.metrics_adress'"):
        load_stack(tmp_path / "stack.yaml")


def test_the_mqtt_kind_names_its_bridge_s_metrics(tmp_path: Path) -> None:
    bridge = yaml.safe_load((Path(__file__).parent.parent / "broker" / "bridge.yaml").read_text())
    (tmp_path / "bridge.yaml").write_text(yaml.safe_dump({**bridge, "metrics_address": "127.0.0.1:9412"}))
    (tmp_path / "stack.yaml").write_text("mqtt: {bridge: bridge.yaml}\n")
    stack = load_stack(tmp_path / "stack.yaml")
    targets = scrape_targets(stack, tmp_path / "stack.yaml")
    assert targets == {"mqtt-bridge": "127.0.0.1:9412"}
    jobs = embedded_prometheus_config("gw:1", targets)["scrape_configs"]
    assert [(j["job_name"], j["static_configs"][0]["targets"]) for j in jobs] == [
        ("fxgateway", ["gw:1"]),
        ("mqtt-bridge", ["127.0.0.1:9412"]),
    ]
    stack.mqtt.enabled = False
    assert scrape_targets(stack, tmp_path / "stack.yaml") == {}

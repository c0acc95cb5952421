"""Serverless scaling in the embedded platform, end to end (real gateway, real watcher processes):
the autoscaler follows load within [min, max], idle functions go to zero, the first call after zero
waits for a replica (the activator), a pinned count holds until released. Every wait polls the
gateway's own state (GetMeta, /metrics) with a bounded deadline."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import requests
from pydantic import ValidationError

from openfx.config import FunctionSpec, load_stack
from openfx.errors import InvokeError
from openfx.function_def import REPLICAS, SCALE_AUTO, FunctionDef, to_request
from openfx.pb import fxgateway_pb2 as gpb
from tests.conftest import ADMIN_HEADERS, FIXTURES, ROOT, RunningGateway, eventually, start_gateway
from tests.shared_tmp import shared_tmp
from tests.test_cli import cli


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    gateway = start_gateway(FIXTURES / "autoscale.yaml", tmp_path_factory.mktemp("gw") / "gateway.log")
    try:
        gateway.wait_ready(names={"burst", "idle", "twin", "fixed", "streamy", "solo"})
        yield gateway
    finally:
        gateway.stop()


def meta(gw: RunningGateway, name: str) -> gpb.Function:
    return gw.stub().GetMeta(gpb.FunctionRequest(FunctionName=name), timeout=5)


def counts(gw: RunningGateway, name: str) -> tuple[int, int]:
    """(desired, ready) replicas as GetMeta reports them."""
    fn = meta(gw, name)
    return fn.Replicas, fn.AvailableReplicas


def call(gw: RunningGateway, name: str, data: bytes = b"pid", timeout: float = 30) -> bytes:
    return gw.stub().Invoke(gpb.InvokeServiceRequest(Service=name, Input=data), timeout=timeout).Msg


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 60) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def metric(gw: RunningGateway, name: str, **labels: str) -> float:
    text = requests.get(f"{gw.http_url}/metrics", timeout=5).text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    return 0.0


def test_a_burst_adds_replicas_and_they_go_when_load_falls(gw: RunningGateway) -> None:
    assert counts(gw, "burst") == (1, 1)
    assert meta(gw, "burst").Annotations["openfx.scaling"].startswith("auto 1..3")
    stop = threading.Event()
    seen: list[int] = []

    def load() -> None:
        while not stop.is_set():
            call(gw, "burst", b"x")

    with ThreadPoolExecutor(6) as pool:
        workers = [pool.submit(load) for _ in range(6)]
        try:
            wait_for(lambda: seen.append(counts(gw, "burst")[1]) or seen[-1] >= 2, "a second ready replica")
        finally:
            stop.set()
        for worker in workers:
            worker.result()
    assert counts(gw, "burst")[0] <= 3  # never above max_replicas
    wait_for(lambda: counts(gw, "burst") == (1, 1), "back to min_replicas once the load is gone")
    assert metric(gw, "gateway_scale_events_total", function_name="burst", event="up") >= 1
    assert metric(gw, "gateway_scale_events_total", function_name="burst", event="down") >= 1
    assert metric(gw, "gateway_service_desired_count", function_name="burst") == 1
    assert "calls in flight" in gw.log() and "above the target of 1" in gw.log()  # the log says why


def test_an_idle_function_goes_to_zero_and_the_next_call_is_answered(gw: RunningGateway) -> None:
    wait_for(lambda: counts(gw, "idle") == (0, 0), "idle scaled to zero")
    assert "no call for" in gw.log()
    assert call(gw, "idle", b"hello") == b"hello"  # waits for the replica it starts
    assert counts(gw, "idle") == (1, 1)
    assert metric(gw, "gateway_scale_events_total", function_name="idle", event="zero") >= 1
    assert metric(gw, "gateway_scale_events_total", function_name="idle", event="activate") >= 1
    # over HTTP too: the same activator
    wait_for(lambda: counts(gw, "idle") == (0, 0), "idle scaled to zero again")
    assert requests.post(f"{gw.http_url}/function/idle", data=b"again", timeout=30).content == b"again"


def test_concurrent_cold_calls_share_one_start(gw: RunningGateway) -> None:
    assert counts(gw, "cold") == (0, 0)
    with ThreadPoolExecutor(8) as pool:
        pids = list(pool.map(lambda _: call(gw, "cold"), range(8)))
    assert len(set(pids)) == 1  # one replica answered them all
    assert counts(gw, "cold") == (1, 1)
    assert metric(gw, "gateway_scale_events_total", function_name="cold", event="activate") == 1


def test_a_deadline_shorter_than_the_cold_start_and_the_replica_still_comes_up(gw: RunningGateway) -> None:
    assert counts(gw, "colder") == (0, 0)
    with pytest.raises(grpc.RpcError) as err:
        call(gw, "colder", timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: counts(gw, "colder") == (1, 1), "the replica up after the caller left")
    assert call(gw, "colder", b"warm") == b"warm"


def test_a_function_that_cannot_start_answers_unavailable_with_the_reason(gw: RunningGateway) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call(gw, "broken")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "module_that_does_not_exist" in (err.value.details() or "")


def test_a_pinned_count_holds_until_released(gw: RunningGateway) -> None:
    stub = gw.stub()
    stub.ReplicaUpdate(gpb.ScaleServiceRequest(ServiceName="twin", Replicas=2), timeout=30)
    wait_for(lambda: counts(gw, "twin") == (2, 2), "twin pinned at 2")
    assert meta(gw, "twin").Annotations["openfx.scaling"].startswith("pinned at 2")
    # idle, like its twin, which goes to zero: the pinned one stays
    call(gw, "idle")
    wait_for(lambda: counts(gw, "idle") == (0, 0), "idle, unpinned, at zero")
    assert counts(gw, "twin") == (2, 2)
    stub.ReplicaUpdate(gpb.ScaleServiceRequest(ServiceName="twin", Replicas=SCALE_AUTO), timeout=30)
    wait_for(lambda: counts(gw, "twin") == (0, 0), "twin back to the autoscaler, at zero")
    # the REST route takes the same value
    body = {"ServiceName": "twin", "Replicas": "1"}
    reply = requests.put(f"{gw.http_url}/system/scale-function", json=body, headers=ADMIN_HEADERS, timeout=30)
    assert reply.status_code == 200, reply.text
    wait_for(lambda: counts(gw, "twin") == (1, 1), "twin pinned at 1 over REST")
    body["Replicas"] = str(SCALE_AUTO)
    reply = requests.put(f"{gw.http_url}/system/scale-function", json=body, headers=ADMIN_HEADERS, timeout=30)
    assert reply.status_code == 200, reply.text
    wait_for(lambda: counts(gw, "twin") == (0, 0), "twin released over REST")


def test_without_scaling_keys_the_count_is_fixed(gw: RunningGateway) -> None:
    fn = meta(gw, "fixed")
    assert (fn.Replicas, fn.AvailableReplicas) == (1, 1)
    assert fn.Annotations["openfx.scaling"] == "fixed"
    # idle longer than the idle function needs to reach zero: still one replica
    call(gw, "idle")
    wait_for(lambda: counts(gw, "idle") == (0, 0), "idle at zero")
    assert counts(gw, "fixed") == (1, 1)


def test_releasing_a_pin_on_a_fixed_function_goes_back_to_its_configured_count(gw: RunningGateway) -> None:
    """Without a [min, max] range no autoscaler takes a released count back: the release itself
    returns it to the config's (it stayed at the pinned 2 while `fn info` said fixed)."""
    where = ("-g", gw.grpc_address)
    gw.stub().ReplicaUpdate(gpb.ScaleServiceRequest(ServiceName="fixed", Replicas=2), timeout=30)
    eventually(lambda: counts(gw, "fixed") == (2, 2), "fixed pinned at 2")
    out = cli("fn", "scale", "fixed", "--auto", *where, env=gw.admin_env)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"fixed: released the pinned count of 2; back to the configured 1\n"
    eventually(lambda: counts(gw, "fixed") == (1, 1), "fixed back at its configured 1")
    assert meta(gw, "fixed").Annotations["openfx.scaling"] == "fixed"
    assert "fixed: released the pinned count of 2; back to the configured 1" in gw.log()
    again = cli("fn", "scale", "fixed", "--auto", *where, env=gw.admin_env)  # nothing to release
    assert again.returncode == 0 and again.stdout == b"fixed: not pinned; fixed at 1\n", again.stderr
    assert counts(gw, "fixed") == (1, 1)


def test_a_stream_after_zero_starts_a_replica(gw: RunningGateway) -> None:
    wait_for(lambda: counts(gw, "streamy") == (0, 0), "streamy at zero")
    frames = (gpb.InvokeServiceRequest(Service="streamy", Input=x) for x in (b"a", b"b", b"c"))
    outputs = [m.Output for m in gw.stub().Invokes(frames, timeout=30)]
    assert outputs == [b"a", b"b", b"c"]


def test_the_cli_pins_releases_and_shows_the_scaling(gw: RunningGateway) -> None:
    where = ("-g", gw.grpc_address)
    out = cli("fn", "scale", "solo", "2", *where, env=gw.admin_env)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: counts(gw, "solo") == (2, 2), "solo pinned at 2")
    info = cli("fn", "info", "solo", *where, env=gw.admin_env).stdout.decode()
    assert "scaling: pinned at 2" in info
    out = cli("fn", "scale", "solo", "--auto", *where, env=gw.admin_env)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"solo: released the pinned count of 2; autoscaling decides again\n"
    wait_for(lambda: counts(gw, "solo") == (0, 0), "solo back at zero")
    listing = cli("fn", "list", *where, env=gw.admin_env).stdout.decode()
    assert re.search(r"solo .* 0/0 +Scaled to zero", listing), listing
    assert cli("fn", "scale", "solo", *where, env=gw.admin_env).returncode != 0  # a count or --auto


def test_the_config_keys_and_what_a_deploy_carries(tmp_path: Path) -> None:
    def spec(**keys: object) -> FunctionSpec:
        return FunctionSpec.model_validate(keys)

    plain = FunctionDef.from_request(to_request("f", spec()))
    assert (plain.replicas, plain.min_replicas, plain.max_replicas, plain.autoscaling) == (1, 1, 1, False)
    assert REPLICAS not in plain.annotations  # nothing added when nothing is asked
    lazy = spec(scale_to_zero_after="5m")
    assert (lazy.scale_to_zero_after, lazy.min_count, lazy.max_count) == (300.0, 0, 1)
    request = to_request("f", lazy)
    assert (request.MinReplicas, request.MaxReplicas) == (0, 1)
    fn = FunctionDef.from_request(request)
    assert (fn.replicas, fn.min_replicas, fn.scale_to_zero_after, fn.autoscaling) == (1, 0, 300.0, True)
    wide = FunctionDef.from_request(
        to_request("f", spec(replicas=2, max_replicas=4, concurrency_target=3, stable_window="10s"))
    )
    assert (wide.replicas, wide.min_replicas, wide.max_replicas) == (2, 2, 4)
    assert (wide.concurrency_target, wide.stable_window) == (3.0, 10.0)
    for bad in (
        {"scale_to_zero_after": "1m", "min_replicas": 1},
        {"max_replicas": 65},
        {"concurrency_target": 0},
        {"replicas": 3, "max_replicas": 2},
        {"scale_to_zero_after": "soon"},
    ):
        with pytest.raises(ValidationError):
            spec(**bad)
    config = "functions:\n  f:\n    scale_to_zero_after: 2m\n    max_replicas: 3\n"
    (tmp_path / "config.yaml").write_text(config)
    loaded = load_stack(tmp_path / "config.yaml").functions["f"]
    assert (loaded.min_count, loaded.max_count, loaded.scale_to_zero_after) == (0, 3, 120.0)
    # a KETI request (no openfx.replicas): MinReplicas is the count, as before
    keti = FunctionDef.from_request(gpb.CreateFunctionRequest(Service="k", MinReplicas=2, MaxReplicas=2))
    assert (keti.replicas, keti.autoscaling) == (2, False)
    with pytest.raises(InvokeError, match="MaxReplicas must be between 0 and 64"):
        FunctionDef.from_request(gpb.CreateFunctionRequest(Service="k", MaxReplicas=65))


def deploy(gw: RunningGateway, name: str, folder: str, rpc: str = "Deploy", **keys: object) -> None:
    """Deploy (or Update) a fixture function with config keys, as `fn deploy` sends them."""
    spec = FunctionSpec.model_validate(
        {"handler": {"dir": str(FIXTURES / "functions" / folder / "src")}, **keys}
    )
    getattr(gw.stub(), rpc)(to_request(name, spec), timeout=60)


def test_fn_call_waits_for_a_cold_start_longer_than_the_timeout_by_default(gw: RunningGateway) -> None:
    # sluggish starts in 3 s and has a 1 s timeout: the CLI's default deadline must not be the timeout
    assert counts(gw, "sluggish") == (0, 0)
    out = cli("fn", "call", "sluggish", "-g", gw.grpc_address, stdin=b"woke")
    assert (out.returncode, out.stdout) == (0, b"woke"), out.stderr
    assert counts(gw, "sluggish") == (1, 1)


def test_calls_waiting_for_a_cold_start_count_toward_max_inflight(gw: RunningGateway) -> None:
    with shared_tmp() as folder:
        gate = folder / "open"
        deploy(
            gw, "gated", "gatedinit", environment={"GATE_FILE": str(gate)}, replicas=0,
            scale_to_zero_after="30s", max_inflight=2,
        )  # fmt: skip
        try:
            with ThreadPoolExecutor(2) as pool:
                waiting = [pool.submit(call, gw, "gated", b"cold") for _ in range(2)]
                eventually(lambda: metric(gw, "gateway_function_inflight", function_name="gated") == 2,
                           "two calls waiting for gated's start")  # fmt: skip
                with pytest.raises(grpc.RpcError) as err:  # refused at once, not queued behind the start
                    call(gw, "gated", b"third")
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "max_inflight" in (err.value.details() or "")
                frames = iter([gpb.InvokeServiceRequest(Service="gated", Input=b"stream")])
                with pytest.raises(grpc.RpcError) as err:
                    list(gw.stub().Invokes(frames, timeout=30))
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert counts(gw, "gated") == (1, 0)  # still starting: the gate is shut
                gate.touch()
                assert [w.result() for w in waiting] == [b"cold", b"cold"]
            assert metric(gw, "gateway_function_inflight", function_name="gated") == 0
            assert call(gw, "gated", b"warm") == b"warm"
        finally:
            gw.stub().Delete(gpb.DeleteFunctionRequest(FunctionName="gated"), timeout=60)


def test_a_pin_survives_an_update_unless_the_new_bounds_leave_it_out(gw: RunningGateway) -> None:
    deploy(gw, "pinned", "echopid", max_replicas=3)
    try:
        gw.stub().ReplicaUpdate(gpb.ScaleServiceRequest(ServiceName="pinned", Replicas=2), timeout=30)
        eventually(lambda: counts(gw, "pinned") == (2, 2), "pinned at 2")
        deploy(gw, "pinned", "echopid", "Update", max_replicas=3, environment={"NEW": "1"})
        eventually(lambda: counts(gw, "pinned") == (2, 2), "two new replicas after the update")
        assert meta(gw, "pinned").Annotations["openfx.scaling"].startswith("pinned at 2")
        # the update narrows the bounds to 1..1: the pin of 2 would fall outside, so it is clamped
        deploy(gw, "pinned", "echopid", "Update", max_replicas=1)
        eventually(lambda: counts(gw, "pinned") == (1, 1), "the pin clamped to 1")
        assert meta(gw, "pinned").Annotations["openfx.scaling"].startswith("pinned at 1")
        assert "leave out the pinned count of 2: pinned at 1 instead" in gw.log()
    finally:
        gw.stub().Delete(gpb.DeleteFunctionRequest(FunctionName="pinned"), timeout=60)


def test_the_default_stack_scales_its_heavy_functions_to_zero() -> None:
    stack = load_stack(ROOT / "openfx.yaml")
    for name, spec in stack.functions.items():
        fn = FunctionDef.from_request(to_request(name, spec))
        if name in ("pyspark", "mnist"):
            assert (fn.replicas, fn.min_replicas, fn.max_replicas, fn.scale_to_zero_after) == (1, 0, 1, 300.0)
        else:
            assert not fn.autoscaling, name  # the rest as before: a fixed count


def test_the_session_stack_applies_openfx_yaml_scaling_with_scale_to_zero_off(
    stack_gateway: RunningGateway,
) -> None:
    for name in ("pyspark", "mnist"):
        annotations = meta(stack_gateway, name).Annotations
        assert annotations["openfx.scale_to_zero_after"] == "300.0"
        assert annotations["openfx.scaling"] == (
            "auto 0..1, 10 in flight per replica, to zero after 300s idle "
            "(scale to zero is off on this gateway: at least 1)"
        )
    assert meta(stack_gateway, "echo").Annotations["openfx.scaling"] == "fixed"


def test_scale_to_zero_off_keeps_one_replica(tmp_path: Path) -> None:
    stack = tmp_path / "stack.yaml"
    stack.write_text(
        f"functions:\n  lazy:\n    handler: {{dir: {FIXTURES}/functions/echopid/src}}\n"
        "    scale_to_zero_after: 200ms\n"
    )
    off = start_gateway(stack, tmp_path / "gateway.log", env={"OPENFX_SCALE_TO_ZERO": "off"})
    try:
        off.wait_ready(names={"lazy"})
        assert (
            meta(off, "lazy")
            .Annotations["openfx.scaling"]
            .endswith("(scale to zero is off on this gateway: at least 1)")
        )
        # at zero by hand, then given back to the autoscaler: it starts one again (the floor is 1)
        off.stub().ReplicaUpdate(gpb.ScaleServiceRequest(ServiceName="lazy", Replicas=0), timeout=30)
        assert counts(off, "lazy") == (0, 0)
        off.stub().ReplicaUpdate(gpb.ScaleServiceRequest(ServiceName="lazy", Replicas=SCALE_AUTO), timeout=30)
        eventually(lambda: counts(off, "lazy") == (1, 1), "lazy back at one replica")
        assert "scaling 0 -> 1 replicas (up): scale to zero is off on this gateway" in off.log()
        assert "no call for" not in off.log()
    finally:
        off.stop()


@pytest.mark.parametrize("command", [["python", "-m", "openfx.gateway", "--no-functions"], ["cli", "up"]])
def test_a_bad_scale_to_zero_setting_is_one_line(command: list[str], tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "OPENFX_SCALE_TO_ZERO": "sometimes", "OPENFX_HOME": str(tmp_path)}
    if command[0] == "cli":
        out = cli(*command[1:], "-f", str(ROOT / "openfx.yaml"), env=env)
    else:
        out = subprocess.run(
            [sys.executable, *command[1:]], capture_output=True, env=env, cwd=ROOT, timeout=60
        )
    assert out.returncode != 0
    assert out.stderr.decode().strip().endswith("OPENFX_SCALE_TO_ZERO must be 'on' or 'off', got 'sometimes'")
    assert len(out.stderr.decode().strip().splitlines()) == 1

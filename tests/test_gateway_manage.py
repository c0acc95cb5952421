"""Management RPCs and process supervision, end to end (real gateway, real watcher processes)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest
import requests
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from openfx.config import load_stack
from openfx.function_def import to_request
from openfx.pb import fxgateway_pb2 as gpb
from tests.conftest import ADMIN_HEADERS, FIXTURES, RunningGateway

JSON_ADMIN = {**ADMIN_HEADERS, "Content-Type": "application/json"}


def meta(gw: RunningGateway, name: str) -> gpb.Function:
    return gw.stub().GetMeta(gpb.FunctionRequest(FunctionName=name), timeout=5)


def call(gw: RunningGateway, name: str, data: bytes = b"") -> bytes:
    return gw.stub().Invoke(gpb.InvokeServiceRequest(Service=name, Input=data), timeout=10).Msg


def wait_for(predicate, timeout: float = 30, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def spec_request(name: str, folder: str, **overrides: object) -> gpb.CreateFunctionRequest:
    stack = load_stack(FIXTURES / "stack.yaml")
    spec = stack.functions[folder].model_copy(update=overrides)
    return to_request(name, spec)


def test_list_and_get_meta_report_counts_and_replicas(gateway: RunningGateway) -> None:
    before = meta(gateway, "echo").InvocationCount
    for _ in range(3):
        call(gateway, "echo", b"x")
    fn = meta(gateway, "echo")
    assert fn.InvocationCount == before + 3
    assert (fn.Replicas, fn.AvailableReplicas) == (1, 1)
    assert fn.Image == "localhost:5000/openfx/echo"
    names = {f.Name for f in gateway.stub().List(gpb.Empty(), timeout=5).Functions}
    assert {"echo", "cls", "fail", "sleeper", "badimport"} <= names
    body = requests.get(f"{gateway.http_url}/system/functions", timeout=5).json()
    assert any(f["Name"] == "echo" and f["Replicas"] == "1" for f in body["Functions"])
    r = requests.get(f"{gateway.http_url}/system/function/nope", timeout=5)
    assert r.status_code == 404 and r.json()["code"] == grpc.StatusCode.NOT_FOUND.value[0]


def test_info_and_healthcheck(gateway: RunningGateway) -> None:
    stub = gateway.stub()
    assert stub.HealthCheck(gpb.Empty(), timeout=5).Msg == b"OK"
    info = yaml.safe_load(stub.Info(gpb.Empty(), timeout=5).Msg)
    assert info["gateway"]["mode"] == "embedded" and info["runtime"]["grpcio"] == grpc.__version__
    assert info["gateway"]["http"] == gateway.http_url.removeprefix("http://")
    assert requests.get(f"{gateway.http_url}/healthz", timeout=5).text == "OK"
    assert "embedded" in requests.get(f"{gateway.http_url}/system/info", timeout=5).json()["Msg"]


def test_standard_health_and_reflection(gateway: RunningGateway) -> None:
    channel = gateway.channel()
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="pb.FxGateway"), timeout=5).status == 1
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    services = {s.name for r in replies for s in r.list_services_response.service}
    assert {"pb.FxGateway", "pb.Gateway", "grpc.health.v1.Health"} <= services


def test_get_log_returns_function_output(gateway: RunningGateway) -> None:
    call(gateway, "printer", b"12345")

    def log_with_print() -> str | None:
        text = gateway.stub().GetLog(gpb.FunctionRequest(FunctionName="printer"), timeout=5).Msg.decode()
        return text if "printer got 5 bytes" in text else None

    text = wait_for(log_with_print, what="the print in the log")
    assert "printer[0]: printer got 5 bytes" in text
    r = requests.get(f"{gateway.http_url}/system/function-log/printer", headers=ADMIN_HEADERS, timeout=5)
    assert "printer got 5 bytes" in r.text


def test_deploy_update_scale_delete(gateway: RunningGateway) -> None:
    stub = gateway.stub()
    request = spec_request("pid2", "pid")
    assert stub.Deploy(request, timeout=30).Msg == b"OK"
    with pytest.raises(grpc.RpcError) as dup:
        stub.Deploy(request, timeout=30)
    assert dup.value.code() == grpc.StatusCode.ALREADY_EXISTS
    wait_for(lambda: meta(gateway, "pid2").AvailableReplicas == 1, what="pid2 ready")
    first_pid = call(gateway, "pid2")

    # scale out: calls spread over both processes
    stub.ReplicaUpdate(gpb.ScaleServiceRequest(ServiceName="pid2", Replicas=2), timeout=30)
    wait_for(lambda: meta(gateway, "pid2").AvailableReplicas == 2, what="2 replicas")
    pids = {call(gateway, "pid2") for _ in range(20)}
    assert len(pids) == 2 and first_pid in pids

    # update replaces the processes (new environment reaches them); the pinned count of 2 outlives it
    updated = spec_request("pid2", "pid", environment={"GREETING": "x"}, replicas=1)
    stub.Update(updated, timeout=60)
    wait_for(lambda: meta(gateway, "pid2").AvailableReplicas == 2, what="updated pid2")
    assert not {call(gateway, "pid2") for _ in range(10)} & pids

    # scale to zero: UNAVAILABLE, not a hang
    stub.ReplicaUpdate(gpb.ScaleServiceRequest(ServiceName="pid2", Replicas=0), timeout=30)
    with pytest.raises(grpc.RpcError) as zero:
        call(gateway, "pid2")
    assert zero.value.code() == grpc.StatusCode.UNAVAILABLE

    assert stub.Delete(gpb.DeleteFunctionRequest(FunctionName="pid2"), timeout=30).Msg == b"OK"
    with pytest.raises(grpc.RpcError) as gone:
        call(gateway, "pid2")
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    for rpc, req in ((stub.Delete, gpb.DeleteFunctionRequest(FunctionName="pid2")), (stub.Update, updated)):
        with pytest.raises(grpc.RpcError) as missing:
            rpc(req, timeout=10)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_deploy_rejects_bad_requests(gateway: RunningGateway) -> None:
    stub = gateway.stub()
    cases = [
        (gpb.CreateFunctionRequest(Service="Bad_Name"), grpc.StatusCode.INVALID_ARGUMENT),
        (gpb.CreateFunctionRequest(Service="noimage", Image="x"), grpc.StatusCode.FAILED_PRECONDITION),
        (
            gpb.CreateFunctionRequest(Service="t", Annotations={"openfx.timeout": "soon"}),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ]
    for request, code in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.Deploy(request, timeout=10)
        assert err.value.code() == code, err.value.details()
    r = requests.post(
        f"{gateway.http_url}/system/functions", data=b"{not json", headers=JSON_ADMIN, timeout=5
    )
    assert r.status_code == 400 and "bad JSON" in r.json()["message"]


def test_rest_deploy_update_scale_delete(gateway: RunningGateway) -> None:
    from google.protobuf import json_format

    url = f"{gateway.http_url}/system/functions"
    body = json_format.MessageToJson(spec_request("restecho", "pid"))
    r = requests.post(url, data=body, headers=JSON_ADMIN, timeout=30)
    assert r.status_code == 200 and r.json() == {"Msg": "OK"}
    wait_for(lambda: meta(gateway, "restecho").AvailableReplicas == 1, what="restecho ready")
    first = call(gateway, "restecho")
    assert requests.post(url, data=body, headers=JSON_ADMIN, timeout=30).status_code == 409

    # PUT /system/functions updates in place: new processes, the new environment reaches them
    updated = spec_request("restecho", "info", environment={"GREETING": "rest"})
    r = requests.put(url, data=json_format.MessageToJson(updated), headers=JSON_ADMIN, timeout=60)
    assert r.status_code == 200 and r.json() == {"Msg": "OK"}
    wait_for(lambda: _try(gateway, "restecho") not in (None, first), what="the updated function")
    assert call(gateway, "restecho") == b"restecho|grpc||True"  # the info handler now answers
    missing = json_format.MessageToJson(spec_request("restnope", "pid"))
    assert requests.put(url, data=missing, headers=JSON_ADMIN, timeout=30).status_code == 404
    anonymous = requests.put(url, data=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert anonymous.status_code == 401

    r = requests.put(
        f"{gateway.http_url}/system/scale-function",
        json={"ServiceName": "restecho", "Replicas": "2"},
        headers=ADMIN_HEADERS,
        timeout=30,
    )
    assert r.status_code == 200
    wait_for(lambda: meta(gateway, "restecho").AvailableReplicas == 2, what="2 replicas")
    r = requests.delete(f"{gateway.http_url}/system/function/restecho", headers=ADMIN_HEADERS, timeout=30)
    assert r.status_code == 200
    assert requests.get(f"{gateway.http_url}/system/function/restecho", timeout=5).status_code == 404


def _try(gw: RunningGateway, name: str) -> bytes | None:
    try:
        return call(gw, name)
    except grpc.RpcError:
        return None


def test_killed_process_is_restarted_and_callers_get_unavailable(gateway: RunningGateway) -> None:
    pid = int(call(gateway, "pid"))
    os.kill(pid, signal.SIGKILL)
    codes = set()
    deadline = time.monotonic() + 30
    new_pid = None
    while time.monotonic() < deadline:
        try:
            new_pid = int(call(gateway, "pid"))
            if new_pid != pid:
                break
        except grpc.RpcError as exc:
            codes.add(exc.code())
        time.sleep(0.02)
    assert new_pid is not None and new_pid != pid
    # the restart takes at least the first backoff (0.25 s) plus a process start: callers in between
    # are told UNAVAILABLE, and nothing else
    assert codes == {grpc.StatusCode.UNAVAILABLE}
    assert "pid[0]: process exited with code -9" in gateway.log()


def test_handler_import_error_is_reported_and_others_keep_working(gateway: RunningGateway) -> None:
    def failed() -> gpb.Function | None:
        fn = meta(gateway, "badimport")
        return fn if "openfx.error" in fn.Annotations else None

    fn = wait_for(failed, what="the load error in GetMeta")
    assert fn.AvailableReplicas == 0
    with pytest.raises(grpc.RpcError) as err:
        call(gateway, "badimport")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    logs = gateway.stub().GetLog(gpb.FunctionRequest(FunctionName="badimport"), timeout=5).Msg.decode()
    assert "No module named 'module_that_does_not_exist'" in logs
    assert call(gateway, "echo", b"still fine") == b"still fine"


def test_restart_backoff_grows_to_its_cap(gateway: RunningGateway) -> None:
    """badimport exits at every start: its restarts wait 0.25 s, doubling, capped at 10 s."""

    def delays() -> list[float] | None:
        found = [
            float(line.split("restarting in ")[1].split("s")[0])
            for line in gateway.log().splitlines()
            if line.startswith("badimport[0]: exited; restarting in")
        ]
        return found if len(found) >= 7 else None

    seen = wait_for(delays, timeout=60, what="seven restarts of badimport")
    assert seen[:7] == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0]


def test_restart_backoff_caps_and_resets_after_a_healthy_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The supervisor alone, on a fake clock: doubling from 0.25 s, capped at 10 s, and back to
    0.25 s after a replica that ran longer than 30 s (a run of exactly 30 s does not count)."""
    import asyncio
    from types import SimpleNamespace

    from openfx.gateway import embedded

    now = [1000.0]
    slept: list[float] = []
    real_sleep = asyncio.sleep
    runs = iter([1, 1, 1, 1, 1, 1, 1, 1, 40, 1, 1, 30, 1])  # how long each process lives

    async def fake_sleep(delay: float) -> None:
        slept.append(delay)
        now[0] += delay
        await real_sleep(0)

    monkeypatch.setattr(embedded, "time", SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(embedded.asyncio, "sleep", fake_sleep)
    notes: list[str] = []
    fn = SimpleNamespace(name="f", note=notes.append)
    replica = embedded.LocalReplica(fn, 0, Path("/nonexistent"), 1024)  # type: ignore[arg-type]

    async def run_once() -> None:
        lived = next(runs, None)
        if lived is None:
            replica.stopping = True
            return
        now[0] += lived

    replica._run_once = run_once  # type: ignore[method-assign]
    asyncio.run(replica._supervise())
    assert slept == [0.25, 0.5, 1, 2, 4, 8, 10, 10, 0.25, 0.5, 1, 2, 4]
    assert replica.restarts == 13
    assert notes[0] == "f[0]: exited; restarting in 0.25s (restart #1)"

"""Prometheus for real (Debian's `prometheus` package): the embedded platform (gateway, an MQTT
broker and bridge, a schedule) runs on free loopback ports, a Prometheus of the test's own on
another one scrapes it with the config `openfx-cli up --monitoring` writes, and after real calls
(HTTP, MQTT, a refused one of each kind, a schedule slower than its tick) the HTTP API answers
for the gateway's and the bridge's counters, and every PromQL expression of the Grafana dashboard
in deploy/ returns data."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from openfx import readiness
from openfx.gateway.metrics import GatewayMetrics
from openfx.k8s.observability import dashboard_queries, embedded_prometheus_config
from openfx.triggers.mqtt import SCRAPE_JOB
from tests.conftest import ADMIN_TOKEN_FILE, FIXTURES, ROOT, free_port
from tests.mqtt_helpers import Device
from tests.shared_tmp import shared_tmp
from tests.test_triggers import ticks_file

PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="needs Debian's prometheus package")
DASHBOARD = ROOT / "deploy" / "grafana" / "openfx-gateway.json"


def wait_until(condition, what: str, timeout: float = 90):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("monitoring")
    mqtt_port, bridge_metrics = free_port(), f"127.0.0.1:{free_port()}"
    bridge = yaml.safe_load((ROOT / "broker" / "bridge.yaml").read_text())
    (tmp / "bridge.yaml").write_text(yaml.safe_dump({**bridge, "metrics_address": bridge_metrics}))
    with shared_tmp() as shared:
        ticks = ticks_file(shared)
        (tmp / "stack.yaml").write_text(
            f"include:\n  - {ROOT}/functions/echo/config.yaml\n"
            f"mqtt: {{enabled: true, port: {mqtt_port}, bridge: bridge.yaml}}\n"
            "functions:\n"
            "  ticker:\n"  # slower than its tick: skipped ticks are counted
            f"    handler: {{dir: {FIXTURES}/functions/ticker/src, file: handler.py}}\n"
            "    schedule: '* * * * * *'\n"
            f"    environment: {{TICKS_FILE: {ticks}, TICK_SECONDS: '1.5'}}\n"
        )
        grpc_address, http = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        console = f"127.0.0.1:{free_port()}"
        state = tmp / "state"
        log = open(tmp / "platform.log", "ab")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "openfx.launcher",
                "-f",
                str(tmp / "stack.yaml"),
                "--grpc",
                grpc_address,
                "--http",
                http,
                "--admin-token-file",
                str(ADMIN_TOKEN_FILE),
                "--state-dir",
                str(state),
                "--console",
                console,
            ],
            stdout=log,
            stderr=log,
            cwd=ROOT,
        )
        try:
            line = readiness.wait(state / readiness.PLATFORM_READY, lambda: process.poll() is None, 120)
            assert line is not None and "NOT ready" not in line, (tmp / "platform.log").read_text()[-2000:]
            yield {
                "http": http,
                "console": console,
                "mqtt_port": str(mqtt_port),
                "bridge_metrics": bridge_metrics,
                "tmp": str(tmp),
            }
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
            log.close()


@pytest.fixture(scope="module")
def prometheus(platform: dict[str, str]) -> Iterator[str]:
    """Our own Prometheus on a free port (a system service may hold 9090), scraping every second."""
    tmp = Path(platform["tmp"])
    triggers = {SCRAPE_JOB: platform["bridge_metrics"]}
    config = embedded_prometheus_config(platform["http"], triggers, interval="1s")
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    address = f"127.0.0.1:{free_port()}"
    log = open(tmp / "prometheus.log", "ab")  # noqa: SIM115 (closed with the process)
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address={address}",
        ],
        stdout=log,
        stderr=log,
    )
    url = f"http://{address}"
    try:

        def ready() -> bool:
            assert process.poll() is None, (tmp / "prometheus.log").read_text()[-2000:]
            try:
                return requests.get(url + "/-/ready", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(ready, "prometheus ready")
        yield url
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def query(url: str, expr: str) -> list[dict]:
    answer = requests.get(url + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def real_calls(platform: dict[str, str]) -> None:
    http = "http://" + platform["http"]
    for i in range(20):
        assert requests.post(http + "/function/echo", data=f"call {i}", timeout=30).text == f"call {i}"
    assert requests.post(http + "/function/nothere", data=b"x", timeout=30).status_code == 404
    assert requests.get(http + "/system/function-log/echo", timeout=30).status_code == 401  # no token
    assert requests.get(http + "/healthz", headers={"Host": "evil.example"}, timeout=30).status_code == 421
    device = Device(int(platform["mqtt_port"]), ["fn/echo/reply"])
    try:
        device.request("fn/echo", b"over mqtt")
        assert device.next().payload == b"over mqtt"
    finally:
        device.close()


@needs_prometheus
def test_prometheus_scrapes_the_platform_and_the_dashboard_returns_data(
    platform: dict[str, str], prometheus: str
) -> None:
    real_calls(platform)
    targets = wait_until(
        lambda: (
            (t := requests.get(prometheus + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"])
            and all(x["health"] == "up" for x in t)
            and t
        ),
        "both targets scraped",
    )
    assert {t["labels"]["job"] for t in targets} == {"fxgateway", "mqtt-bridge"}
    echo = wait_until(
        lambda: query(prometheus, 'sum(gateway_function_invocation_total{function_name="echo",code="200"})'),
        "echo's invocations in prometheus",
    )
    assert float(echo[0]["value"][1]) >= 21  # 20 over HTTP, 1 over MQTT
    bridge = wait_until(lambda: query(prometheus, 'bridge_invocations_total{code="OK"}'), "bridge counters")
    assert float(bridge[0]["value"][1]) >= 1
    by_trigger = wait_until(
        lambda: query(prometheus, 'gateway_functions_seconds_count{function_name="echo",trigger="mqtt"}'),
        "latency labelled by trigger",
    )
    assert float(by_trigger[0]["value"][1]) >= 1
    # the dashboard shipped in deploy/ (kept equal to the renderer's output by tests/test_cluster.py)
    shipped = dashboard_queries(json.loads(DASHBOARD.read_text()))
    assert len(shipped) >= 8
    for expr in shipped:
        wait_until(lambda e=expr: query(prometheus, e), f"data for {expr}")


@needs_prometheus
def test_console_quantiles_match_prometheus(platform: dict[str, str], prometheus: str) -> None:
    """The console's p50/p99 (computed in the gateway from the same buckets) agree with PromQL's
    histogram_quantile over the same counts, once Prometheus has scraped echo's last call (echo is
    idle after it; the console's first read covers everything since start)."""
    from tests.conftest import ADMIN_HEADERS

    http = f"http://{platform['http']}"
    requests.post(http + "/function/echo", data=b"one more", timeout=30)
    served = sum(
        float(line.split()[-1])
        for line in requests.get(http + "/metrics", timeout=10).text.splitlines()
        if line.startswith('gateway_functions_seconds_count{function_name="echo"')
    )
    count = 'sum(gateway_functions_seconds_count{function_name="echo"})'
    wait_until(
        lambda: (r := query(prometheus, count)) and float(r[0]["value"][1]) == served,
        "echo's last call scraped",
    )
    url = f"http://{platform['console']}/console/overview"
    rows = requests.get(url, headers=ADMIN_HEADERS, timeout=10).json()["functions"]
    row = next(row for row in rows if row["name"] == "echo")
    for q, key in ((0.5, "p50_ms"), (0.99, "p99_ms")):
        expr = (
            f'histogram_quantile({q}, sum by (le) (gateway_functions_seconds_bucket{{function_name="echo"}}))'
        )
        promql = float(query(prometheus, expr)[0]["value"][1]) * 1000
        assert row[key] == pytest.approx(promql, rel=1e-3, abs=1e-3), (key, row, promql)


def test_latency_buckets_resolve_sub_millisecond_calls() -> None:
    """An echo through the embedded backend takes a fraction of a millisecond: with Prometheus's
    default buckets (5 ms first) every such call would share one bucket and p50/p99 would say
    nothing. A call of 0.3 ms lands in le=0.0005 and not in le=0.00025, as /metrics shows it."""
    metrics = GatewayMetrics()
    metrics.observe("echo", 200, 0.0003, trigger="http")
    buckets = {
        line.split('le="', 1)[1].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.render().decode().splitlines()
        if line.startswith('gateway_functions_seconds_bucket{function_name="echo",')
        and 'trigger="http"' in line
    }
    assert buckets["0.0001"] == buckets["0.00025"] == 0
    assert buckets["0.0005"] == buckets["0.001"] == buckets["+Inf"] == 1

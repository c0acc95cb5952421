"""Shared fixtures: a real gateway process on free loopback ports, with real watcher processes."""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from openfx import parent
from openfx.client_channel import gateway_channel
from openfx.pb import fxgateway_pb2 as gpb
from openfx.pb import fxgateway_pb2_grpc as gpb_grpc

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
MiB = 1024 * 1024
# every function of fixtures/stack.yaml except badimport, which never becomes ready
READY_FUNCTIONS = {
    "echo",
    "cls",
    "fail",
    "sleeper",
    "info",
    "pid",
    "binary",
    "printer",
    "echopid",
    "onestream",
    "slow",
    "slower",
    "small",
    "latch",
}


# The test run's local admin token, as `openfx-cli up` would make one: management needs it even on
# loopback, so test gateways get it and the harness (stubs, CLI calls, REST writes) sends it.
ADMIN_TOKEN = secrets.token_urlsafe(24)
_TOKEN_DIR = Path(tempfile.mkdtemp(prefix="openfx-test-token-"))
ADMIN_TOKEN_FILE = _TOKEN_DIR / "token"
ADMIN_TOKEN_FILE.write_text(ADMIN_TOKEN + "\n")
ADMIN_TOKEN_FILE.chmod(0o600)
atexit.register(shutil.rmtree, _TOKEN_DIR, True)  # nothing of a test run stays in /tmp
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# every gateway a test starts serves its console on a free port unless the test names one:
# several gateways live at once, and 31115 may belong to a platform the developer runs
os.environ.setdefault("OPENFX_CONSOLE_ADDR", "127.0.0.1:0")
# a user config naming that token file, as `openfx-cli up` leaves ~/.openfx/config.yaml (CLI tests use it)
USER_CONFIG = _TOKEN_DIR / "config.yaml"
USER_CONFIG.write_text(f"openfx:\n  token_file: {ADMIN_TOKEN_FILE}\n")


T = TypeVar("T")


def eventually(probe: Callable[[], T | None], what: str, timeout: float = 30) -> T:
    """The first truthy value of probe(), polled until `timeout` (a bound, not a measurement)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = probe()
        except grpc.RpcError:
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningGateway:
    process: subprocess.Popen[bytes]
    grpc_address: str
    http_url: str
    log_path: Path
    admin_token: str | None = None

    def channel(self, token: str | None = "admin") -> grpc.Channel:
        """A channel as the harness's admin (the default), or with `token`, or anonymous (None)."""
        opts = [("grpc.max_receive_message_length", 256 * MiB), ("grpc.max_send_message_length", 256 * MiB)]
        if token == "admin":
            token = self.admin_token
        if token is None:
            return grpc.insecure_channel(self.grpc_address, options=opts)
        return gateway_channel(self.grpc_address, token, None, options=opts)

    def stub(self, token: str | None = "admin") -> gpb_grpc.FxGatewayStub:
        return gpb_grpc.FxGatewayStub(self.channel(token))

    @property
    def admin_env(self) -> dict[str, str]:
        """Environment for CLI subprocesses that manage this gateway."""
        return {"OPENFX_TOKEN": self.admin_token} if self.admin_token else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, names: set[str] | None = None, timeout: float = 60) -> None:
        stub = self.stub()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"gateway exited:\n{self.log()}"
            try:
                functions = stub.List(gpb.Empty(), timeout=2).Functions
                pending = [
                    f.Name
                    for f in functions
                    if (names is None or f.Name in names) and f.AvailableReplicas < f.Replicas
                ]
                if functions and not pending:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"gateway not ready in {timeout}s:\n{self.log()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def _die_with_test_run() -> dict[str, str]:
    """A test run killed midway must not leave gateways (and their functions) running. The kernel
    ties this to the spawning *thread*, so a gateway restarted from a timer thread (fault tests)
    must not ask for it: it would be stopped the moment that thread ends."""
    return {parent.ENV: "1"} if threading.current_thread() is threading.main_thread() else {}


def start_gateway(
    stack: Path,
    log_path: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    grpc_address: str | None = None,
    http_address: str | None = None,
    admin: bool = True,
) -> RunningGateway:
    """A gateway process; with `admin`, it takes the run's local admin token for management."""
    grpc_address = grpc_address or f"127.0.0.1:{free_port()}"
    http_address = http_address or f"127.0.0.1:{free_port()}"
    access = ["--admin-token-file", str(ADMIN_TOKEN_FILE)] if admin else []
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "openfx.gateway",
                "-f",
                str(stack),
                "--grpc",
                grpc_address,
                "--http",
                http_address,
                *access,
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **_die_with_test_run(), **(env or {})},
            cwd=ROOT,
        )
    return RunningGateway(
        process, grpc_address, f"http://{http_address}", log_path, ADMIN_TOKEN if admin else None
    )


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """The test stack (echo + fixture functions), with an 8 MiB message limit to test the limit."""
    log_path = tmp_path_factory.mktemp("gw") / "gateway.log"
    gw = start_gateway(FIXTURES / "stack.yaml", log_path, "--max-message-bytes", str(8 * MiB))
    try:
        gw.wait_ready(names=READY_FUNCTIONS)
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="session")
def stack_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """The repo's own stack (openfx.yaml: every function of the collection) on a real gateway, with
    scale to zero off: its tests call pyspark and mnist with deadlines shorter than their cold
    start. (tests/test_autoscale.py checks openfx.yaml's scaling is what the gateway applies.)"""
    gw = start_gateway(
        ROOT / "openfx.yaml", tmp_path_factory.mktemp("stack") / "gateway.log", "--no-scale-to-zero"
    )
    try:
        gw.wait_ready(timeout=120)
        yield gw
    finally:
        gw.stop()


# Groups that take minutes (the function collection's tests and the Spark-bearing session stack,
# fuzzing, fault and reliability runs)
# or over ~10 s each (bench smoke runs, MQTT floods, broker TLS, Prometheus, the console in
# Chromium): marked `slow`, so `pytest -m "not slow"` runs the rest; CI runs everything.
SLOW_MODULES = (
    "tests/functions/",  # the collection: Spark and MLeap JVMs, training, Chromium, the README run
    "tests/test_fuzz.py",
    "tests/test_bridge_reliability.py",
    "tests/test_streaming.py",
    "tests/test_benches.py",
    "tests/test_bridge_flood.py",
    "tests/test_bridge_auth_tls.py",
    "tests/test_prometheus.py::test_prometheus_scrapes",  # not its bucket unit test
    "tests/test_prometheus.py::test_console_quantiles",
    "tests/test_console.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that need the session-wide stack (a Spark JVM included) run last: it would otherwise
    load the machine during the timing-sensitive platform tests. Whatever asks for `stack_gateway`
    counts, wherever it lives (a fuzz test of the collection's functions, the video client)."""
    for item in items:
        if "stack_gateway" in getattr(item, "fixturenames", ()) or item.nodeid.startswith(SLOW_MODULES):
            item.add_marker(pytest.mark.slow)
    items.sort(
        key=lambda item: (
            "stack_gateway" in getattr(item, "fixturenames", ()),
            item.nodeid.startswith("tests/functions/"),
        )
    )

"""Shared fixtures: a real gateway process on free loopback ports, with real watcher processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from openfx import parent
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
}


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

    def channel(self) -> grpc.Channel:
        opts = [("grpc.max_receive_message_length", 256 * MiB), ("grpc.max_send_message_length", 256 * MiB)]
        return grpc.insecure_channel(self.grpc_address, options=opts)

    def stub(self) -> gpb_grpc.FxGatewayStub:
        return gpb_grpc.FxGatewayStub(self.channel())

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
) -> RunningGateway:
    grpc_address = grpc_address or f"127.0.0.1:{free_port()}"
    http_address = http_address or f"127.0.0.1:{free_port()}"
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
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **_die_with_test_run(), **(env or {})},
            cwd=ROOT,
        )
    return RunningGateway(process, grpc_address, f"http://{http_address}", log_path)


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
    """The repo's own stack (openfx.yaml: every function of the collection) on a real gateway."""
    gw = start_gateway(ROOT / "openfx.yaml", tmp_path_factory.mktemp("stack") / "gateway.log")
    try:
        gw.wait_ready(timeout=120)
        yield gw
    finally:
        gw.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The collection's function tests run last: their session-wide stack (a Spark JVM included)
    would otherwise load the machine during the timing-sensitive platform tests."""
    items.sort(key=lambda item: item.nodeid.startswith("tests/functions/"))

"""The repo's own stack as root runs every function as the function user: the Spark function
(a JVM child of its watcher) included, answering its accuracy line as that user."""

from __future__ import annotations

import os
import pwd
import time
from pathlib import Path

import grpc
import pytest

from tests.conftest import RunningGateway
from tests.functions.conftest import call
from tests.functions.test_pyspark import ACCURACY

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="functions switch user only under a root gateway")


def replica_processes(gateway_pid: int) -> dict[int, tuple[str, int]]:
    """{pid: (command, uid)} of every process below the gateway (watchers and their children)."""
    parents: dict[int, int] = {}
    info: dict[int, tuple[str, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = dict(
                line.split(":\t", 1) for line in (entry / "status").read_text().splitlines() if ":\t" in line
            )
        except (OSError, ValueError):
            continue
        pid = int(entry.name)
        parents[pid] = int(status["PPid"])
        info[pid] = (status["Name"].strip(), int(status["Uid"].split()[0]))
    below = {}
    for pid in info:
        ancestor = parents.get(pid, 0)
        while ancestor > 1 and ancestor != gateway_pid:
            ancestor = parents.get(ancestor, 0)
        if ancestor == gateway_pid:
            below[pid] = info[pid]
    return below


def test_spark_function_answers_as_the_function_user(stack_gateway: RunningGateway) -> None:
    deadline = time.monotonic() + 180
    while True:
        try:
            assert call(stack_gateway, "pyspark", b"\n") == ACCURACY.encode()
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, exc.details()
            time.sleep(1)
    expected = pwd.getpwnam("openfx-fn").pw_uid if _has_user("openfx-fn") else pwd.getpwnam("nobody").pw_uid
    processes = replica_processes(stack_gateway.process.pid)
    assert any(name == "java" for name, _ in processes.values())  # Spark's JVM, below its watcher
    assert len(processes) >= 7
    assert {uid for _, uid in processes.values()} == {expected}, processes


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True

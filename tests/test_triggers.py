"""Triggers through the real platform (`python -m openfx.launcher`): a per-second schedule, a run
slower than its tick, a restart with ticks missed while down, and the platform's ready file."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import requests

from openfx import readiness
from openfx.pb import fxgateway_pb2 as gpb
from openfx.pb import fxgateway_pb2_grpc as gpb_grpc
from openfx.triggers.schedule import ticks_between
from tests.conftest import ADMIN_TOKEN_FILE, FIXTURES, ROOT, free_port
from tests.shared_tmp import shared_tmp
from tests.test_gateway_manage import wait_for

EVERY_SECOND = "* * * * * *"


class Platform:
    def __init__(self, tmp: Path, stack: Path) -> None:
        self.tmp, self.stack = tmp, stack
        self.grpc, self.http = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        self.state = tmp / "state"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        log = open(self.tmp / "platform.log", "ab")  # noqa: SIM115 (closed with the process)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "openfx.launcher",
                "-f",
                str(self.stack),
                "--no-mqtt",
                "--grpc",
                self.grpc,
                "--http",
                self.http,
                "--admin-token-file",
                str(ADMIN_TOKEN_FILE),
                "--state-dir",
                str(self.state),
            ],
            stdout=log,
            stderr=log,
            cwd=ROOT,
        )
        line = readiness.wait(self.state / "platform.ready", lambda: self.process.poll() is None, 60)
        assert line is not None and "schedule" in line, (self.tmp / "platform.log").read_text()
        return line

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)
        assert not (self.state / "platform.ready").exists()  # cleared on the way out

    def metric(self, name: str, **labels: str) -> float:
        text = requests.get(f"http://{self.http}/metrics", timeout=5).text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            match = re.match(rf"{name}\{{(.*)\}} (\S+)", line)
            if match and ",".join(sorted(match.group(1).split(","))) == want:
                return float(match.group(2))
        return 0.0


def write_stack(tmp: Path, ticks: Path, seconds: float, cron: str = EVERY_SECOND) -> Path:
    stack = tmp / "stack.yaml"
    stack.write_text(
        "functions:\n"
        "  ticker:\n"
        f"    handler: {{dir: {FIXTURES}/functions/ticker/src, file: handler.py}}\n"
        f"    schedule: '{cron}'\n"
        "    schedule_input: hello from cron\n"
        f"    environment: {{TICKS_FILE: {ticks}, TICK_SECONDS: '{seconds}'}}\n"
    )
    return stack


def ticks_file(folder: Path) -> Path:
    """In a world-writable folder (shared_tmp): the replica may run as the function user."""
    path = folder / "ticks.jsonl"
    path.touch(mode=0o666)
    path.chmod(0o666)
    return path


@pytest.fixture
def ticks() -> Iterator[Path]:
    with shared_tmp() as folder:
        yield ticks_file(folder)


def runs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_ticks_between_counts_cron_ticks() -> None:
    assert ticks_between(EVERY_SECOND, 1000.0, 1010.0) == 10
    assert ticks_between("*/5 * * * *", 0.0, 3600.0) == 12
    assert ticks_between(EVERY_SECOND, 1000.0, 1000.5) == 0


def test_schedule_runs_each_tick_through_the_gateway_and_skips_busy_ticks(
    tmp_path: Path, ticks: Path
) -> None:
    platform = Platform(tmp_path, write_stack(tmp_path, ticks, seconds=2.5))
    platform.start()
    try:
        wait_for(lambda: len(runs(ticks)) >= 2, 30, "two scheduled runs")
        wait_for(
            lambda: (
                platform.metric(
                    "trigger_ticks_skipped_total", trigger="schedule", function_name="ticker", reason="busy"
                )
                >= 2
            ),
            20,
            "busy skips",
        )
        done = runs(ticks)
        assert all(r["trigger"] == "schedule" and r["input"] == "hello from cron" for r in done)
        assert all(r["topic"] == EVERY_SECOND for r in done)
        ordered = sorted(done, key=lambda r: r["start"])
        for earlier, later in zip(ordered, ordered[1:], strict=False):
            assert later["start"] >= earlier["end"] - 0.01, "two runs of one schedule overlapped"
        ok = platform.metric(
            "trigger_invocations_total", trigger="schedule", function_name="ticker", code="200"
        )
        assert ok >= 2
        # the gateway counted the same calls, as for any caller
        assert platform.metric("gateway_function_invocation_total", function_name="ticker", code="200") >= ok
        stub = gpb_grpc.FxGatewayStub(grpc.insecure_channel(platform.grpc))
        meta = stub.GetMeta(gpb.FunctionRequest(FunctionName="ticker"), timeout=5)
        assert meta.Annotations["openfx.schedule"] == EVERY_SECOND  # what `fn info` shows
    finally:
        platform.stop()


def test_restart_resumes_at_the_next_tick_and_skips_what_was_missed(tmp_path: Path, ticks: Path) -> None:
    platform = Platform(tmp_path, write_stack(tmp_path, ticks, seconds=0))
    platform.start()
    try:
        wait_for(lambda: len(runs(ticks)) >= 2, 30, "scheduled runs")
    finally:
        platform.stop()
    stopped = time.time()
    before = len(runs(ticks))
    wait_for(lambda: time.time() - stopped >= 3.5, 10, "ticks to pass while the platform is down")
    assert len(runs(ticks)) == before  # nothing runs while down
    platform.start()
    restarted = time.time()
    try:
        wait_for(lambda: len(runs(ticks)) > before, 30, "a run after the restart")
        missed = platform.metric(
            "trigger_ticks_skipped_total", trigger="schedule", function_name="ticker", reason="down"
        )
        assert missed >= 3
        after = [r for r in runs(ticks) if r["start"] >= restarted]
        elapsed = time.time() - restarted
        assert len(after) <= elapsed + 1, "missed ticks were caught up instead of skipped"
    finally:
        platform.stop()


@pytest.mark.parametrize("cron", ["every minute", "* * *", "61 * * * *"])
def test_bad_cron_is_a_config_error_naming_the_key(tmp_path: Path, cron: str) -> None:
    stack = write_stack(tmp_path, tmp_path / "t", 0, cron=cron)
    out = subprocess.run(
        [sys.executable, "-m", "openfx.gateway", "-f", str(stack), "--grpc", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("OPENFX_")},
    )
    assert out.returncode == 2 and "schedule" in out.stderr and "not a cron expression" in out.stderr


def test_triggers_reach_a_gateway_bound_to_every_address_on_loopback() -> None:
    from openfx.launcher import _reachable

    assert _reachable("0.0.0.0:31113") == "127.0.0.1:31113"
    assert _reachable("[::]:31114") == "[::1]:31114"
    assert _reachable("127.0.0.1:31114") == "127.0.0.1:31114"
    assert _reachable("gw.internal:31113") == "gw.internal:31113"

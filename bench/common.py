"""Shared benchmark plumbing: start real processes on free loopback ports, measure, print a table."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from openfx.config import load_stack
from openfx.pb import fxgateway_pb2 as gpb
from openfx.pb import fxgateway_pb2_grpc as gpb_grpc
from openfx.watcher.server import WatcherSettings

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Result:
    name: str
    p50_us: float
    p99_us: float
    rps_1: float
    rps_n: float


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def percentiles(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return samples[len(samples) // 2] * 1e6, samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e6


async def measure(
    name: str, call: Callable[[], Awaitable[object]], n_seq: int, concurrency: int, seconds: float
) -> Result:
    for _ in range(min(200, n_seq)):  # warm up
        await call()
    lat = []
    t0 = time.perf_counter()
    for _ in range(n_seq):
        s = time.perf_counter()
        await call()
        lat.append(time.perf_counter() - s)
    rps_1 = n_seq / (time.perf_counter() - t0)
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await call()
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    rps_n = done / (time.perf_counter() - t0)
    p50, p99 = percentiles(lat)
    return Result(name, p50, p99, rps_1, rps_n)


def print_table(title: str, rows: list[Result], reference: str, concurrency: int) -> None:
    ref = next(r for r in rows if r.name == reference)
    print(f"\n{title}")
    head = (
        f"| path | p50 µs | p99 µs | req/s c=1 | req/s c={concurrency} | p50 vs {reference} "
        f"| req/s c={concurrency} vs {reference} |"
    )
    print(head)
    print("|" + "---|" * 7)
    for r in rows:
        print(
            f"| {r.name} | {r.p50_us:,.0f} | {r.p99_us:,.0f} | {r.rps_1:,.0f} | {r.rps_n:,.0f} "
            f"| {r.p50_us / ref.p50_us:.2f}x | {r.rps_n / ref.rps_n:.2f}x |"
        )
    print(f"(median, one run, {os.cpu_count()} cores, Python {sys.version.split()[0]})")


class Platform:
    """A gateway with the given functions, plus each function's standalone watcher on TCP."""

    def __init__(
        self,
        functions: list[str],
        max_inflight: int = 1000,
        environment: dict[str, dict[str, str]] | None = None,
        standalone: bool = True,
        pinned: int | None = None,
    ) -> None:
        """`environment`: per function, variables that override its config's (e.g. the crawler's
        CRAWLER_ALLOW_PRIVATE for a page served on loopback). `standalone`: also run each function's
        watcher on its own (for direct calls). `pinned`: every function keeps exactly that many
        replicas (no autoscaling), so a bench measures the same replicas from run to run."""
        self.tmp = Path(tempfile.mkdtemp(prefix="openfx-bench-"))
        stack = self.tmp / "stack.yaml"
        lines = ["include:"] + [f"  - {ROOT}/functions/{fn}/config.yaml" for fn in functions] + ["functions:"]
        for fn in functions:
            lines += [f"  {fn}:", f"    max_inflight: {max_inflight}"]
            if pinned is not None:
                lines += [f"    {key}: {pinned}" for key in ("replicas", "min_replicas", "max_replicas")]
            if environment and fn in environment:
                lines += ["    environment:"] + [f"      {k}: '{v}'" for k, v in environment[fn].items()]
        stack.write_text("\n".join(lines) + "\n")
        specs = load_stack(stack).functions
        self.grpc = f"127.0.0.1:{free_port()}"
        self.http = f"127.0.0.1:{free_port()}"
        self.log = open(self.tmp / "gateway.log", "wb")
        self.procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "openfx.gateway",
                    "-f",
                    str(stack),
                    "--grpc",
                    self.grpc,
                    "--http",
                    self.http,
                ],
                stdout=self.log,
                stderr=subprocess.STDOUT,
            )
        ]
        self.watchers: dict[str, str] = {}
        for fn in functions if standalone else []:
            address = f"127.0.0.1:{free_port()}"
            settings = WatcherSettings(
                handler_file=f"{ROOT}/functions/{fn}/src/handler.py",
                function_name=fn,
                address=address,
                lock_file=str(self.tmp / f"{fn}.lock"),
            )
            env = {**os.environ, **specs[fn].environment, **settings.to_env()}
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "openfx.watcher"],
                    env=env,
                    stdout=self.log,
                    stderr=subprocess.STDOUT,
                    cwd=ROOT / "functions" / fn,
                )
            )
            self.watchers[fn] = address
        self._wait(functions)

    def _wait(self, functions: list[str], timeout: float = 120) -> None:
        stub = gpb_grpc.FxGatewayStub(grpc.insecure_channel(self.grpc))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                fns = stub.List(gpb.Empty(), timeout=1).Functions
                if len(fns) == len(functions) and all(f.AvailableReplicas for f in fns):
                    for addr in self.watchers.values():
                        grpc.channel_ready_future(grpc.insecure_channel(addr)).result(timeout=30)
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise SystemExit("platform did not become ready; see " + str(self.tmp / "gateway.log"))

    def log_tail(self, lines: int = 30) -> str:
        """The gateway log's last lines (a failing bench prints them: its folder may not outlive it)."""
        self.log.flush()
        text = (self.tmp / "gateway.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(30)
        self.log.close()
        if sys.exc_info()[0] is None:  # closed by a `finally` of a run that failed: keep the logs
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            print(f"logs kept in {self.tmp}", file=sys.stderr)


@contextlib.contextmanager
def scratch(prefix: str = "openfx-bench-", mode: int = 0o700) -> Iterator[Path]:
    """A run's folder for its stack file and logs: removed when the run ends, kept (and named on
    stderr) when it fails, for its logs."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    tmp.chmod(mode)
    try:
        yield tmp
    except BaseException:
        print(f"logs kept in {tmp}", file=sys.stderr)
        raise
    shutil.rmtree(tmp, ignore_errors=True)


def parse_args(parser: argparse.ArgumentParser, **smoke: object) -> argparse.Namespace:
    """Parse, with `--smoke`: the given tiny values replace the sizes, so the test suite can run
    every bench in seconds (a bench that breaks fails CI; its numbers then mean nothing)."""
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: proves the bench runs")
    args = parser.parse_args()
    if args.smoke:
        for name, value in smoke.items():
            setattr(args, name, value)
    return args

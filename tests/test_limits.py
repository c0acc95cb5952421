"""Limits and guards that need no root: quantities and the enforcement decision, the cgroup v2
layout (against a folder laid out like cgroupfs), which cgroup members a watcher ends on its way
out, the framed client's result limit, log capture,
and, on a real gateway with cgroups off, the RSS watchdog, long output lines and oversized results."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import requests

from openfx import framing, procgroup
from openfx.errors import InvokeError
from openfx.gateway.cgroups import Cgroups
from openfx.gateway.framed_client import FramedClient
from openfx.gateway.limits import decide, parse_cpu, parse_memory
from openfx.gateway.logs import LineCutter, RecentOutput
from openfx.pb import fxgateway_pb2 as gpb
from tests.conftest import FIXTURES, MiB, RunningGateway, eventually, free_port, start_gateway

# -- quantities and the decision -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("256Mi", 256 << 20), ("1Gi", 1 << 30), ("500M", 500_000_000), ("1.5Gi", 3 << 29), ("64e6", 64_000_000)],
)
def test_memory_quantities(text: str, size: int) -> None:
    assert parse_memory(text) == size


@pytest.mark.parametrize(("text", "cores"), [("500m", 0.5), ("0.5", 0.5), ("2", 2.0), ("100m", 0.1)])
def test_cpu_quantities(text: str, cores: float) -> None:
    assert parse_cpu(text) == pytest.approx(cores)


@pytest.mark.parametrize("limits", [{"memory": "256"}, {"memory": "lots"}, {"cpu": "1Q"}, {"cpu": "0"}])
def test_bad_limits_are_invalid_argument(limits: dict[str, str]) -> None:
    with pytest.raises(InvokeError) as caught:
        decide("f", limits, {"memory": "cgroup v1", "cpu": "cgroup v1"})
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "f: limits:" in caught.value.message


def test_cpu_limit_without_a_cgroup_is_refused_and_memory_falls_back_to_the_watchdog() -> None:
    with pytest.raises(InvokeError) as caught:
        decide("f", {"cpu": "500m"}, {})
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "limits.cpu 500m cannot be enforced here" in caught.value.message
    assert decide("f", {"memory": "256Mi"}, {}).describe() == {"openfx.limits.memory": "256Mi (RSS watchdog)"}
    both = decide("f", {"memory": "1Gi", "cpu": "2"}, {"memory": "cgroup v2", "cpu": "cgroup v2"})
    assert both.describe() == {
        "openfx.limits.memory": "1Gi (cgroup v2)",
        "openfx.limits.cpu": "2 (cgroup v2 cpu quota)",
    }


def test_the_pids_cap_is_set_only_where_a_pids_cgroup_is() -> None:
    with_pids = decide("f", {}, {"memory": "cgroup v2", "pids": "cgroup v2"}, max_pids=1024)
    assert with_pids.describe() == {"openfx.limits.pids": "1024 processes and threads (cgroup v2)"}
    assert decide("f", {}, {"memory": "cgroup v1"}, max_pids=1024).pids is None
    assert decide("f", {}, {"pids": "cgroup v1"}, max_pids=0).describe() == {}


NO_CAP = "; --max-pids 0 runs replicas without a cap"
PID_MAX = int(Path("/proc/sys/kernel/pid_max").read_text())


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (
            ("--no-cgroups", "--max-pids", "100"),
            "--max-pids 100 cannot be enforced here (no writable pids cgroup)" + NO_CAP,
        ),
        (("--max-pids", "-1"), "--max-pids -1 is not a count" + NO_CAP),
        (("--max-pids", "8"), "--max-pids 8 leaves a replica no room (at least 32)" + NO_CAP),
        (
            ("--max-pids", str(PID_MAX + 1)),
            f"--max-pids {PID_MAX + 1} is more than the kernel's pid_max ({PID_MAX})" + NO_CAP,
        ),
        (
            ("--backend", "kubernetes", "--max-pids", "100"),
            "--max-pids applies to embedded replicas; set podPidsLimit on the cluster",
        ),
    ],
)
def test_a_pids_cap_that_cannot_be_enforced_stops_the_gateway(
    args: tuple[str, ...], problem: str, tmp_path: Path
) -> None:
    """An explicit --max-pids is a limit the user stated: enforced or refused, never ignored (the
    default applies only where a pids cgroup is). The refused gateway leaves no temp folder."""
    out = subprocess.run(
        [sys.executable, "-m", "openfx.gateway", "--no-functions", *args, "--console", ""]
        + ["--grpc", f"127.0.0.1:{free_port()}", "--http", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("OPENFX_")}, "TMPDIR": str(tmp_path)},
    )
    assert out.returncode == 2, out.stderr  # a bad setting, as argparse's own
    assert out.stderr.splitlines()[-1] == f"gateway: {problem}"
    assert "Traceback" not in out.stderr
    assert not list(tmp_path.glob("openfx-*")), list(tmp_path.iterdir())


# -- what a watcher ends on its way out ---------------------------------------------------------


def test_a_watcher_ends_only_members_of_a_cgroup_it_is_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OPENFX_REPLICA_CGROUP names the replica's cgroup.procs files; its members (a setsid child
    included) are what the watcher ends, and only if the watcher itself is listed in every file."""
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        memory, cpu = tmp_path / "memory.procs", tmp_path / "cpu.procs"
        memory.write_text(f"{os.getpid()}\n{child.pid}\n")
        cpu.write_text(f"{child.pid}\n{os.getpid()}\n")
        monkeypatch.setenv(procgroup.CGROUP_ENV, f"{memory}\n{cpu}")
        assert procgroup.own_cgroup_members() == [child.pid]
        cpu.write_text(f"{child.pid}\n")  # a cgroup this process is not in: a stranger's
        assert procgroup.own_cgroup_members() == []
        monkeypatch.setenv(procgroup.CGROUP_ENV, str(tmp_path / "gone.procs"))
        assert procgroup.own_cgroup_members() == []
        monkeypatch.setenv(procgroup.CGROUP_ENV, "")  # no cgroup of its own
        assert procgroup.own_cgroup_members() == []
    finally:
        child.kill()
        child.wait()


# -- cgroup v2 layout ------------------------------------------------------------------------


def test_cgroup_v2_layout_against_a_fake_cgroupfs(tmp_path: Path) -> None:
    """This machine mounts cgroup v1, so v2 is checked against a temporary folder laid out like a
    unified cgroupfs (regular files stand in for the kernel's): the gateway's own cgroup delegates
    memory and cpu through cgroup.subtree_control, its folder nests replica cgroups whose
    memory.max / memory.swap.max / cpu.max are written, and a kill writes cgroup.kill. What a
    real kernel adds (EBUSY for the no-internal-processes rule, rmdir of populated cgroups) is not
    exercised here."""
    own = tmp_path / "system.slice" / "openfx.service"
    own.mkdir(parents=True)
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (own / "cgroup.controllers").write_text("cpu memory pids\n")
    (own / "cgroup.subtree_control").write_text("")
    (own / "cgroup.procs").write_text("4242\n")
    stale = own / "openfx-999999999-abc123"  # a gateway that died: its folder is cleared
    (stale / "f-0-1").mkdir(parents=True)
    self_cgroup = tmp_path / "self-cgroup"
    self_cgroup.write_text("0::/system.slice/openfx.service\n")

    found = Cgroups.detect(root=tmp_path, self_cgroup=self_cgroup, pid=4242)
    assert found is not None and found.version == 2
    assert found.controllers == {"memory": "cgroup v2", "cpu": "cgroup v2", "pids": "cgroup v2"}
    assert (own / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    base = found.bases["memory"]
    assert base.parent == own and base.name.startswith("openfx-4242-")
    assert (base / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    assert not (stale / "f-0-1").exists()

    replica = found.create("echo-0-1")
    assert replica.folders == [base / "echo-0-1"]
    (base / "echo-0-1" / "memory.swap.max").write_text("max\n")  # present on a kernel with swap
    replica.set_memory(256 << 20)
    replica.set_cpu(0.5)
    replica.set_pids(512)
    assert (base / "echo-0-1" / "memory.max").read_text() == str(256 << 20)
    assert (base / "echo-0-1" / "memory.swap.max").read_text() == "0"
    assert (base / "echo-0-1" / "cpu.max").read_text() == "50000 100000"
    assert (base / "echo-0-1" / "pids.max").read_text() == "512"
    (base / "echo-0-1" / "pids.events").write_text("max 7\n")
    assert replica.forks_refused() == 7
    (base / "echo-0-1" / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert replica.oom_kills() == 1
    (base / "echo-0-1" / "cgroup.kill").write_text("")
    replica.kill()
    assert (base / "echo-0-1" / "cgroup.kill").read_text() == "1"


def test_memory_and_cpu_on_v2_win_over_a_lone_v1_pids_hierarchy(tmp_path: Path) -> None:
    """A hybrid layout (v1 mounts only pids; memory and cpu are on the unified tree): the gateway
    uses v2 and removes the folder it made in the v1 pids hierarchy."""
    own = tmp_path / "gw.scope"
    own.mkdir()
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    (own / "cgroup.controllers").write_text("cpu memory\n")
    (own / "cgroup.subtree_control").write_text("+memory +cpu")
    (tmp_path / "pids").mkdir()
    (tmp_path / "pids" / "cgroup.procs").write_text("4242\n")
    self_cgroup = tmp_path / "self-cgroup"
    self_cgroup.write_text("8:pids:/\n0::/gw.scope\n")
    found = Cgroups.detect(root=tmp_path, self_cgroup=self_cgroup, pid=4242)
    assert found is not None and found.version == 2
    assert found.controllers == {"memory": "cgroup v2", "cpu": "cgroup v2"}
    assert [p.name for p in (tmp_path / "pids").iterdir()] == ["cgroup.procs"]


# -- the framed client's result limit ----------------------------------------------------------


def test_framed_client_drops_a_reply_over_the_limit_and_keeps_the_connection(tmp_path: Path) -> None:
    path = str(tmp_path / "w.sock")
    limit = 1 * MiB

    async def watcher(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                length, request_id, _ = framing.HEADER.unpack(await reader.readexactly(framing.HEADER.size))
            except asyncio.IncompleteReadError:
                return
            payload = await reader.readexactly(length)
            size = int(payload)
            writer.write(framing.frame(request_id, 0, b"z" * size))
            await writer.drain()

    async def run() -> tuple[InvokeError, bytes]:
        server = await asyncio.start_unix_server(watcher, path=path)
        client = FramedClient(path, "f[0]", limit)
        await client.connect()
        with pytest.raises(InvokeError) as caught:
            await client.call(str(limit + 64 * 1024).encode(), 10)
        after = await client.call(b"5", 10)
        await client.close()
        server.close()
        return caught.value, after.Output

    error, after = asyncio.run(run())
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.message == f"result of {limit + 64 * 1024} bytes is over the message limit of {limit}"
    assert after == b"zzzzz"


# -- log capture -------------------------------------------------------------------------------


def test_line_cutter_keeps_long_lines_cut_with_a_marker() -> None:
    cutter = LineCutter(max_line=10)
    lines = list(cutter.feed(b"short\n" + b"x" * 25))
    lines += list(cutter.feed(b"yy\nlast"))
    lines += list(cutter.flush())
    assert lines == ["short", "xxxxxxxxxx…[cut 17 bytes]", "last"]


def test_recent_output_is_bounded_in_bytes_and_lines() -> None:
    out = RecentOutput(lines=100, size=1000)
    for i in range(50):
        out.append(f"{i:03d}" + "a" * 96)  # 100 bytes with the newline
    assert len(out) == 10 and out.text().startswith("040")
    assert len(out.text().encode()) <= 1000


# -- a real gateway without cgroups ----------------------------------------------------------


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    log_path = tmp_path_factory.mktemp("plain") / "gateway.log"
    gw = start_gateway(
        FIXTURES / "isolation-plain.yaml",
        log_path,
        "--max-message-bytes",
        str(8 * MiB),
        env={"OPENFX_CGROUPS": "off"},
    )
    try:
        gw.wait_ready()
        yield gw
    finally:
        gw.stop()


def call(gw: RunningGateway, name: str, data: bytes | str, timeout: float = 30) -> bytes:
    payload = data.encode() if isinstance(data, str) else data
    return gw.stub().Invoke(gpb.InvokeServiceRequest(Service=name, Input=payload), timeout=timeout).Msg


def echo_works(gw: RunningGateway) -> None:
    assert call(gw, "echo", b"still here", timeout=10) == b"still here"


def test_rss_watchdog_recycles_a_replica_over_its_memory_limit(plain: RunningGateway) -> None:
    meta = plain.stub().GetMeta(gpb.FunctionRequest(FunctionName="hog"), timeout=10)
    assert meta.Annotations["openfx.limits.memory"] == "128Mi (RSS watchdog)"
    pid = int(call(plain, "hog", "pid"))
    with ThreadPoolExecutor(1) as pool:
        # the call holds 200 MiB for 5 s: the watchdog (every 0.2 s) finds it over while in flight,
        # so this caller is the one told why (a call arriving after the recycle gets UNAVAILABLE)
        breach = pool.submit(call, plain, "hog", "200 hold")
        echo_works(plain)  # during
        with pytest.raises(grpc.RpcError) as caught:
            breach.result()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "memory limit of 128Mi (limits.memory, RSS watchdog)" in caught.value.details()
    new_pid = eventually(lambda: int(call(plain, "hog", "pid", timeout=5)), "hog back")
    assert new_pid != pid
    metrics = requests.get(f"{plain.http_url}/metrics", timeout=10).text
    assert 'gateway_replica_recycled_total{function_name="hog",reason="memory"} 1.0' in metrics
    echo_works(plain)


def test_a_200000_byte_line_is_captured_cut_and_capture_goes_on(plain: RunningGateway) -> None:
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: call(plain, "chatty", "long 200000", timeout=20), range(12)))
    assert results == [b"printed"] * 12  # none blocked on a full pipe

    def log_after_all_twelve() -> str | None:  # output is read as it comes: it may trail the replies
        text = plain.stub().GetLog(gpb.FunctionRequest(FunctionName="chatty"), timeout=10).Msg.decode()
        return text if text.count("chatty[0]: after the long line") >= 12 else None

    log = eventually(log_after_all_twelve, "the twelve calls' last lines in fn log")
    assert f"chatty[0]: {'x' * 4096}…[cut {200000 - 4096} bytes]" in log
    assert log.count("chatty[0]: after the long line") == 12
    assert "after the long line" in plain.log()  # function output reaches the gateway's log
    echo_works(plain)


def test_fn_log_stays_bounded_in_bytes(plain: RunningGateway) -> None:
    assert call(plain, "chatty", "lines 30000", timeout=60) == b"printed"  # 3 MB of output
    log = plain.stub().GetLog(gpb.FunctionRequest(FunctionName="chatty"), timeout=10).Msg
    assert len(log) <= 1 << 20


def test_a_result_over_the_message_limit_is_refused_on_http_and_grpc(plain: RunningGateway) -> None:
    size = 9 * MiB
    r = requests.post(f"{plain.http_url}/function/bigresult", data=str(size), timeout=30)
    assert r.status_code == 429
    assert f"result of {size} bytes is over the message limit of {8 * MiB}" in r.text
    with pytest.raises(grpc.RpcError) as caught:
        call(plain, "bigresult", str(size))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert requests.post(f"{plain.http_url}/function/bigresult", data="3", timeout=10).content == b"rrr"
    echo_works(plain)


def test_a_cpu_limit_is_refused_at_deploy_without_cgroups(plain: RunningGateway) -> None:
    request = gpb.CreateFunctionRequest(
        Service="cpubound",
        Image="cpubound",
        Annotations={"openfx.source": str(FIXTURES / "functions" / "spin" / "src")},
        Limits=gpb.FunctionResources(CPU="500m"),
    )
    with pytest.raises(grpc.RpcError) as caught:
        plain.stub().Deploy(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "limits.cpu 500m cannot be enforced here" in caught.value.details()
    assert "cpubound" not in {f.Name for f in plain.stub().List(gpb.Empty(), timeout=10).Functions}
    echo_works(plain)

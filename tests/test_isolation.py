"""The replica side of issue #12 on a real gateway, with real processes and the kernel's cgroups:
functions run as the function user, limits.memory / limits.cpu are set in the replica's cgroup
(read back from the cgroup's own files), a replica over its memory limit or holding a call past
its timeout is recycled, and a replica's children die with it.

Needs root (to switch users and write cgroups) and writable cgroups; skipped otherwise. Every fault
test also checks that the gateway answers a normal call while and after the fault happens."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import requests

from openfx import defaults
from openfx.gateway.cgroups import Cgroups
from openfx.pb import fxgateway_pb2 as gpb
from tests.conftest import FIXTURES, ROOT, RunningGateway, eventually, start_gateway
from tests.shared_tmp import shared_tmp


def _cgroups_usable() -> bool:
    found = Cgroups.detect()
    if found is None:
        return False
    found.close()
    return {"memory", "cpu"} <= set(found.bases)


pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not _cgroups_usable(), reason="needs root and writable memory/cpu cgroups"
)
CGROUP_ROOT = Path("/sys/fs/cgroup")


@pytest.fixture(scope="module")
def iso(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    log_path = tmp_path_factory.mktemp("iso") / "gateway.log"
    gw = start_gateway(FIXTURES / "isolation.yaml", log_path, env={"OPENFX_TOKEN": "not-for-functions"})
    try:
        gw.wait_ready()
        yield gw
    finally:
        gw.stop()


def call(gw: RunningGateway, name: str, data: bytes | str, timeout: float = 30) -> bytes:
    payload = data.encode() if isinstance(data, str) else data
    return gw.stub().Invoke(gpb.InvokeServiceRequest(Service=name, Input=payload), timeout=timeout).Msg


def call_error(gw: RunningGateway, name: str, data: bytes | str, timeout: float = 30) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(gw, name, data, timeout)
    return caught.value


def echo_works(gw: RunningGateway) -> None:
    assert call(gw, "echo", b"still here", timeout=10) == b"still here"


def cgroup_dir(pid: int, controller: str) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return CGROUP_ROOT / names / path.lstrip("/")
    raise AssertionError(f"{pid} has no {controller} cgroup")


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def recycled(gw: RunningGateway, name: str, reason: str) -> float:
    text = requests.get(f"{gw.http_url}/metrics", timeout=10).text
    key = f'gateway_replica_recycled_total{{function_name="{name}",reason="{reason}"}} '
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(key)), 0.0)


def test_replica_runs_as_the_function_user_with_private_folders(iso: RunningGateway) -> None:
    info = json.loads(call(iso, "whoami", b""))
    assert info["uid"] != 0 and info["euid"] != 0 and 0 not in info["groups"]
    assert info["shadow"] == "denied"
    assert info["tmp_owner"] == info["uid"] and info["tmp_mode"] == "0o700"
    assert info["home"] != info["tmp"] and Path(info["home"]).parent == Path(info["tmp"]).parent
    assert not info["token_seen"]  # the gateway's OPENFX_TOKEN is not handed to functions
    echo_works(iso)


def test_memory_limit_is_in_the_cgroup_and_a_breach_recycles_the_replica(iso: RunningGateway) -> None:
    pid = int(call(iso, "hog", "pid"))
    memory = cgroup_dir(pid, "memory")
    assert (memory / "memory.limit_in_bytes").read_text().strip() == str(128 << 20)
    meta = iso.stub().GetMeta(gpb.FunctionRequest(FunctionName="hog"), timeout=10)
    assert meta.Annotations["openfx.limits.memory"] == "128Mi (cgroup v1)"
    before = recycled(iso, "hog", "memory")
    with ThreadPoolExecutor(1) as pool:
        breach = pool.submit(call_error, iso, "hog", "400")
        echo_works(iso)  # during
        err = breach.result()
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "memory limit of 128Mi" in err.details()
    new_pid = eventually(lambda: int(call(iso, "hog", "pid", timeout=5)), "hog back after its OOM kill")
    assert new_pid != pid and not alive(pid)
    assert not memory.exists()  # the old run's cgroup was removed
    assert recycled(iso, "hog", "memory") == before + 1
    assert call(iso, "hog", "10") == b"held 1 blocks"  # the fresh replica works under its limit
    echo_works(iso)


def test_cpu_limit_is_a_cfs_quota_and_a_busy_handler_is_throttled(iso: RunningGateway) -> None:
    pid = int(call(iso, "spin", "pid"))
    cpu = cgroup_dir(pid, "cpu")
    assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "10000"
    assert (cpu / "cpu.cfs_period_us").read_text().strip() == "100000"
    call(iso, "spin", "0.5")
    stat = dict(line.split() for line in (cpu / "cpu.stat").read_text().splitlines())
    assert int(stat["nr_throttled"]) > 0
    meta = iso.stub().GetMeta(gpb.FunctionRequest(FunctionName="spin"), timeout=10)
    assert meta.Annotations["openfx.limits.cpu"] == "100m (cgroup v1 cpu quota)"
    echo_works(iso)


def test_every_replica_has_the_default_pids_cap(iso: RunningGateway) -> None:
    pid = json.loads(call(iso, "whoami", b""))["pid"]
    assert (cgroup_dir(pid, "pids") / "pids.max").read_text().strip() == str(defaults.MAX_PIDS)
    meta = iso.stub().GetMeta(gpb.FunctionRequest(FunctionName="whoami"), timeout=10)
    expected = f"{defaults.MAX_PIDS} processes and threads (cgroup v1)"
    assert meta.Annotations["openfx.limits.pids"] == expected


def test_a_fork_bomb_stops_at_the_replicas_pids_cap(tmp_path: Path) -> None:
    """Threads and processes count alike against the pids cgroup: a handler starting threads
    without end gets EAGAIN at the cap (`--max-pids 48`, the watcher's own threads included), the
    kernel counts the refusals, and the replica and the gateway go on answering."""
    stack = tmp_path / "stack.yaml"
    stack.write_text(
        f"include: [{ROOT}/functions/echo/config.yaml]\n"
        f"functions:\n  forker:\n    handler: {{dir: {FIXTURES}/functions/forker/src}}\n"
    )
    gw = start_gateway(stack, tmp_path / "gateway.log", "--max-pids", "48")
    try:
        gw.wait_ready()
        pid = int(call(gw, "forker", b"pid"))
        pids = cgroup_dir(pid, "pids")
        assert (pids / "pids.max").read_text().strip() == "48"
        refused = int((pids / "pids.events").read_text().split()[1])
        started = int(call(gw, "forker", b"go", timeout=60))
        assert 0 < started < 48
        assert int((pids / "pids.events").read_text().split()[1]) > refused  # the kernel said no
        # joined threads leave the kernel's count a moment after join() returns
        eventually(lambda: int((pids / "pids.current").read_text()) <= 48 - started, "threads released")
        again = int(call(gw, "forker", b"go", timeout=60))
        assert abs(again - started) <= 2  # the same room again (gRPC's own threads may vary)
        assert int(call(gw, "forker", b"pid")) == pid  # the same replica
        meta = gw.stub().GetMeta(gpb.FunctionRequest(FunctionName="forker"), timeout=10)
        assert meta.Annotations["openfx.limits.pids"] == "48 processes and threads (cgroup v1)"
        # a replica that dies at its cap says so (gRPC's runtime aborts one that cannot start a thread)
        assert call_error(gw, "forker", b"exit").code() == grpc.StatusCode.UNAVAILABLE
        said = "forker[0]: process exited with code 3 after its cap of 48 processes and threads (--max-pids)"

        def log_says() -> bool:
            log = gw.stub().GetLog(gpb.FunctionRequest(FunctionName="forker"), timeout=10).Msg.decode()
            return said + " refused" in log

        eventually(log_says, "the cap named in the exit line")
        assert eventually(lambda: int(call(gw, "forker", b"pid", timeout=5)), "forker back") != pid
        echo_works(gw)
    finally:
        gw.stop()


def test_fn_info_shows_limits_and_how_they_are_enforced(iso: RunningGateway) -> None:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "openfx-cli"), "fn", "info", "hog", "-g", iso.grpc_address],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **iso.admin_env},
    )
    assert out.returncode == 0, out.stderr
    pids = f"  pids: {defaults.MAX_PIDS} processes and threads (cgroup v1)\n"
    assert "limits:\n  memory: 128Mi (cgroup v1)\n" + pids in out.stdout


def test_a_call_past_its_timeout_recycles_the_replica_and_others_on_it_get_unavailable(
    iso: RunningGateway,
) -> None:
    pid = int(call(iso, "hold", "pid"))
    before = recycled(iso, "hold", "timeout")
    with shared_tmp() as folder, ThreadPoolExecutor(2) as pool:
        first = pool.submit(call_error, iso, "hold", f"hold {folder}/a")
        assert first.result().code() == grpc.StatusCode.DEADLINE_EXCEEDED  # after its 3 s timeout
        # a second call on the same replica, sent after the first timed out: the first one's
        # timeout + 2 s grace passes while this one is still within its own timeout
        second = pool.submit(call_error, iso, "hold", f"hold {folder}/b")
        eventually(lambda: (folder / "b.started").exists(), "second call in the handler")
        echo_works(iso)  # during
        err = second.result()
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "timeout of 3s" in err.details()
    new_pid = eventually(lambda: int(call(iso, "hold", "pid", timeout=5)), "hold back after recycling")
    assert new_pid != pid and not alive(pid)  # the stuck handler's work ended with its process
    assert recycled(iso, "hold", "timeout") == before + 1
    echo_works(iso)


def test_all_workers_held_past_the_timeout_is_never_ready(iso: RunningGateway) -> None:
    """wedge has 2 workers and a 1 s timeout: both held past it, the replica is recycled at once."""
    pid = int(call(iso, "wedge", "pid"))
    with shared_tmp() as folder, ThreadPoolExecutor(2) as pool:
        held = [pool.submit(call_error, iso, "wedge", f"hold {folder}/{i}") for i in range(2)]
        assert [f.result().code() for f in held] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2
    message = "wedge[0] was recycled: a call ran past wedge's timeout of 1s in all 2 workers"
    eventually(lambda: message in iso.log(), "wedge recycled")
    new_pid = eventually(lambda: int(call(iso, "wedge", "pid", timeout=5)), "wedge back")
    assert new_pid != pid
    echo_works(iso)


def test_children_die_with_the_replica_on_scale_down_even_after_setsid(iso: RunningGateway) -> None:
    grouped, escaped = map(int, call(iso, "spawner", b"go").split())
    pid = int(call(iso, "spawner", "pid"))
    memory = cgroup_dir(pid, "memory")
    assert alive(grouped) and alive(escaped) and os.getpgid(escaped) != pid
    iso.stub().ReplicaUpdate(gpb.ScaleServiceRequest(ServiceName="spawner", Replicas=0), timeout=60)
    eventually(lambda: not alive(grouped) and not alive(escaped) and not alive(pid), "children gone")
    assert not memory.exists()
    echo_works(iso)
    iso.stub().ReplicaUpdate(gpb.ScaleServiceRequest(ServiceName="spawner", Replicas=1), timeout=60)
    iso.wait_ready(names={"spawner"})


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        ("sigkill", None),  # killed from outside
        ("crash", grpc.StatusCode.UNAVAILABLE),  # the watcher exits under a call
        ("hog", grpc.StatusCode.RESOURCE_EXHAUSTED),  # OOM-killed in its cgroup: recycled
    ],
)
def test_children_die_when_the_replica_ends_and_is_restarted(
    iso: RunningGateway, fault: str, code: grpc.StatusCode | None
) -> None:
    grouped, escaped = map(int, call(iso, "spawner", b"go").split())
    pid = int(call(iso, "spawner", "pid"))
    assert alive(grouped) and alive(escaped) and os.getpgid(escaped) != pid
    if code is None:
        os.kill(pid, signal.SIGKILL)
    else:
        assert call_error(iso, "spawner", fault).code() == code
    new_pid = eventually(lambda: int(call(iso, "spawner", "pid", timeout=5)), f"spawner back after {fault}")
    assert new_pid != pid
    eventually(lambda: not alive(grouped) and not alive(escaped), f"children gone after {fault}")
    echo_works(iso)


def test_children_die_with_the_replica_on_delete_and_gateway_exit(tmp_path: Path) -> None:
    gw = start_gateway(FIXTURES / "isolation.yaml", tmp_path / "gateway.log")
    try:
        gw.wait_ready()
        first = [int(p) for p in call(gw, "spawner", b"go").split()]
        gw.stub().Delete(gpb.DeleteFunctionRequest(FunctionName="spawner"), timeout=60)
        eventually(lambda: not any(map(alive, first)), "children gone after delete")
        echo_works(gw)
        pid = json.loads(call(gw, "whoami", b""))["pid"]
        assert gw.stop() == 0
        eventually(lambda: not alive(pid), "replicas gone after the gateway stopped")
    finally:
        gw.stop()


def test_gateway_killed_the_watcher_takes_its_process_group_down(tmp_path: Path) -> None:
    """SIGKILL leaves the gateway no chance to clean up: PDEATHSIG gives each watcher SIGTERM and the
    watcher ends its own process group on the way out, and every process of its own cgroup: a child
    that called setsid (it left the group) dies too, with no gateway left to kill it. The killed
    gateway's temp folders (its run dir; the replicas' folders when it switches user) are left
    behind, and the next gateway removes them: only its own user's, only of dead gateways, never
    through a link."""
    escaped = 0
    with shared_tmp() as temp:
        env = {"TMPDIR": str(temp)}
        gw = start_gateway(FIXTURES / "isolation.yaml", tmp_path / "gateway.log", env=env)
        try:
            gw.wait_ready()
            grouped, escaped = map(int, call(gw, "spawner", b"go").split())
            watcher = int(call(gw, "spawner", "pid"))
            assert alive(escaped) and os.getpgid(escaped) != watcher
            gw.process.send_signal(signal.SIGKILL)
            gw.process.wait()
            eventually(
                lambda: not alive(grouped) and not alive(escaped) and not alive(watcher),
                "group and setsid child gone after SIGKILL",
            )
        finally:
            gw.stop()
            if escaped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(escaped, signal.SIGKILL)

        dead = gw.process.pid
        left = sorted(p.name for p in temp.glob(f"openfx-*-{dead}-*"))
        kinds = ["fn", "gw"] if os.geteuid() == 0 else ["gw"]  # root switches to the function user
        assert [name.split("-")[1] for name in left] == kinds, left
        assert all((temp / name / ".in-use").is_file() for name in left)  # each one's lock file
        keep = temp / "keep"
        keep.mkdir()
        (keep / "data").write_text("kept")
        (temp / f"openfx-gw-{dead}-link").symlink_to(keep)
        (temp / f"openfx-gw-{os.getpid()}-live").mkdir()  # its gateway (this process) is alive
        held = temp / f"openfx-gw-{dead}-held"  # a gateway this process cannot see holds its lock
        held.mkdir()
        lock = os.open(held / ".in-use", os.O_WRONLY | os.O_CREAT, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)
        foreign = temp / f"openfx-fn-{dead}-foreign"
        foreign.mkdir()
        if os.geteuid() == 0:
            os.chown(foreign, 65534, 65534)
        else:
            foreign.rmdir()  # a non-root test cannot make a folder another user owns

        second = start_gateway(FIXTURES / "isolation.yaml", tmp_path / "second.log", env=env)
        try:
            second.wait_ready()
            assert not any((temp / name).exists() for name in left), sorted(os.listdir(temp))
            assert (keep / "data").read_text() == "kept"
            assert (temp / f"openfx-gw-{dead}-link").is_symlink()
            assert (temp / f"openfx-gw-{os.getpid()}-live").is_dir()
            assert held.is_dir()
            assert foreign.is_dir() or os.geteuid() != 0
            own = sorted(p.name.split("-")[1] for p in temp.glob(f"openfx-*-{second.process.pid}-*"))
            assert own == kinds
            assert second.stop() == 0
            assert not list(temp.glob(f"openfx-*-{second.process.pid}-*"))  # a clean stop removes its own
        finally:
            second.stop()
            os.close(lock)


HOSTILE = FIXTURES / "functions" / "hostile" / "src"


def _deploy_hostile(gw: RunningGateway, name: str) -> None:
    gw.stub().Deploy(
        gpb.CreateFunctionRequest(
            Service=name,
            Image=name,
            Annotations={"openfx.source": str(HOSTILE), "openfx.handler.file": "handler.py"},
            MinReplicas=1,
            MaxReplicas=1,
        ),
        timeout=60,
    )
    eventually(lambda: call(gw, "echo", b"x", timeout=5) == b"x", "gateway answering")


def _root_owned_secret(folder: Path) -> tuple[Path, str]:
    folder.mkdir(mode=0o755)
    secret = folder / "secret"
    word = os.urandom(12).hex()
    secret.write_text(word)
    secret.chmod(0o600)
    return secret, word


@pytest.mark.parametrize("folder", ["home", "tmp"])
def test_a_replica_cannot_make_the_gateway_chown_through_a_symlink(
    iso: RunningGateway, tmp_path: Path, folder: str
) -> None:
    """The function swaps its HOME / TMPDIR for a symlink to a root-owned folder and dies: the
    gateway prepares the next run's folders as root, and must not hand the link's target over."""
    victim = tmp_path / "victim"
    secret, _ = _root_owned_secret(victim)
    name = f"hostile-{folder}"
    _deploy_hostile(iso, name)
    try:
        with contextlib.suppress(grpc.RpcError):
            call(iso, name, f"{folder} {victim}", timeout=30)  # the replica kills itself
        eventually(lambda: call(iso, "echo", b"y", timeout=5) == b"y", "gateway answering")
        eventually(lambda: call(iso, name, b"ping", timeout=5) == b"pong", "the next run answering")
        assert (victim.stat().st_uid, secret.stat().st_uid) == (0, 0), "chowned through the link"
        assert oct(secret.stat().st_mode & 0o777) == "0o600"
        echo_works(iso)
    finally:
        iso.stub().Delete(gpb.DeleteFunctionRequest(FunctionName=name), timeout=60)


def test_a_replica_cannot_make_the_gateway_read_a_file_for_it(iso: RunningGateway, tmp_path: Path) -> None:
    """The function links its failure file to a root-only file and exits before it is ready: the
    gateway reads that file as root to say why, and would publish it (fn list is open to anyone)."""
    secret, word = _root_owned_secret(tmp_path / "private")
    name = "hostile-leak"
    _deploy_hostile(iso, name)
    try:
        with contextlib.suppress(grpc.RpcError):
            call(iso, name, f"leak {secret}", timeout=30)

        def failed_again() -> bool:
            meta = iso.stub().GetMeta(gpb.FunctionRequest(FunctionName=name), timeout=10)
            error = meta.Annotations.get("openfx.error", "")
            return "exited with code 1" in error or "cannot load the handler" in error

        eventually(failed_again, "the replica failing at start")
        anonymous = iso.stub(None)
        listed = anonymous.List(gpb.Empty(), timeout=10)
        assert word not in str(listed)
        assert word not in Path(iso.log_path).read_text(errors="replace")
        echo_works(iso)
    finally:
        iso.stub().Delete(gpb.DeleteFunctionRequest(FunctionName=name), timeout=60)

"""`openfx-cli` as a user types it: real subprocesses against a real gateway."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from openfx.pb import fxgateway_pb2 as gpb
from tests.conftest import (
    FIXTURES,
    READY_FUNCTIONS,
    ROOT,
    USER_CONFIG,
    RunningGateway,
    eventually,
    free_port,
)
from tests.mqtt_helpers import Device
from tests.shared_tmp import shared_tmp

CLI = str(Path(sys.executable).parent / "openfx-cli")


def cli(
    *args: str, stdin: bytes = b"", cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [CLI, *args],
        input=stdin,
        capture_output=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, "OPENFX_CONFIG": str(USER_CONFIG), **(env or {})},
    )


def test_version_and_runtimes() -> None:
    assert cli("version").stdout == b"Version: 0.1.0\n"
    assert b"python3" in cli("runtime", "list").stdout.split()


def test_fn_call_reads_stdin_writes_raw_result(gateway: RunningGateway) -> None:
    out = cli("fn", "call", "echo", "-g", gateway.grpc_address, stdin=b"hi\n")
    assert out.returncode == 0 and out.stdout == b"hi\n"
    out = cli("function", "invoke", "binary", stdin=b"", env={"OPENFX_URL": gateway.grpc_address})
    assert out.stdout == bytes(range(256))


def test_friendly_errors(gateway: RunningGateway, tmp_path: Path) -> None:
    out = cli("fn", "call", "nope", "-g", gateway.grpc_address)
    assert out.returncode == 1
    assert out.stderr.decode().strip() == (
        "Error: function 'nope' not found ('openfx-cli fn list' shows what is deployed)"
    )
    out = cli("down", "-f", str(tmp_path / "none.yaml"), env={"OPENFX_HOME": ""})
    assert (
        out.stderr.decode().strip()
        == f"Error: {tmp_path / 'none.yaml'}: file not found (give down the -f you gave up)"
    )
    (tmp_path / "idle.yaml").write_text("functions: {}\n")
    out = cli("down", "-f", str(tmp_path / "idle.yaml"), env={"OPENFX_HOME": ""})
    assert out.stderr.decode().strip() == (
        f"Error: not running (no live pid in {tmp_path / '.openfx' / 'gateway.pid'}): "
        "run down with the same -f and OPENFX_HOME as up"
    )
    out = cli("fn", "call", "echo", "-g", f"127.0.0.1:{free_port()}", stdin=b"x")
    assert out.returncode == 1 and b"cannot reach the gateway" in out.stderr
    assert out.stderr.count(b"\n") == 1
    bad = tmp_path / "config.yaml"
    bad.write_text("functions:\n  x:\n    imagee: y\n")
    out = cli("fn", "deploy", "-f", str(bad), "-g", gateway.grpc_address)
    assert out.returncode == 1 and f"{bad}: unknown key 'imagee'".encode() in out.stderr
    out = cli("fn", "call", "fail", "-g", gateway.grpc_address, stdin=b"bad")
    assert out.returncode == 1 and b"INVALID_ARGUMENT: input must not be 'bad'" in out.stderr


def table(listing: str) -> dict[str, dict[str, str]]:
    """`fn list` output as {name: {column: cell}}, cut at the header's column positions (cells
    may hold spaces: "Not Ready", descriptions)."""
    header, *rows = [line for line in listing.splitlines() if line.strip()]
    names = header.split()
    starts = [header.index(n) for n in names] + [None]
    out = {}
    for row in rows:
        cells = {n: row[starts[i] : starts[i + 1]].strip() for i, n in enumerate(names)}
        out[cells["Function"]] = cells
    return out


def test_list_info_log(gateway: RunningGateway) -> None:
    from tests.test_gateway_manage import meta, wait_for

    cli("fn", "call", "printer", "-g", gateway.grpc_address, stdin=b"abc")
    wait_for(lambda: "openfx.error" in meta(gateway, "badimport").Annotations, what="badimport's error")
    out = cli("fn", "list", "-g", gateway.grpc_address)
    rows = table(out.stdout.decode())
    assert rows["echo"]["Status"] == "Ready" and rows["echo"]["Replicas"] == "1/1"
    assert rows["echo"]["Description"] == "Returns its input, byte for byte"
    assert rows["badimport"]["Status"] == "Error" and rows["badimport"]["Replicas"] == "0/1"
    assert set(rows) >= READY_FUNCTIONS | {"badimport"}
    assert out.stderr.startswith(b"badimport: badimport[0]")  # the error, under the table
    info = yaml.safe_load(cli("fn", "info", "echo", "-g", gateway.grpc_address).stdout)
    assert info["name"] == "echo" and info["availablereplicas"] == 1 and info["status"] == "Ready"
    bad = yaml.safe_load(cli("fn", "info", "badimport", "-g", gateway.grpc_address).stdout)
    assert bad["status"] == "Error" and bad["availablereplicas"] == 0
    log = cli("fn", "log", "printer", "-g", gateway.grpc_address).stdout
    assert b"printer got 3 bytes" in log


def test_config_file_commands_and_gateway_precedence(gateway: RunningGateway, tmp_path: Path) -> None:
    """deploy/list/delete -f act on the config's functions only; the config's gateway wins over
    OPENFX_URL, and -g over both; --no-update refuses an existing function, --replace recreates it."""
    pid_src = FIXTURES / "functions/pid/src"
    config = tmp_path / "two.yaml"
    config.write_text(
        f"functions:\n  clia: {{handler: {{dir: {pid_src}}}}}\n  clib: {{handler: {{dir: {pid_src}}}}}\n"
        f"openfx: {{gateway: '{gateway.grpc_address}'}}\n"
    )
    dead = {"OPENFX_URL": f"127.0.0.1:{free_port()}"}
    out = cli("fn", "deploy", "-f", str(config), env=dead)  # the config's gateway, not OPENFX_URL
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().count("Deploying Function...") == 2
    try:
        listed = cli("fn", "list", "-f", str(config), env=dead)
        assert listed.returncode == 0, listed.stderr
        rows = table(listed.stdout.decode())
        assert set(rows) == {"clia", "clib"} and {r["Status"] for r in rows.values()} == {"Ready"}

        elsewhere = cli("fn", "list", "-f", str(config), "-g", dead["OPENFX_URL"])  # -g wins
        assert elsewhere.returncode == 1 and b"cannot reach the gateway at " + dead[
            "OPENFX_URL"
        ].encode() in (elsewhere.stderr)
        no_gateway = tmp_path / "nogw.yaml"
        no_gateway.write_text(f"functions:\n  clia: {{handler: {{dir: {pid_src}}}}}\n")
        via_env = cli("fn", "list", "-f", str(no_gateway), env={"OPENFX_URL": gateway.grpc_address})
        assert via_env.returncode == 0 and set(table(via_env.stdout.decode())) == {"clia"}

        refused = cli("fn", "deploy", "-f", str(config), "--no-update")
        assert refused.returncode == 1 and b"ALREADY_EXISTS" in refused.stderr, refused.stderr
        both = cli("fn", "deploy", "-f", str(config), "--replace", "--update")
        assert both.returncode == 1 and b"--replace and --update cannot be used together" in both.stderr

        before = cli("fn", "call", "clia", "-g", gateway.grpc_address).stdout
        replaced = cli("fn", "deploy", "-f", str(config), "--replace")
        assert replaced.returncode == 0, replaced.stderr
        assert b"rolling-update" not in replaced.stdout and b"Attempting update" not in replaced.stdout
        after = cli("fn", "call", "clia", "-g", gateway.grpc_address).stdout
        assert after.isdigit() and before.isdigit() and after != before  # a new process
    finally:
        deleted = cli("fn", "delete", "-f", str(config))
    assert deleted.returncode == 0 and deleted.stdout == b"Deleted: clia\nDeleted: clib\n", deleted.stderr
    names = {f.Name for f in gateway.stub().List(gpb.Empty(), timeout=5).Functions}
    assert not names & {"clia", "clib"} and "echo" in names
    gone = cli("fn", "delete", "-f", str(config))
    assert gone.returncode == 1 and b"function 'clia' not found" in gone.stderr


def test_init_run_deploy_call_delete(gateway: RunningGateway, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # replicas run as the function user: a folder it cannot read is refused at deploy, one line
        out = cli("fn", "init", "private", "--runtime", "python3", cwd=tmp_path)  # tmp_path is 0700
        out = cli("fn", "deploy", "-f", str(tmp_path / "private/config.yaml"), "-g", gateway.grpc_address)
        assert out.returncode == 1 and b"function user openfx-fn cannot read" in out.stderr, out.stderr
        assert out.stderr.count(b"\n") == 1
    with shared_tmp() as folder:
        _init_run_deploy_call_delete(gateway, folder)


def _init_run_deploy_call_delete(gateway: RunningGateway, tmp_path: Path) -> None:
    out = cli("fn", "init", "hello", "--runtime", "python3", cwd=tmp_path)
    assert out.returncode == 0 and b"Config file written" in out.stdout
    config = tmp_path / "hello" / "config.yaml"
    assert (tmp_path / "hello/src/handler.py").exists()
    out = cli("fn", "run", "-f", str(config), stdin=b"x", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout == b"Hello from OpenFx: x", out.stderr
    out = cli("fn", "deploy", "-f", str(config), "-g", gateway.grpc_address, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"http trigger url: {gateway.http_url}/function/hello".encode() in out.stdout
    assert (
        cli("fn", "call", "hello", "-g", gateway.grpc_address, stdin=b"y").stdout == b"Hello from OpenFx: y"
    )
    out = cli("fn", "deploy", "-f", str(config), "-g", gateway.grpc_address, cwd=tmp_path)
    assert b"already exists, attempting rolling-update" in out.stdout
    assert cli("fn", "rm", "hello", "-g", gateway.grpc_address).returncode == 0
    assert cli("fn", "call", "hello", "-g", gateway.grpc_address).returncode == 1


def test_build_renders_context_without_docker_engine(tmp_path: Path) -> None:
    home = {"HOME": str(tmp_path / "home")}  # fn build also stores the image: not in the user's store
    out = cli("fn", "build", "-f", str(ROOT / "functions/echo/config.yaml"), "-o", str(tmp_path), env=home)
    assert out.returncode == 0, out.stderr
    context = tmp_path / "echo"
    for item in (
        "Dockerfile",
        "watcher-requirements.txt",
        "function/src/handler.py",
        "function/requirements.txt",
        "openfx/watcher/server.py",
        "openfx/pb/fxwatcher_pb2.py",
    ):
        assert (context / item).exists(), item
    assert not (context / "openfx/gateway").exists()
    assert b"docker build -t localhost:5000/openfx/echo" in out.stdout


def _echo_with_mqtt(tmp_path: Path, mqtt_port: int, extra: str = "") -> Path:
    """A stack of echo (plus `extra` YAML lines) with the MQTT broker on `mqtt_port` and the repo's
    bridge.yaml, its metrics on a free port (9101 may be taken by another platform)."""
    bridge = tmp_path / "bridge.yaml"
    bridge.write_text(
        (ROOT / "broker/bridge.yaml").read_text().replace("127.0.0.1:9101", f"127.0.0.1:{free_port()}")
    )
    stack = tmp_path / "openfx.yaml"
    stack.write_text(
        f"include: [{ROOT}/functions/echo/config.yaml]\n{extra}"
        f"mqtt: {{port: {mqtt_port}, persistence: false, bridge: {bridge}}}\n"
    )
    return stack


def test_up_detached_and_down(tmp_path: Path) -> None:
    """The whole embedded platform: gateway + functions + mosquitto + bridge, then down."""
    mqtt_port = free_port()
    # kept at one by up --no-scale-to-zero
    stack = _echo_with_mqtt(tmp_path, mqtt_port, "functions: {echo: {scale_to_zero_after: 1s}}\n")
    grpc_address, http_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    console = f"127.0.0.1:{free_port()}"
    user_config = tmp_path / "home" / "config.yaml"  # a new user: no config, no token yet
    env = {"OPENFX_HOME": str(tmp_path / "state"), "OPENFX_CONFIG": str(user_config)}
    where = ("--grpc", grpc_address, "--http", http_address, "--console", console)
    out = cli("up", "-d", "-f", str(stack), *where, "--no-scale-to-zero", env=env)
    try:
        assert out.returncode == 0, out.stderr
        assert b"OpenFx is up" in out.stdout
        # where the console is and how to get the token it asks for
        hint = f"console: http://{console}/ (sign in with the token 'openfx-cli token' prints)\n"
        assert out.stdout.decode().endswith(hint), out.stdout
        assert requests.get(f"http://{console}/", timeout=10).status_code == 200
        token_file = user_config.with_name("token")
        assert token_file.stat().st_mode & 0o777 == 0o600
        assert yaml.safe_load(user_config.read_text()) == {"openfx": {"token_file": str(token_file)}}
        printed = cli("token", env=env).stdout.decode().strip()
        assert printed == token_file.read_text().strip() and len(printed) >= 32
        assert cli("fn", "call", "echo", "-g", grpc_address, stdin=b"hi").stdout == b"hi"
        info = yaml.safe_load(cli("fn", "info", "echo", "-g", grpc_address, env=env).stdout)
        assert info["scaling"].endswith("(scale to zero is off on this gateway: at least 1)"), info
        # our CLI manages with the token by itself; anyone without it cannot
        assert cli("fn", "log", "echo", "-g", grpc_address, env=env).returncode == 0
        anonymous = cli(
            "fn", "log", "echo", "-g", grpc_address, env={"OPENFX_CONFIG": str(tmp_path / "none")}
        )
        assert anonymous.returncode == 1 and b"management needs a token" in anonymous.stderr
        device = Device(mqtt_port, ["fn/echo/reply"])
        try:
            device.request("fn/echo", b"over mqtt")
            assert device.next().payload == b"over mqtt"
        finally:
            device.close()
        again = cli("up", "-d", "-f", str(stack), "--grpc", grpc_address, "--http", http_address, env=env)
        assert again.returncode == 1 and b"already running" in again.stderr
    finally:
        down = cli("down", "-f", str(stack), env=env)
    assert down.returncode == 0 and down.stdout == b"OpenFx is down.\n"
    assert cli("fn", "call", "echo", "-g", grpc_address, stdin=b"hi").returncode == 1
    assert cli("down", "-f", str(stack), env=env).returncode == 1
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", mqtt_port)) != 0  # the broker stopped too


def test_up_passes_max_pids_to_the_gateway(tmp_path: Path) -> None:
    """`up --max-pids` reaches the gateway, whose refusal of a cap too small is up's one-line error."""
    stack = tmp_path / "openfx.yaml"
    stack.write_text(f"include: [{ROOT}/functions/echo/config.yaml]\n")
    env = {"OPENFX_HOME": str(tmp_path / "state"), "OPENFX_CONFIG": str(tmp_path / "home" / "config.yaml")}
    where = ("--grpc", f"127.0.0.1:{free_port()}", "--http", f"127.0.0.1:{free_port()}", "--console", "")
    out = cli("up", "-d", "-f", str(stack), *where, "--no-mqtt", "--max-pids", "8", env=env)
    assert out.returncode == 1
    assert (
        out.stderr.decode()
        .strip()
        .endswith(
            "platform: --max-pids 8 leaves a replica no room (at least 32); "
            "--max-pids 0 runs replicas without a cap"
        )
    )


def test_up_with_an_invoke_token_gives_the_bridge_a_token(tmp_path: Path) -> None:
    """With OPENFX_INVOKE_TOKEN set, invoking needs a token: the bridge the platform starts must
    carry one, or every MQTT request is answered UNAUTHENTICATED."""
    mqtt_port = free_port()
    stack = _echo_with_mqtt(tmp_path, mqtt_port)
    env = {
        "OPENFX_HOME": str(tmp_path / "state"),
        "OPENFX_CONFIG": str(tmp_path / "home" / "config.yaml"),
        "OPENFX_INVOKE_TOKEN": "invoke-only-secret",
    }
    where = [a for _ in range(3) for a in ("", f"127.0.0.1:{free_port()}")]
    where[0::2] = ["--grpc", "--http", "--console"]
    out = cli("up", "-d", "-f", str(stack), *where, "--no-scale-to-zero", env=env)
    try:
        assert out.returncode == 0, out.stderr
        anonymous = cli(
            "fn", "call", "echo", "-g", where[1], stdin=b"x", env={"OPENFX_CONFIG": str(tmp_path / "none")}
        )
        assert anonymous.returncode == 1 and b"missing bearer token" in anonymous.stderr  # invoking is closed
        device = Device(mqtt_port, ["fn/echo/reply", "dlq/fn/echo"])
        try:
            device.request("fn/echo", b"over mqtt with tokens")
            reply = device.next()
            assert (reply.topic, reply.payload) == ("fn/echo/reply", b"over mqtt with tokens")
        finally:
            device.close()
    finally:
        down = cli("down", "-f", str(stack), env=env)
    assert down.returncode == 0, down.stderr


needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus")


@needs_prometheus
def test_up_detached_writes_every_log_owner_only(tmp_path: Path) -> None:
    """Logs hold functions' output and refused callers: other local users must not read them.
    Every log in the state folder (gateway.log and its rotations, platform.out where the bridge
    writes too, mosquitto.log, prometheus.log) is 0600, under a umask that would leave it 0644;
    a platform.out an older version left 0644 is narrowed."""
    stack = _echo_with_mqtt(tmp_path, free_port())
    state = tmp_path / "state"
    state.mkdir()
    (state / "platform.out").write_bytes(b"from an older version\n")
    (state / "platform.out").chmod(0o644)
    env = {
        "OPENFX_HOME": str(state),
        "OPENFX_CONFIG": str(tmp_path / "home" / "config.yaml"),
        "OPENFX_LOG_MAX_BYTES": "100",  # the start's own lines rotate gateway.log
        "OPENFX_LOG_BACKUPS": "2",
    }
    grpc_address, http, console, prometheus = (f"127.0.0.1:{free_port()}" for _ in range(4))
    where = ("--grpc", grpc_address, "--http", http, "--console", console, "--prometheus", prometheus)
    umask = os.umask(0o022)
    try:
        out = cli("up", "-d", "-f", str(stack), *where, "--monitoring", env=env)
    finally:
        os.umask(umask)
    try:
        assert out.returncode == 0, out.stderr
        logs = {
            p.name: p.stat().st_mode & 0o777
            for p in state.iterdir()
            if ".log" in p.name or p.suffix == ".out"
        }
        expected = {"gateway.log", "gateway.log.1", "platform.out", "mosquitto.log", "prometheus.log"}
        assert expected <= set(logs), logs
        assert logs == dict.fromkeys(logs, 0o600), logs
    finally:
        down = cli("down", "-f", str(stack), env=env)
    assert down.returncode == 0, down.stderr


Up = tuple[subprocess.CompletedProcess[bytes], dict[str, str], str]


def _monitored_up(tmp_path: Path, prometheus: str) -> Up:
    """`up -d --monitoring` of echo alone, every address free (a system Prometheus may hold 9090):
    up's answer, the environment that finds its state, its HTTP address."""
    stack = tmp_path / "openfx.yaml"
    stack.write_text(f"include: [{ROOT}/functions/echo/config.yaml]\n")
    env = {"OPENFX_HOME": str(tmp_path / "state"), "OPENFX_CONFIG": str(tmp_path / "home" / "config.yaml")}
    grpc_address, http, console = (f"127.0.0.1:{free_port()}" for _ in range(3))
    where = ("--grpc", grpc_address, "--http", http, "--console", console, "--no-mqtt")
    out = cli("up", "-d", "-f", str(stack), *where, "--monitoring", "--prometheus", prometheus, env=env)
    return out, env, http


@needs_prometheus
def test_up_monitoring_scrapes_the_gateway_and_down_stops_it(tmp_path: Path) -> None:
    prometheus = f"127.0.0.1:{free_port()}"
    out, env, http = _monitored_up(tmp_path, prometheus)
    try:
        assert out.returncode == 0, out.stderr
        assert f"prometheus: http://{prometheus}/ (stopped by 'openfx-cli down')" in out.stdout.decode()

        def gateway_target_up() -> bool:
            targets = requests.get(f"http://{prometheus}/api/v1/targets", timeout=10).json()["data"]
            seen = [(t["labels"]["job"], t["scrapeUrl"], t["health"]) for t in targets["activeTargets"]]
            return seen == [("fxgateway", f"http://{http}/metrics", "up")]

        eventually(gateway_target_up, "prometheus scraped the gateway", timeout=60)
    finally:
        down = cli("down", "-f", str(tmp_path / "openfx.yaml"), env=env)
    assert down.returncode == 0, down.stderr
    assert not (tmp_path / "state" / "prometheus.pid").exists()
    host, port = prometheus.rsplit(":", 1)

    def stopped() -> bool:  # down sent SIGTERM: nothing listens there once Prometheus has exited
        with socket.socket() as s:
            return s.connect_ex((host, int(port))) != 0

    eventually(stopped, "prometheus stopped", timeout=30)


@needs_prometheus
def test_up_monitoring_on_a_taken_port_fails_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        prometheus = f"127.0.0.1:{taken.getsockname()[1]}"
        out, env, http = _monitored_up(tmp_path, prometheus)
    assert out.returncode == 1 and out.stdout == b""
    lines = [line for line in out.stderr.decode().splitlines() if not line.startswith("management token:")]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"Error: prometheus on {prometheus} exited with code "), lines
    assert "address already in use" in lines[0] and lines[0].endswith("pick another with --prometheus")
    state = Path(env["OPENFX_HOME"])
    assert not (state / "prometheus.pid").exists() and not (state / "gateway.pid").exists()
    with socket.socket() as s:  # the platform was never started
        assert s.connect_ex(("127.0.0.1", int(http.rsplit(":", 1)[1]))) != 0

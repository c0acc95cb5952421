"""`openfx-cli up` / `down`: the embedded platform on this machine.

`up` runs the gateway (which starts one watcher process per function replica) in
the foreground, Ctrl-C stopping all of it; `up -d` starts it in the background,
waits until every function is ready, and `down` stops it. State (pid, log) lives
in `.openfx/` beside the stack file, or in $OPENFX_HOME. `up --monitoring` also starts
Debian's Prometheus (when installed) scraping the gateway and the MQTT bridge.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import yaml

from openfx import env, readiness
from openfx.cli.token import ensure_local_token
from openfx.config import ConfigError, StackFile, load_stack
from openfx.gateway.app import GatewaySettings, scale_to_zero_from_env
from openfx.state import open_private_log, state_dir


def _running_pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None


@click.command()
@click.option("-f", "--file", "stack_file", default="openfx.yaml", show_default=True, help="stack file")
@click.option("-d", "--detach", is_flag=True, help="run in the background (stop with `openfx-cli down`)")
@click.option(
    "--grpc",
    "grpc_address",
    envvar="OPENFX_GRPC_ADDR",
    default=GatewaySettings.grpc_address,
    show_default=True,
    help="gateway gRPC address",
)
@click.option(
    "--http",
    "http_address",
    envvar="OPENFX_HTTP_ADDR",
    default=GatewaySettings.http_address,
    show_default=True,
    help="gateway HTTP address",
)
@click.option(
    "--console",
    "console_address",
    envvar="OPENFX_CONSOLE_ADDR",
    default=GatewaySettings.console_address,
    show_default=True,
    help="the operator's web console ('' for none)",
)
@click.option(
    "--monitoring",
    is_flag=True,
    help="also start Prometheus (Debian's `prometheus` package) scraping the gateway and the bridge",
)
@click.option(
    "--prometheus",
    "prometheus_address",
    default="127.0.0.1:9090",
    show_default=True,
    help="where --monitoring's Prometheus listens",
)
@click.option("--mqtt-port", type=int, default=None, help="broker port (default: the stack file's mqtt.port)")
@click.option("--no-mqtt", is_flag=True, help="start without the MQTT broker and bridge")
@click.option("--timeout", default=180.0, show_default=True, help="seconds to wait for readiness (-d)")
@click.option(
    "--open-management",
    is_flag=True,
    help="DANGEROUS: no token for deploy/delete/scale/logs on loopback (for tools that cannot send one)",
)
@click.option(
    "--max-pids",
    type=int,
    default=None,
    help="processes and threads per replica, by a pids cgroup (default 1024 where one is writable; "
    "0: no cap; OPENFX_MAX_PIDS)",
)
@click.option(
    "--no-scale-to-zero",
    is_flag=True,
    help="keep one replica of every function, whatever its scale_to_zero_after (OPENFX_SCALE_TO_ZERO=off)",
)
def up(
    stack_file: str,
    detach: bool,
    grpc_address: str,
    http_address: str,
    console_address: str,
    monitoring: bool,
    prometheus_address: str,
    mqtt_port: int | None,
    no_mqtt: bool,
    timeout: float,
    open_management: bool,
    max_pids: int | None,
    no_scale_to_zero: bool,
) -> None:
    """Start the gateway, every function of the stack file, the MQTT broker and the bridge.

    Calling functions stays open on loopback; managing them needs the local admin token this
    command creates (our CLI reads it by itself; `openfx-cli token` prints it)."""
    try:
        stack = load_stack(stack_file)
        scale_to_zero_from_env()  # OPENFX_SCALE_TO_ZERO: refused here, before anything starts
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    except SystemExit as exc:
        raise click.ClickException(str(exc.code).removeprefix("gateway: ")) from None
    access: list[str] = []
    if open_management:
        click.echo(
            "WARNING: --open-management: any local user or program that reaches 127.0.0.1 can deploy "
            "code on this machine (web pages stay out: the Host, Origin and JSON-only checks still apply)",
            err=True,
        )
        access = ["--open-management"]
    else:
        token_file = ensure_local_token()
        access = ["--admin-token-file", str(token_file)]
        click.echo(f"management token: {token_file} (print it with 'openfx-cli token')", err=True)
    args = [
        sys.executable,
        "-m",
        "openfx.launcher",
        "-f",
        stack_file,
        "--grpc",
        grpc_address,
        "--http",
        http_address,
        "--console",
        console_address,
        *access,
    ]
    if mqtt_port is not None:
        args += ["--mqtt-port", str(mqtt_port)]
    if no_mqtt:
        args.append("--no-mqtt")
    if no_scale_to_zero:
        args.append("--no-scale-to-zero")
    if max_pids is not None:
        args += ["--max-pids", str(max_pids)]
    folder = state_dir(stack_file)
    pid_file = folder / "gateway.pid"
    if detach and (pid := _running_pid(pid_file)) is not None:
        raise click.ClickException(f"already running (pid {pid}); stop it with 'openfx-cli down'")
    prometheus = None
    if monitoring:
        triggers = _trigger_metrics(stack, stack_file, no_mqtt, mqtt_port)
        prometheus = _start_prometheus(folder, prometheus_address, http_address, triggers, timeout)
    if not detach:
        _console_hint(console_address)
        if prometheus is None:  # the platform owns the terminal; Ctrl-C drains and stops all of it
            os.execv(sys.executable, args)
        platform = subprocess.Popen(args)  # Prometheus beside it, stopped once the platform is
        try:
            while platform.poll() is None:
                try:
                    platform.wait()
                except KeyboardInterrupt:  # the platform got the SIGINT too and is draining
                    continue
        finally:
            prometheus.terminate()
            prometheus.wait(30)
            (folder / "prometheus.pid").unlink(missing_ok=True)
        return
    log_path = folder / "gateway.log"  # rotated by the platform itself (--log-file)
    ready_file = folder / readiness.PLATFORM_READY
    readiness.clear(ready_file)
    with open_private_log(folder / "platform.out") as out:  # what is written before logging is set up
        proc = subprocess.Popen(
            [*args, "--log-file", str(log_path), "--state-dir", str(folder)],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    pid_file.write_text(str(proc.pid))
    try:
        line = _wait_until_ready(proc, timeout, ready_file, log_path)
    except click.ClickException:
        if prometheus is not None:  # nothing to watch
            prometheus.terminate()
            (folder / "prometheus.pid").unlink(missing_ok=True)
        raise
    if "NOT ready" in line:
        click.echo(f"platform: {line}", err=True)
    click.echo(
        f"OpenFx is up (pid {proc.pid}): grpc {grpc_address}, http http://{http_address}; log: {log_path}"
    )
    _console_hint(console_address)
    if prometheus is not None:
        click.echo(f"prometheus: http://{prometheus_address}/ (stopped by 'openfx-cli down')")


def _console_hint(console_address: str) -> None:
    if console_address and not console_address.endswith(":0"):
        click.echo(f"console: http://{console_address}/ (sign in with the token 'openfx-cli token' prints)")


def _trigger_metrics(
    stack: StackFile, stack_file: str, no_mqtt: bool, mqtt_port: int | None
) -> dict[str, str]:
    """Job name -> address of each trigger process's own /metrics (every kind says its own), for
    the stack as the launcher will run it."""
    from openfx.triggers import mqtt, scrape_targets

    mqtt.apply_flags(stack, no_mqtt, mqtt_port)
    return scrape_targets(stack, Path(stack_file))


def _start_prometheus(
    folder: Path, address: str, gateway_http: str, triggers: dict[str, str], timeout: float
) -> subprocess.Popen[bytes]:
    """Debian's Prometheus with a config for this platform, its data and log in the state folder,
    returned once it answers as ready (so `up` never prints the address of one that died)."""
    from openfx.k8s.observability import embedded_prometheus_config

    binary = shutil.which("prometheus")
    if binary is None:
        raise click.ClickException("--monitoring needs Prometheus: apt-get install prometheus")
    if (pid := _running_pid(folder / "prometheus.pid")) is not None:
        raise click.ClickException(f"prometheus already running (pid {pid}); stop it with 'openfx-cli down'")
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump(embedded_prometheus_config(gateway_http, triggers), sort_keys=False))
    with open_private_log(folder / "prometheus.log") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'prometheus-data'}",
                f"--web.listen-address={address}",
            ],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    (folder / "prometheus.pid").write_text(str(proc.pid))
    try:
        _wait_for_prometheus(proc, address, config, folder / "prometheus.log", timeout)
    except click.ClickException:
        proc.terminate()
        proc.wait(30)
        (folder / "prometheus.pid").unlink(missing_ok=True)
        raise
    return proc


def _wait_for_prometheus(
    proc: subprocess.Popen[bytes], address: str, config: Path, log_path: Path, timeout: float
) -> None:
    """Poll /-/ready while our process lives, then ask it for its --config.file: Debian's package
    may run a system Prometheus on 9090, whose ready answer must not pass for ours (ours exits
    when the port is taken, but may not have yet)."""
    import json
    import urllib.error
    import urllib.request

    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    def fail(why: str) -> click.ClickException:
        return click.ClickException(f"prometheus on {address} {why}; pick another with --prometheus")

    def get(path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(f"http://{address}{path}", timeout=2) as answer:
                return answer.read()
        except (urllib.error.URLError, OSError):
            return None

    deadline = time.monotonic() + timeout
    progress = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    err = Console(stderr=True)  # stdout carries results only; no spinner residue off a terminal
    with Progress(*progress, transient=True, console=err, disable=not err.is_terminal) as bar:
        bar.add_task(f"starting prometheus on {address}", total=None)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                last = (_tail(log_path, 1) or [""])[-1]
                cause = last.split(" err=", 1)[-1].strip('"') if " err=" in last else last
                raise fail(f"exited with code {proc.returncode}: {cause}")
            if get("/-/ready") is not None:
                try:
                    flags = json.loads(get("/api/v1/status/flags") or b"{}").get("data", {})
                except ValueError:  # not Prometheus at all
                    flags = {}
                if flags.get("config.file") != str(config) or proc.poll() is not None:
                    raise fail("is another Prometheus (a system service?), not the one `up` started")
                return
            time.sleep(0.2)
    raise fail(f"not ready after {timeout:g}s (see {log_path})")


def _wait_until_ready(proc: subprocess.Popen[bytes], timeout: float, ready_file: Path, log_path: Path) -> str:
    """Wait for the platform's ready file (written once every function and trigger is up), showing
    the log's last line meanwhile; works whatever the gateway's authentication and TLS settings."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    deadline = time.monotonic() + timeout
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True
    ) as bar:
        task = bar.add_task("starting", total=None)
        while time.monotonic() < deadline:
            line = readiness.wait(ready_file, lambda: proc.poll() is None, 0.2)
            if line is not None:
                return line
            if proc.poll() is not None:
                lines = _tail(log_path) or _tail(log_path.parent / "platform.out")
                raise click.ClickException(f"exited with code {proc.returncode}: " + " | ".join(lines))
            if lines := _tail(log_path, 1):
                bar.update(task, description=lines[-1][:100])
    raise click.ClickException(f"not ready after {timeout:g}s; see {log_path} or 'openfx-cli fn list'")


def _tail(path: Path, count: int = 5) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-count:]
    except FileNotFoundError:
        return []


@click.command()
@click.option("-f", "--file", "stack_file", default="openfx.yaml", show_default=True, help="stack file")
@click.option("--timeout", default=30.0, show_default=True, help="seconds to wait for a clean stop")
def down(stack_file: str, timeout: float) -> None:
    """Stop the background platform started by `up -d` (and its Prometheus, if --monitoring)."""
    if not Path(stack_file).is_file() and not env.optional("OPENFX_HOME"):  # its state sits beside it
        raise click.ClickException(f"{stack_file}: file not found (give down the -f you gave up)")
    prometheus_pid = state_dir(stack_file) / "prometheus.pid"
    if (pid := _running_pid(prometheus_pid)) is not None:
        os.kill(pid, signal.SIGTERM)
    prometheus_pid.unlink(missing_ok=True)
    pid_file = state_dir(stack_file) / "gateway.pid"
    pid = _running_pid(pid_file)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        raise click.ClickException(
            f"not running (no live pid in {pid_file}): run down with the same -f and OPENFX_HOME as up"
        )
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        click.echo(f"gateway (pid {pid}) did not stop in {timeout:g}s; killed", err=True)
    pid_file.unlink(missing_ok=True)
    click.echo("OpenFx is down.")

"""Running the embedded platform's broker: Debian's mosquitto with broker/mosquitto.conf."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

CONF_TEMPLATE = Path(__file__).resolve().parents[1] / "bundled" / "mosquitto.conf"  # -> broker/


class BrokerError(Exception):
    """mosquitto is missing or did not start; the message says what to do."""


def find_mosquitto() -> str:
    binary = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
    )
    if binary is None:
        raise BrokerError("mosquitto not found: run scripts/setup (apt-get install mosquitto)")
    return binary


def render_conf(
    state_dir: Path, port: int, host: str = "127.0.0.1", persistence: bool = True, extra: str = ""
) -> Path:
    """Write the config into state_dir (owned by the mosquitto user when we are root: it drops
    privileges). `extra` lines are appended: a later line overrides an earlier one (e.g.
    `allow_anonymous false`), and more `listener` blocks may follow."""
    state_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("mosquitto")
            shutil.chown(state_dir, user="mosquitto")
        except KeyError:
            pass
    conf = state_dir / "mosquitto.conf"
    text = CONF_TEMPLATE.read_text().format(
        port=port, host=host, persistence="true" if persistence else "false", state_dir=state_dir
    )
    conf.write_text(text + (f"\n{extra.strip()}\n" if extra.strip() else ""))
    return conf


def start(
    state_dir: Path,
    port: int,
    host: str = "127.0.0.1",
    persistence: bool = True,
    log: int | None = subprocess.DEVNULL,
    timeout: float = 10.0,
    extra: str = "",
) -> subprocess.Popen[bytes]:
    conf = render_conf(state_dir, port, host, persistence, extra)
    process = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stdout=log, stderr=log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BrokerError(f"mosquitto exited with code {process.returncode} (port {port} in use?)")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return process
        time.sleep(0.02)
    process.kill()
    raise BrokerError(f"mosquitto did not listen on {host}:{port} within {timeout:g}s")

"""A real Spark standalone cluster for tests: one master and N workers from the pyspark
installation's own scripts, all on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import free_port


@contextlib.contextmanager
def standalone_cluster(tmp_path: Path, workers: int = 1) -> Iterator[tuple[str, dict[str, str]]]:
    """(master URL, environment for clients); the processes are stopped on exit."""
    import pyspark

    spark_home = Path(pyspark.__file__).parent
    port = free_port()
    env = {
        **os.environ,
        "SPARK_HOME": str(spark_home),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_LOG_DIR": str(tmp_path),
        "SPARK_WORKER_DIR": str(tmp_path / "work"),
    }
    spark_class = str(spark_home / "bin/spark-class")
    master_url = f"spark://127.0.0.1:{port}"

    def start(log: str, *args: str) -> subprocess.Popen[bytes]:
        with open(tmp_path / log, "wb") as stderr:
            return subprocess.Popen([spark_class, *args], env=env, stdout=subprocess.DEVNULL, stderr=stderr)

    master = ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port)]
    processes = [start("master.log", *master, "--webui-port", str(free_port()))]
    try:
        for i in range(workers):
            processes.append(
                start(
                    f"worker{i}.log",
                    "org.apache.spark.deploy.worker.Worker",
                    master_url,
                    "--host",
                    "127.0.0.1",
                    "--webui-port",
                    str(free_port()),
                    "--cores",
                    "1",
                    "--memory",
                    "1g",
                )
            )
        _wait_registered(tmp_path / "master.log", workers)
        yield master_url, env
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def _wait_registered(master_log: Path, workers: int, timeout: float = 90) -> None:
    """Jobs submitted before every worker has registered would run on fewer executors."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if master_log.read_text(errors="replace").count("Registering worker") >= workers:
            return
        time.sleep(0.3)
    raise TimeoutError(f"{workers} Spark workers did not register within {timeout:g}s")

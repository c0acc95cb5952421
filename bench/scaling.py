"""Serverless scaling in the embedded platform: cold start from zero vs warm calls, per function,
a burst showing the replicas follow the load, and the idle stack's memory with and without scale
to zero (README "Scaling").

    .venv/bin/python bench/scaling.py [--starts 5] [--functions echo,sentiment-analysis,...]

Cold start: the function is pinned to 0 replicas and released to the autoscaler (it stays at
zero), then one call is timed from the request to the answer: the activator starts a replica and
the call waits for its readiness (the handler's __init__). Warm: the p50 of calls right after.
Burst: a function taking 50 ms a call (concurrency_target 2, max_replicas 4, stable_window 4s)
under 1, 8, then 1 callers; desired and ready replicas sampled every 0.2 s, plotted to
bench/scaling-burst.png when matplotlib is installed. `pyspark (accuracy)` is pyspark's cold start
to its accuracy line, which needs both its JVMs (Spark and MLeap's runtime), not only the bundle.
Idle memory: the default stack (openfx.yaml, every function) on a gateway with
`--no-scale-to-zero`, idle once every function answered (pyspark's JVMs up), against the same stack
with scale to zero on once pyspark and mnist went to zero (their 5 min idle shortened to --idle);
the sum of VmRSS (and of Pss, which counts shared pages once) of the gateway and every process
under it, from /proc, the median of 5 readings 1 s apart.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import grpc
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from common import ROOT, free_port, parse_args, scratch  # noqa: E402

from openfx.function_def import SCALE_AUTO  # noqa: E402
from openfx.pb import fxgateway_pb2 as gpb  # noqa: E402
from openfx.pb import fxgateway_pb2_grpc as gpb_grpc  # noqa: E402

ACCURACY = "pyspark (accuracy)"  # pyspark called for its accuracy line: waits for both JVMs
INPUTS = {
    ACCURACY: b"",
    "echo": b"hello",
    "sentiment-analysis": b"Have a nice day",
    "unmarshalling": b'{"name": "battery sensor", "capacity": 40, "time": "2019-01-21T19:07:28Z"}',
    "pyspark": b"[[-0.22, 0.83, -0.86, -0.92]]",
    "mnist": (ROOT / "functions/mnist/samples/0.png").read_bytes()
    if (ROOT / "functions/mnist/samples/0.png").exists()
    else b"",
    "imgprocessing": b"",
    "crawler": b"http://127.0.0.1:1/",  # refused at once (INVALID_ARGUMENT): no internet needed
    "headline-mood": b"http://127.0.0.1:1/",
}
SLOW = ROOT / "tests/fixtures/functions/slow/src"


def start(functions: list[str], tmp: Path) -> tuple[object, gpb_grpc.FxGatewayStub]:
    lines = ["include:"] + [f"  - {ROOT}/functions/{fn}/config.yaml" for fn in functions]
    lines += ["functions:"]
    for fn in functions:
        lines += [f"  {fn}:", "    scale_to_zero_after: 10m", "    max_inflight: 1000"]
    lines += [
        "  burst:",
        f"    handler: {{dir: {SLOW}}}",
        "    environment: {SLOW_SECONDS: '0.05'}",
        "    concurrency_target: 2",
        "    max_replicas: 4",
        "    stable_window: 4s",
        "    max_inflight: 1000",
    ]
    stack = tmp / "stack.yaml"
    stack.write_text("\n".join(lines) + "\n")
    return gateway(stack, len(functions) + 1, tmp / "gateway.log")


def gateway(stack: Path, count: int, log_path: Path, *extra: str) -> tuple[object, gpb_grpc.FxGatewayStub]:
    """A gateway on `stack` (its own ports), once its `count` functions have their replicas ready."""
    import subprocess

    address = f"127.0.0.1:{free_port()}"
    log = open(log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "openfx.gateway", "-f", str(stack), "--grpc", address),
            *("--http", f"127.0.0.1:{free_port()}", "--console", "", "--open-management", *extra),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    stub = gpb_grpc.FxGatewayStub(grpc.insecure_channel(address))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            fns = stub.List(gpb.Empty(), timeout=2).Functions
            if len(fns) == count and all(f.AvailableReplicas >= f.Replicas for f in fns):
                return proc, stub
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"platform did not become ready; see {log_path}")


def counts(stub: gpb_grpc.FxGatewayStub, name: str) -> tuple[int, int]:
    fn = stub.GetMeta(gpb.FunctionRequest(FunctionName=name), timeout=5)
    return fn.Replicas, fn.AvailableReplicas


def call(stub: gpb_grpc.FxGatewayStub, name: str, data: bytes) -> None:
    try:
        stub.Invoke(gpb.InvokeServiceRequest(Service=name, Input=data), timeout=300)
    except grpc.RpcError as exc:  # a bad-input answer still proves a ready replica
        if exc.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL):
            raise


def to_zero(stub: gpb_grpc.FxGatewayStub, name: str) -> None:
    stub.ReplicaUpdate(gpb.ScaleServiceRequest(ServiceName=name, Replicas=0), timeout=60)
    stub.ReplicaUpdate(gpb.ScaleServiceRequest(ServiceName=name, Replicas=SCALE_AUTO), timeout=60)
    while counts(stub, name) != (0, 0):
        time.sleep(0.05)


def cold_and_warm(stub: gpb_grpc.FxGatewayStub, label: str, starts: int, warm: int) -> tuple[float, float]:
    cold: list[float] = []
    hot: list[float] = []
    data = INPUTS.get(label, b"")
    name = "pyspark" if label == ACCURACY else label
    for _ in range(starts):
        to_zero(stub, name)
        t0 = time.perf_counter()
        call(stub, name, data)
        cold.append(time.perf_counter() - t0)
        for _ in range(warm):
            t0 = time.perf_counter()
            call(stub, name, data)
            hot.append(time.perf_counter() - t0)
    return sorted(cold)[len(cold) // 2], sorted(hot)[len(hot) // 2]


def burst(stub: gpb_grpc.FxGatewayStub, phases: list[tuple[int, float]]) -> list[tuple[float, int, int, int]]:
    """(t, callers, desired, ready) every 0.2 s while the phases run."""
    callers = [0]
    stop = threading.Event()

    def worker(i: int) -> None:
        while not stop.is_set():
            if i < callers[0]:
                call(stub, "burst", b"x")
            else:
                time.sleep(0.01)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(max(c for c, _ in phases))]
    for t in threads:
        t.start()
    samples = []
    t0 = time.monotonic()
    try:
        for n, seconds in phases:
            callers[0] = n
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                desired, ready = counts(stub, "burst")
                samples.append((time.monotonic() - t0, n, desired, ready))
                time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return samples


def tree(root: int) -> dict[int, list[int]]:
    """Each process directly under `root` (a replica's watcher) -> it and all its descendants."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)

    def below(pid: int) -> list[int]:
        out = [pid]
        for child in children.get(pid, []):
            out += below(child)
        return out

    return {child: below(child) for child in children.get(root, [])}


def kib(pid: int, path: str, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def function_of(pid: int) -> str:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return "?"
    for item in env:
        if item.startswith(b"FUNCTION_NAME="):
            return item.split(b"=", 1)[1].decode()
    return "(other)"


def memory(gateway_pid: int) -> tuple[int, int, dict[str, int]]:
    """(RSS KiB, PSS KiB) of the gateway and all under it, and RSS KiB per function."""
    per: dict[str, int] = {}
    rss = kib(gateway_pid, "status", "VmRSS:")
    pss = kib(gateway_pid, "smaps_rollup", "Pss:")
    for top, pids in tree(gateway_pid).items():
        size = sum(kib(p, "status", "VmRSS:") for p in pids)
        pss += sum(kib(p, "smaps_rollup", "Pss:") for p in pids)
        rss += size
        name = function_of(top)
        per[name] = per.get(name, 0) + size
    return rss, pss, per


def steady(gateway_pid: int, readings: int) -> tuple[int, int, dict[str, int]]:
    samples = []
    for i in range(readings):
        if i:
            time.sleep(1)
        samples.append(memory(gateway_pid))
    samples.sort(key=lambda s: s[0])
    return samples[len(samples) // 2]


def idle_stack(tmp: Path, functions: list[str] | None, idle: str, zero: list[str]) -> Path:
    """The default stack (or `functions` of it) with openfx.yaml's own settings, scale to zero's
    idle time shortened to `idle` (`zero`: functions given min_replicas 0 on top of openfx.yaml's)."""
    own = (yaml.safe_load((ROOT / "openfx.yaml").read_text()) or {}).get("functions") or {}
    names = functions or sorted(p.parent.name for p in (ROOT / "functions").glob("*/config.yaml"))
    overrides: dict[str, dict[str, object]] = {}
    for name in names:
        spec = dict(own.get(name) or {})
        if name in zero:
            spec["min_replicas"] = 0
            spec["scale_to_zero_after"] = idle
        elif spec.get("scale_to_zero_after"):
            spec["scale_to_zero_after"] = idle
        overrides[name] = spec
    stack = {
        "include": [f"{ROOT}/functions/{name}/config.yaml" for name in names],
        "functions": overrides,
    }
    path = tmp / f"idle-{len(names)}.yaml"
    path.write_text(yaml.safe_dump(stack, sort_keys=False))
    return path


def idle_memory(tmp: Path, functions: list[str] | None, idle: str, zero: list[str], readings: int) -> list:
    """[(label, rss, pss, per function)] for the idle stack without and with scale to zero."""
    stack = idle_stack(tmp, functions, idle, zero)
    names = yaml.safe_load(stack.read_text())["functions"]
    lazy = [n for n, spec in names.items() if spec.get("scale_to_zero_after")]
    rows = []
    for label, extra in (("scale to zero off", ("--no-scale-to-zero",)), ("scale to zero on", ())):
        proc, stub = gateway(stack, len(names), tmp / f"idle-{len(rows)}.log", *extra)
        try:
            for name in names:  # every function has answered once (pyspark: both JVMs up)
                call(stub, name, INPUTS.get(ACCURACY if name == "pyspark" else name, b""))
            if not extra:
                for name in lazy:
                    while counts(stub, name) != (0, 0):
                        time.sleep(0.2)
            else:
                time.sleep(2)  # a moment for what the first calls started to settle
            rows.append((label, *steady(proc.pid, readings)))  # type: ignore[attr-defined]
        finally:
            proc.terminate()  # type: ignore[attr-defined]
            proc.wait(60)  # type: ignore[attr-defined]
    return rows


def plot(samples: list[tuple[float, int, int, int]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    t = [s[0] for s in samples]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.step(t, [s[1] for s in samples], where="post", label="callers", color="0.6")
    ax.step(t, [s[2] for s in samples], where="post", label="desired replicas")
    ax.step(t, [s[3] for s in samples], where="post", label="ready replicas", linestyle="--")
    ax.set_xlabel("seconds")
    ax.set_title("burst: 50 ms calls, concurrency_target 2, max_replicas 4, stable_window 4s")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=5, help="cold starts per function (p50)")
    parser.add_argument("--warm", type=int, default=20, help="warm calls after each start")
    parser.add_argument(
        "--functions", default=f"echo,unmarshalling,sentiment-analysis,mnist,pyspark,{ACCURACY}"
    )
    parser.add_argument("--phase", type=float, default=8.0, help="seconds of each burst phase")
    parser.add_argument("--png", default=str(ROOT / "bench" / "scaling-burst.png"))
    parser.add_argument("--idle", default="20s", help="the idle memory run's scale_to_zero_after")
    parser.add_argument("--memory", default="all", help="functions of the idle memory run ('all', 'none')")
    parser.add_argument("--zero", default="", help="functions the idle memory run gives min_replicas 0")
    parser.add_argument("--only-memory", action="store_true", help="only the idle memory run")
    args = parse_args(
        parser, starts=1, warm=2, functions="echo", phase=1.0, png="", idle="1s", memory="echo", zero="echo"
    )
    labels = [f for f in args.functions.split(",") if f]
    functions = sorted({"pyspark" if f == ACCURACY else f for f in labels})
    with scratch() as tmp:
        if not args.only_memory:
            run(args, labels, functions, tmp)
        if args.memory != "none":
            chosen = None if args.memory == "all" else [f for f in args.memory.split(",") if f]
            zero = [f for f in args.zero.split(",") if f]
            rows = idle_memory(tmp, chosen, args.idle, zero, 1 if args.smoke else 5)
            what = "the default stack" if chosen is None else ", ".join(chosen)
            print(f"\nIdle memory of {what}: gateway + every process under it (MiB)")
            names = sorted({n for row in rows for n in row[3]})
            print("| idle stack | total RSS | total PSS | " + " | ".join(names) + " |")
            print("|---" * (3 + len(names)) + "|")
            for label, rss, pss, per in rows:
                cells = " | ".join(f"{per.get(n, 0) / 1024:,.0f}" for n in names)
                print(f"| {label} | {rss / 1024:,.0f} | {pss / 1024:,.0f} | {cells} |")
    print(f"({os.cpu_count()} cores, Python {sys.version.split()[0]})")


def run(args: argparse.Namespace, labels: list[str], functions: list[str], tmp: Path) -> None:
    proc, stub = start(functions, tmp)
    try:
        print(f"\nCold start from zero vs warm, p50 over {args.starts} starts")
        print("| function | cold start to first answer ms | warm p50 ms |")
        print("|---|---|---|")
        for name in labels:
            cold, warm = cold_and_warm(stub, name, args.starts, args.warm)
            print(f"| {name} | {cold * 1e3:,.0f} | {warm * 1e3:,.1f} |")
        samples = burst(stub, [(1, args.phase), (8, args.phase), (1, args.phase * 1.5), (0, args.phase)])
        print("\nBurst: callers, desired and ready replicas over time (every second)")
        print("| t s | callers | desired | ready |")
        print("|---|---|---|---|")
        for t, n, desired, ready in samples[::5]:
            print(f"| {t:.1f} | {n} | {desired} | {ready} |")
        if args.png and plot(samples, Path(args.png)):
            print(f"(plot: {args.png})")
    finally:
        proc.terminate()  # type: ignore[attr-defined]
        proc.wait(60)  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()

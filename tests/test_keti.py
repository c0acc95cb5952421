"""KETI OpenFx users' files and commands, unchanged, against the embedded platform.

KETI's `openfx-cli fn deploy` sends Update then Deploy naming the config's image and no source
(replayed here byte for byte as its request fields); its handlers `import mesh` and open files
beside themselves. The gateway runs with --open-management, as KETI's CLI sends no token.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import requests

from openfx import hops
from openfx.build.images import ImageStore, missing_requirements
from openfx.config import load_stack
from openfx.function_def import SOURCE
from openfx.pb import fxgateway_pb2 as gpb
from openfx.pb import fxgateway_pb2_grpc as gpb_grpc
from tests.conftest import FIXTURES, ROOT, RunningGateway, free_port, start_gateway
from tests.shared_tmp import shared_tmp

KETI = FIXTURES / "keti"
IMAGE = "localhost:5000/openfx/keti-echo"


def keti_request(name: str, image: str) -> gpb.CreateFunctionRequest:
    """What KETI's `fn deploy` sends for its `fn init -r python3` config: image, no openfx.* annotations."""
    return gpb.CreateFunctionRequest(
        Service=name,
        Image=image,
        Annotations={"desc": "", "maintainer": ""},
        Limits=gpb.FunctionResources(Memory="", CPU="", GPU=""),
        Requests=gpb.FunctionResources(Memory="50Mi", CPU="50m", GPU=""),
    )


def cli(
    *args: str, env: dict[str, str], cwd: Path = ROOT, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "openfx-cli"), *args],
        input=stdin,  # `fn run` reads stdin: never the test run's
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=cwd,
        timeout=120,
    )


def wait_answer(stub, name: str, data: bytes, timeout: float = 60) -> bytes:  # type: ignore[no-untyped-def]
    """Call until the function's replica is ready (UNAVAILABLE while it starts)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return stub.Invoke(gpb.InvokeServiceRequest(Service=name, Input=data), timeout=10).Msg
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    """The platform's state folder (OPENFX_HOME), readable by the function user."""
    with shared_tmp() as folder:
        yield folder


@pytest.fixture(scope="module")
def keti_gateway(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    env = {"OPENFX_HOME": str(home)}
    built = cli("fn", "build", "-f", str(KETI / "keti-echo" / "config.yaml"), env=env)
    assert built.returncode == 0, built.stderr
    assert IMAGE in built.stdout
    log = tmp_path_factory.mktemp("keti") / "gateway.log"
    gw = start_gateway(KETI / "stack.yaml", log, "--open-management", env=env, admin=False)
    try:
        gw.wait_ready({"echo", "mesh-caller", "looper", "beside", "budget", "headline-mood"}, timeout=120)
        yield gw
    finally:
        gw.stop()


def test_keti_fn_deploy_by_image_answers_as_keti(keti_gateway: RunningGateway) -> None:
    stub = keti_gateway.stub(None)  # KETI's CLI sends no token
    with pytest.raises(grpc.RpcError) as missing:
        stub.Update(keti_request("keti-echo", IMAGE), timeout=30)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert stub.Deploy(keti_request("keti-echo", IMAGE), timeout=30).Msg == b"OK"
    assert wait_answer(stub, "keti-echo", b"hello") == b"[Python] hello"
    meta = stub.GetMeta(gpb.FunctionRequest(FunctionName="keti-echo"), timeout=5)
    assert meta.Image == IMAGE
    # the next `fn deploy`: an Update naming the same image and no source keeps it running
    assert stub.Update(keti_request("keti-echo", IMAGE), timeout=30).Msg == b"OK"
    assert wait_answer(stub, "keti-echo", b"again") == b"[Python] again"


def test_an_update_naming_an_unknown_image_keeps_the_current_source(keti_gateway: RunningGateway) -> None:
    """The last rule of resolving a Deploy/Update with no source: an image neither built here nor
    named by a function, in an Update of a function deployed from source, keeps that source."""
    stub = keti_gateway.stub(None)
    folder = KETI / "functions" / "beside" / "src"
    from_source = gpb.CreateFunctionRequest(Service="kept", Image="kept:1", Annotations={SOURCE: str(folder)})
    assert stub.Deploy(from_source, timeout=30).Msg == b"OK"
    try:
        assert wait_answer(stub, "kept", b"") == b"hello from src"
        assert stub.Update(keti_request("kept", "registry.example/never-built:2"), timeout=30).Msg == b"OK"
        meta = stub.GetMeta(gpb.FunctionRequest(FunctionName="kept"), timeout=5)
        assert meta.Image == "registry.example/never-built:2"
        assert wait_answer(stub, "kept", b"") == b"hello from src"
    finally:
        stub.Delete(gpb.DeleteFunctionRequest(FunctionName="kept"), timeout=30)


def test_fn_build_in_the_functions_folder_feeds_a_platform_started_by_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KETI's workflow: `fn build` in the function's own folder, then the platform started by
    `openfx-cli up` from another folder with `-f` naming a third: both use the user's one image
    store (~/.openfx/images), so KETI's Deploy by image answers, also from a home the function user
    cannot enter (a root gateway runs a copy of the image's function folder)."""
    monkeypatch.delenv("OPENFX_HOME", raising=False)  # the default store, not a relocated one
    with shared_tmp() as home:
        home.chmod(0o700)  # a home like /root's: the function user cannot enter the image store
        env = {"HOME": str(home), "OPENFX_CONFIG": str(tmp_path / "no-config.yaml")}
        function = tmp_path / "keti-echo"
        shutil.copytree(KETI / "keti-echo", function)
        built = cli("fn", "build", env=env, cwd=function)
        assert built.returncode == 0, built.stderr
        assert f"stored for the embedded platform in {home / '.openfx' / 'images'}" in built.stdout
        stack = tmp_path / "platform" / "openfx.yaml"
        stack.parent.mkdir()
        stack.write_text(f"include: [{ROOT}/functions/echo/config.yaml]\n")
        grpc_address = f"127.0.0.1:{free_port()}"
        where = ["--grpc", grpc_address, "--http", f"127.0.0.1:{free_port()}"]
        where += ["--console", f"127.0.0.1:{free_port()}"]
        up = cli(
            "up", "-d", "-f", str(stack), "--open-management", "--no-mqtt", *where, env=env, cwd=tmp_path
        )
        try:
            assert up.returncode == 0, up.stderr
            with grpc.insecure_channel(grpc_address) as channel:  # KETI's CLI: no token
                stub = gpb_grpc.FxGatewayStub(channel)
                assert stub.Deploy(keti_request("keti-echo", IMAGE), timeout=30).Msg == b"OK"
                assert wait_answer(stub, "keti-echo", b"hello") == b"[Python] hello"
        finally:
            down = cli("down", "-f", str(stack), env=env, cwd=tmp_path)
        assert down.returncode == 0, down.stderr


def test_fn_run_runs_the_handler_in_its_own_folder() -> None:
    """`fn run` in the function's folder (KETI's `fn run`): the watcher itself enters the handler's
    folder, so a relative open finds the file beside handler.py, as in the embedded platform."""
    ran = cli("fn", "run", env={}, cwd=KETI / "functions" / "beside")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "hello from src"


def test_an_image_from_the_stack_file_deploys_under_another_name(keti_gateway: RunningGateway) -> None:
    stub = keti_gateway.stub(None)
    image = load_stack(KETI / "stack.yaml").functions["echo"].image
    assert stub.Deploy(keti_request("echo-again", image), timeout=30).Msg == b"OK"
    assert wait_answer(stub, "echo-again", b"same") == b"same"
    stub.Delete(gpb.DeleteFunctionRequest(FunctionName="echo-again"), timeout=30)


def test_an_unknown_image_is_refused_naming_the_known_ones(keti_gateway: RunningGateway) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        keti_gateway.stub(None).Deploy(keti_request("nope", "registry.example/nope:1"), timeout=30)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    message = refused.value.details()
    assert "\n" not in message and "unknown image registry.example/nope:1" in message
    assert IMAGE in message and "openfx-cli fn build" in message
    body = {"Service": "nope", "Image": "registry.example/nope:1"}
    reply = requests.post(f"{keti_gateway.http_url}/system/functions", json=body, timeout=30)
    assert reply.status_code >= 400, reply.text
    assert "unknown image registry.example/nope:1" in reply.text and "fn build" in reply.text


def test_an_image_whose_packages_are_missing_is_refused_by_name(
    keti_gateway: RunningGateway, home: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "needy"
    shutil.copytree(KETI / "keti-echo", folder)
    config = folder / "config.yaml"
    config.write_text(config.read_text().replace("keti-echo", "needy"))
    (folder / "requirements.txt").write_text("grpcio\nopenfx-no-such-package-xyz>=1\n")
    ImageStore(home / "images").add("needy", load_stack(config).functions["needy"])
    with pytest.raises(grpc.RpcError) as refused:
        keti_gateway.stub(None).Deploy(keti_request("needy", "localhost:5000/openfx/needy"), timeout=30)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "openfx-no-such-package-xyz>=1" in refused.value.details()
    assert "grpcio" not in refused.value.details().split("(")[1].split(")")[0]


def test_missing_requirements_checks_versions_and_markers(tmp_path: Path) -> None:
    file = tmp_path / "requirements.txt"
    file.write_text("# comment\ngrpcio>=1\ngrpcio<1\nnot-installed-xyz\nfoo; python_version < '3'\n")
    problems = missing_requirements(file)
    assert problems[0].startswith("grpcio<1 (installed: ") and problems[1:] == ["not-installed-xyz"]


def test_mesh_call_goes_through_the_gateway_and_returns_bytes(keti_gateway: RunningGateway) -> None:
    stub = keti_gateway.stub(None)
    before = stub.GetMeta(gpb.FunctionRequest(FunctionName="echo"), timeout=5).InvocationCount
    assert wait_answer(stub, "mesh-caller", b"hi") == b"mesh:hi"
    assert stub.GetMeta(gpb.FunctionRequest(FunctionName="echo"), timeout=5).InvocationCount == before + 1


def test_mesh_call_sends_the_functions_own_token_to_a_gateway_with_tokens(tmp_path: Path) -> None:
    """With tokens configured, invoking needs one: a function's `mesh_call` sends its own
    OPENFX_TOKEN (from its environment), and one without a token is refused by the gateway."""
    client, own = "client-secret-0123456789", "function-secret-0123456789"
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        f"tokens:\n  - {{name: client, token: {client}}}\n  - {{name: functions, token: {own}}}\n"
    )
    caller = KETI / "functions" / "mesh-caller" / "src"
    stack = tmp_path / "stack.yaml"
    stack.write_text(
        f"include: [{ROOT}/functions/echo/config.yaml]\nfunctions:\n"
        f"  mesh-caller: {{handler: {{dir: {caller}}}, environment: {{OPENFX_TOKEN: {own}}}}}\n"
        f"  tokenless: {{handler: {{dir: {caller}}}}}\n"
    )
    gw = start_gateway(stack, tmp_path / "gateway.log", "--tokens-file", str(tokens))
    try:
        gw.wait_ready({"echo", "mesh-caller", "tokenless"})
        stub = gw.stub(client)
        echo = gpb.FunctionRequest(FunctionName="echo")
        before = stub.GetMeta(echo, timeout=5).InvocationCount
        assert wait_answer(stub, "mesh-caller", b"hi") == b"mesh:hi"
        assert stub.GetMeta(echo, timeout=5).InvocationCount == before + 1
        with pytest.raises(grpc.RpcError) as refused:
            stub.Invoke(gpb.InvokeServiceRequest(Service="tokenless", Input=b"hi"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert refused.value.details().startswith("echo: missing bearer token"), refused.value.details()
    finally:
        gw.stop()


def test_a_call_loop_is_stopped_by_the_hop_limit(keti_gateway: RunningGateway) -> None:
    with pytest.raises(grpc.RpcError) as stopped:
        keti_gateway.stub(None).Invoke(gpb.InvokeServiceRequest(Service="looper", Input=b"x"), timeout=20)
    assert stopped.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"limit {hops.MAX_HOPS}" in stopped.value.details() and "loop" in stopped.value.details()
    # the platform is still serving
    assert wait_answer(keti_gateway.stub(None), "echo", b"ok") == b"ok"


def test_a_handler_sees_its_hops_and_remaining_deadline(keti_gateway: RunningGateway) -> None:
    stub = keti_gateway.stub(None)
    hops_seen, left = stub.Invoke(gpb.InvokeServiceRequest(Service="budget"), timeout=3).Msg.split()
    assert hops_seen == b"0" and 0 < float(left) <= 3
    relayed = [(hops.METADATA_KEY, "3")]  # as a function's own call three hops down sends it
    deep = stub.Invoke(gpb.InvokeServiceRequest(Service="budget"), timeout=5, metadata=relayed)
    assert deep.Msg.split()[0] == b"3"


def test_a_handler_runs_in_its_own_folder(keti_gateway: RunningGateway) -> None:
    assert wait_answer(keti_gateway.stub(None), "beside", b"") == b"hello from src"


def test_fn_info_prints_the_http_trigger_url(keti_gateway: RunningGateway) -> None:
    shown = cli("fn", "info", "echo", "-g", keti_gateway.grpc_address, env={})
    assert shown.returncode == 0, shown.stderr
    assert f"url: {keti_gateway.http_url}/function/echo" in shown.stdout


class _News(http.server.BaseHTTPRequestHandler):
    PAGE = b"<html><a class='h'>A wonderful happy day</a><a class='h'>A terrible awful loss</a></html>"

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/robots.txt":
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(self.PAGE)))
        self.end_headers()
        self.wfile.write(self.PAGE)

    def log_message(self, *args: object) -> None:
        pass


def test_headline_mood_composes_crawler_and_sentiment(keti_gateway: RunningGateway) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _News)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/news.html"
        body = json.dumps({"url": url, "selector": "a.h"}).encode()
        out = wait_answer(keti_gateway.stub(None), "headline-mood", body).decode().splitlines()
    finally:
        server.shutdown()
    assert [line.split(",")[0] for line in out] == ["1", "2"]
    assert out[0].endswith(",A wonderful happy day") and float(out[0].split(",")[1]) > 0
    assert out[1].endswith(",A terrible awful loss") and float(out[1].split(",")[1]) < 0


def test_fn_run_sends_the_handlers_own_calls_to_the_configs_gateway(
    keti_gateway: RunningGateway, tmp_path: Path
) -> None:
    """`fn run` of a function that calls another (`mesh.mesh_call`): the call goes to the gateway
    the config names (`openfx.gateway`), as `fn call` would, not to a cluster's service name."""
    source = KETI / "functions" / "mesh-caller" / "src"
    config = tmp_path / "config.yaml"
    config.write_text(
        f"functions:\n  caller:\n    runtime: python3\n    handler: {{dir: {source}, file: handler.py}}\n"
        f"openfx:\n  gateway: {keti_gateway.grpc_address}\n"
    )
    ran = cli("fn", "run", "-f", str(config), stdin="hi", env={}, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "mesh:hi"


def test_fn_deploy_in_the_functions_folder_needs_no_f(keti_gateway: RunningGateway) -> None:
    """KETI's habit: `cd` into the function's folder and `fn deploy` (config.yaml is the default -f,
    as for `fn build` and `fn run`)."""
    deployed = cli("fn", "deploy", "-g", keti_gateway.grpc_address, env={}, cwd=KETI / "functions" / "beside")
    assert deployed.returncode == 0, deployed.stderr
    assert wait_answer(keti_gateway.stub(None), "beside", b"") == b"hello from src"

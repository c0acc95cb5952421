"""`openfx-cli function|fn ...`: OpenFx's function commands."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import click
import grpc
import yaml

from openfx import defaults, env
from openfx.cli.aliases import AliasGroup
from openfx.cli.gateway_client import Gateway, resolve_gateway
from openfx.cli.token import configured_token_file, read_token, user_config_path
from openfx.config import NAME_RE, ConfigError, StackFile, load_stack
from openfx.function_def import SCALE_AUTO, to_request
from openfx.pb import fxgateway_pb2 as gpb
from openfx.state import state_dir


class FnGroup(AliasGroup):
    aliases = {"invoke": "call", "rm": "delete", "remove": "delete"}


def _load(path: str) -> StackFile:
    try:
        return load_stack(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _user_config() -> str | None:
    """CLI settings (`openfx:` gateway, token_file, tls_ca): $OPENFX_CONFIG or ~/.openfx/config.yaml."""
    path = user_config_path()
    return str(path) if path.is_file() else None


def _gateway(ctx: click.Context, config: str | None = None) -> Gateway:
    """The gateway to talk to; the token comes from OPENFX_TOKEN, else the config file's
    `openfx.token_file`, else the user config's (where `openfx-cli up` put the local admin token)."""
    config_gateway = tls_ca = None
    token_file: Path | None = None
    if not (config and Path(config).is_file()):
        config = _user_config()
    if config and Path(config).is_file():
        spec = _load(config).openfx
        # a config that does not name a gateway must not hide OPENFX_URL behind the default
        config_gateway = spec.gateway if "gateway" in spec.model_fields_set else None
        tls_ca = spec.tls_ca
        token_file = Path(spec.token_file).expanduser() if spec.token_file else None
    if token_file is None:
        token_file = configured_token_file()
        token_file = token_file if token_file is not None and token_file.exists() else None
    token = read_token(token_file) if token_file and not env.optional("OPENFX_TOKEN") else None
    return Gateway(resolve_gateway(ctx.obj.get("gateway"), config_gateway), token, tls_ca)


gateway_option = click.option(
    "-g",
    "--gateway",
    envvar=None,
    default=None,
    metavar="HOST:PORT",
    help="gateway gRPC address (default: config file, then OPENFX_URL, then 127.0.0.1:31113)",
)


@click.group(cls=FnGroup)
@gateway_option
@click.pass_context
def function(ctx: click.Context, gateway: str | None) -> None:
    """Create, build, deploy, call and inspect functions."""
    ctx.ensure_object(dict)
    ctx.obj["gateway"] = gateway


def _subgateway(f):  # type: ignore[no-untyped-def]
    """Accept -g after the subcommand too (`fn call echo -g host:port`), as OpenFx's persistent flag."""

    def store(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value:
            ctx.ensure_object(dict)
            ctx.obj["gateway"] = value

    return click.option(
        "-g",
        "--gateway",
        expose_value=False,
        callback=store,
        metavar="HOST:PORT",
        help="gateway gRPC address",
    )(f)


@function.command()
@click.argument("name")
@click.option("-r", "--runtime", required=True, help="runtime template (see `openfx-cli runtime list`)")
@click.option("-f", "--config", default="config.yaml", show_default=True, help="config file name to write")
@click.option("-d", "--dir", "handler_dir", default="./src", show_default=True, help="handler folder")
@_subgateway
@click.pass_context
def init(ctx: click.Context, name: str, runtime: str, config: str, handler_dir: str) -> None:
    """Create a function folder NAME that runs without edits."""
    from openfx import runtimes

    if not NAME_RE.match(name):
        raise click.ClickException(f"invalid name {name!r}: at most 63 lower-case letters, digits and '-'")
    try:
        chosen = runtimes.get(runtime)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    folder = Path(name)
    src = folder / handler_dir
    if src.exists():
        raise click.ClickException(f"{src} already exists")
    src.mkdir(parents=True)
    template = chosen.handler_dir
    shutil.copy(template / "handler.py", src / "handler.py")
    shutil.copy(template / "requirements.txt", folder / "requirements.txt")
    config_path = folder / config
    data = yaml.safe_load(config_path.read_text()) if config_path.exists() else None
    data = data or {}
    data.setdefault("functions", {})[name] = {
        "runtime": chosen.name,
        "desc": "",
        "maintainer": "",
        "handler": {"dir": handler_dir, "file": "handler.py", "name": "Handler"},
        "image": name,
    }
    data.setdefault("openfx", {"gateway": resolve_gateway(ctx.obj.get("gateway"))})
    config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    config_path.chmod(0o600)
    click.echo(f"Directory: {name} is created.")
    click.echo(f"Function handler created in directory: {src}")
    click.echo(f"Rewrite the function handler code in {src} directory")
    click.echo(f"Config file written: {config_path}")


@function.command()
@click.option("-f", "--config", default="config.yaml", show_default=True, help="config file")
@click.option("--nocache", is_flag=True, help="build without Docker's cache")
@click.option("-v", "--buildverbose", is_flag=True, help="show the build output")
@click.option(
    "-o", "--output", default=None, help="where build contexts go (default: .openfx/build beside -f)"
)
def build(config: str, nocache: bool, buildverbose: bool, output: str | None) -> None:
    """Render each function's build context from the shared Dockerfile template, keep it in the
    local image store (what the embedded gateway deploys an image from), and build it when a Docker
    engine is reachable."""
    from openfx.build.images import ImageStore, images_dir
    from openfx.build.render import docker_available, docker_build_command, render_context

    stack = _load(config)
    engine = docker_available()
    folder = Path(output) if output else state_dir(config) / "build"
    store = ImageStore(images_dir())
    for name, spec in stack.functions.items():
        try:
            context = render_context(name, spec, folder)
            store.add(name, spec)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
        command = docker_build_command(name, spec, context, nocache)
        click.echo(f"Building function ({name}) ... context: {context}")
        click.echo(f"Image: {spec.image} stored for the embedded platform in {store.root}")
        if not engine:
            click.echo("No Docker engine reachable; build the image with:\n  " + " ".join(command))
            continue
        import subprocess

        result = subprocess.run(command, capture_output=not buildverbose)
        if result.returncode != 0:
            raise click.ClickException(f"docker build failed for {name} (rerun with -v to see why)")
        click.echo(f"Image: {spec.image} built in local environment.")


@function.command()
@click.argument("name", required=False)
@click.option("-f", "--config", default="config.yaml", show_default=True, help="config file")
@click.option("--timeout", default=60.0, show_default=True, help="seconds to wait for the function")
def run(name: str | None, config: str, timeout: float) -> None:
    """Run a function locally (no gateway), call it once with stdin, print the reply."""
    from openfx.cli.local_run import run_once

    stack = _load(config)
    if name is None:
        if len(stack.functions) != 1:
            raise click.ClickException(f"{config} holds {len(stack.functions)} functions: name one")
        name = next(iter(stack.functions))
    if name not in stack.functions:
        raise click.ClickException(f"function {name!r} is not in {config}")
    # the handler's own fn.call / mesh.mesh_call go to the gateway the config names, as `fn call` does
    config_gateway = stack.openfx.gateway if "gateway" in stack.openfx.model_fields_set else None
    gateway = resolve_gateway(None, config_gateway)
    output = run_once(name, stack.functions[name], _stdin(), timeout, gateway)
    sys.stdout.buffer.write(output)
    sys.stdout.flush()


@function.command()
@click.option("-f", "--config", default="config.yaml", show_default=True, help="config file")
@click.option("-v", "--deployverbose", is_flag=True, help="print the request sent")
@click.option("--min", "min_replicas", type=int, default=None, help="replicas (default: config's `replicas`)")
@click.option("--max", "max_replicas", type=int, default=None, help="maximum replicas (autoscaling)")
@click.option("--update/--no-update", default=True, show_default=True, help="update if it exists")
@click.option("--replace", is_flag=True, help="delete then deploy")
@click.option("--wait/--no-wait", default=True, show_default=True, help="wait until the function is ready")
@_subgateway
@click.pass_context
def deploy(
    ctx: click.Context,
    config: str,
    deployverbose: bool,
    min_replicas: int | None,
    max_replicas: int | None,
    update: bool,
    replace: bool,
    wait: bool,
) -> None:
    """Deploy every function of the config file to the gateway and print its trigger URL."""
    if replace and ctx.get_parameter_source("update") == click.core.ParameterSource.COMMANDLINE and update:
        raise click.ClickException("--replace and --update cannot be used together")
    stack = _load(config)
    gw = _gateway(ctx, config)
    http_base = _http_base(gw)
    for name, spec in stack.functions.items():
        request = to_request(name, spec)
        if min_replicas is not None:
            request.MinReplicas = min_replicas
        if max_replicas is not None:
            request.MaxReplicas = max_replicas
        if deployverbose:
            click.echo(str(request))
        click.echo(f"Deploying: {name} ...")
        if replace:
            try:
                gw.stub.Delete(gpb.DeleteFunctionRequest(FunctionName=name), timeout=60)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    gw.call(gw.stub.Delete, gpb.DeleteFunctionRequest(FunctionName=name), 60)
            gw.call(gw.stub.Deploy, request, 120)
        elif update:
            try:
                gw.stub.Update(request, timeout=120)
                click.echo(f"Function {name} already exists, attempting rolling-update.")
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    gw.call(gw.stub.Update, request, 120)
                click.echo("Attempting update... but Function Not Found. Deploying Function...")
                gw.call(gw.stub.Deploy, request, 120)
        else:
            gw.call(gw.stub.Deploy, request, 120)
        if wait:
            _wait_ready(gw, name)
        click.echo(f"http trigger url: {http_base}/function/{name}")


def _wait_ready(gw: Gateway, name: str, timeout: float = 180) -> None:
    """Poll GetMeta until every replica is ready; a load error ends the wait with that error."""
    import time

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    deadline = time.monotonic() + timeout
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True, console=None
    ) as bar:
        task = bar.add_task(f"waiting for {name}", total=None)
        while time.monotonic() < deadline:
            fn = gw.call(gw.stub.GetMeta, gpb.FunctionRequest(FunctionName=name), what=name)
            bar.update(task, description=f"waiting for {name}: {fn.AvailableReplicas}/{fn.Replicas} ready")
            if fn.AvailableReplicas >= fn.Replicas:
                return
            if "openfx.error" in fn.Annotations:
                raise click.ClickException(f"{name} failed to start: {fn.Annotations['openfx.error']}")
            time.sleep(0.1)
    raise click.ClickException(f"{name} not ready after {timeout:g}s ('openfx-cli fn log {name}' shows why)")


def _http_base(gw: Gateway) -> str:
    info = yaml.safe_load(gw.call(gw.stub.Info, gpb.Empty()).Msg.decode()) or {}
    http = (info.get("gateway") or {}).get("http")
    if not http:
        host = gw.address.rpartition(":")[0] or "127.0.0.1"
        http = f"{host}:{defaults.GATEWAY_HTTP_PORT}"
    return f"http://{http}"


def _stdin() -> bytes:
    if sys.stdin.isatty():
        click.echo("Reading the input from stdin (end with Ctrl-D)...", err=True)
    return sys.stdin.buffer.read()


@function.command()
@click.argument("name")
@click.option(
    "--timeout",
    default=None,
    type=click.FloatRange(min=0, min_open=True),
    help="seconds to wait in all (default: no deadline of ours: a cold start from zero is waited "
    "for, up to 300 s, then the call gets the function's timeout)",
)
@_subgateway
@click.pass_context
def call(ctx: click.Context, name: str, timeout: float | None) -> None:
    """Call NAME with all of stdin as input; write the raw result to stdout. By default the call
    waits for a function at zero to start (the gateway's activator), however slow its start."""
    gw = _gateway(ctx)
    reply = gw.call(
        gw.stub.Invoke, gpb.InvokeServiceRequest(Service=name, Input=_stdin()), timeout, what=name
    )
    sys.stdout.buffer.write(reply.Msg)
    sys.stdout.flush()


def _status(fn: gpb.Function) -> str:
    if fn.AvailableReplicas > 0:
        return "Ready"
    if fn.Replicas == 0 and fn.Annotations.get("openfx.scaling", "").startswith("auto"):
        return "Scaled to zero"  # the next call starts one
    if "openfx.error" in fn.Annotations:
        return "Error"
    return "Not Ready"


@function.command("list")
@click.option("-f", "--config", default=None, help="only the functions of this config file")
@_subgateway
@click.pass_context
def list_functions(ctx: click.Context, config: str | None) -> None:
    """List deployed functions."""
    from rich.console import Console
    from rich.table import Table

    gw = _gateway(ctx, config)
    functions = gw.call(gw.stub.List, gpb.Empty()).Functions
    if config:
        wanted = set(_load(config).functions)
        functions = [f for f in functions if f.Name in wanted]
    table = Table(box=None, pad_edge=False)
    for column in ("Function", "Image", "Maintainer", "Invocations", "Replicas", "Status", "Description"):
        table.add_column(column)
    for fn in functions:
        table.add_row(
            fn.Name,
            fn.Image,
            fn.Annotations.get("maintainer", ""),
            str(fn.InvocationCount),
            f"{fn.AvailableReplicas}/{fn.Replicas}",  # ready / desired
            _status(fn),
            fn.Annotations.get("desc", ""),
        )
    Console(width=200).print(table)
    for fn in functions:
        if "openfx.error" in fn.Annotations:
            click.echo(f"{fn.Name}: {fn.Annotations['openfx.error']}", err=True)


@function.command()
@click.argument("name")
@click.option("-f", "--config", default=None, hidden=True)
@_subgateway
@click.pass_context
def info(ctx: click.Context, name: str, config: str | None) -> None:
    """Show a function's metadata."""
    gw = _gateway(ctx)
    fn = gw.call(gw.stub.GetMeta, gpb.FunctionRequest(FunctionName=name), what=name)
    data = {
        "name": fn.Name,
        "image": fn.Image,
        "invocationcount": fn.InvocationCount,
        "replicas": fn.Replicas,
        "availablereplicas": fn.AvailableReplicas,
        "scaling": fn.Annotations.get("openfx.scaling", ""),  # fixed, auto MIN..MAX ..., or pinned
        "status": _status(fn),
        "url": f"{_http_base(gw)}/function/{fn.Name}",  # the HTTP trigger (KETI's CLI prints the gRPC port)
        # each limit and how the gateway enforces it, e.g. memory: 256Mi (cgroup v1)
        "limits": {
            k[len("openfx.limits.") :]: v
            for k, v in sorted(fn.Annotations.items())
            if k.startswith("openfx.limits.")
        },
        "annotations": dict(sorted(fn.Annotations.items())),
        "labels": dict(fn.Labels),
    }
    click.echo(yaml.safe_dump(data, sort_keys=False).rstrip())


@function.command()
@click.argument("name")
@click.argument("replicas", type=click.IntRange(0), required=False)
@click.option(
    "--auto", is_flag=True, help="release a pinned count: to the autoscaler, or a fixed count to its config's"
)
@_subgateway
@click.pass_context
def scale(ctx: click.Context, name: str, replicas: int | None, auto: bool) -> None:
    """Set NAME's replicas to REPLICAS and pin them there (the autoscaler leaves the count), or
    with --auto give the count back to the autoscaler (or to the config, for a fixed count)."""
    if (replicas is None) == (not auto):
        raise click.ClickException("give a replica count or --auto (not both)")
    count = SCALE_AUTO if auto else replicas
    gw = _gateway(ctx)
    reply = gw.call(
        gw.stub.ReplicaUpdate, gpb.ScaleServiceRequest(ServiceName=name, Replicas=count), 60, what=name
    )
    if not auto:
        click.echo(f"{name}: pinned at {replicas} replicas")
    else:  # our gateway says what the release did (a fixed function goes back to its config's count)
        said = reply.Msg.decode(errors="replace")
        click.echo(f"{name}: {said if said and said != 'OK' else 'autoscaling'}")


@function.command()
@click.argument("name")
@_subgateway
@click.pass_context
def log(ctx: click.Context, name: str) -> None:
    """Show a function's recent output."""
    gw = _gateway(ctx)
    click.echo(
        gw.call(gw.stub.GetLog, gpb.FunctionRequest(FunctionName=name), what=name).Msg.decode(), nl=False
    )


@function.command()
@click.argument("name", required=False)
@click.option("-f", "--config", default=None, help="delete every function of this config file")
@_subgateway
@click.pass_context
def delete(ctx: click.Context, name: str | None, config: str | None) -> None:
    """Delete NAME, or every function of the config file."""
    if not name and not config:
        raise click.ClickException("name a function or pass -f config.yaml")
    gw = _gateway(ctx, config)
    names = [name] if name else list(_load(config).functions)  # type: ignore[arg-type]
    for fn in names:
        gw.call(gw.stub.Delete, gpb.DeleteFunctionRequest(FunctionName=fn), 60, what=fn)
        click.echo(f"Deleted: {fn}")

"""Assembles the gateway: backend + invocation core + gRPC and HTTP front ends, in one event loop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import logging.handlers
import signal
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from openfx import defaults
from openfx import env as environ
from openfx.config import ConfigError, StackFile
from openfx.console.server import build_console
from openfx.errors import InvokeError
from openfx.function_def import FunctionDef, to_request
from openfx.gateway import sandbox
from openfx.gateway.auth import ANY, INVOKE, MANAGE, AuthInterceptor, TokenStore, is_loopback
from openfx.gateway.embedded import EmbeddedBackend
from openfx.gateway.grpc_api import GatewayServicer
from openfx.gateway.guards import HostNames, browser_guard
from openfx.gateway.http_api import build_app
from openfx.gateway.invoker import Invoker
from openfx.gateway.logs import PrivateRotatingFileHandler
from openfx.gateway.management import Management
from openfx.gateway.metrics import GatewayMetrics
from openfx.pb import fxgateway_pb2 as gpb
from openfx.pb import fxgateway_pb2_grpc as gpb_grpc

log = logging.getLogger("openfx.gateway")
SCALE_TO_ZERO_ENV = "OPENFX_SCALE_TO_ZERO"


@dataclass
class GatewaySettings:
    grpc_address: str = defaults.GATEWAY_GRPC
    http_address: str = defaults.GATEWAY_HTTP
    console_address: str = defaults.CONSOLE_HTTP  # "" turns the console off; port 0: any free port
    max_message_bytes: int = defaults.MAX_MESSAGE_BYTES
    grace_seconds: float = 10.0
    ready_timeout: float = 120.0
    max_streams: int = 256  # open Invokes streams, all functions together
    http_body_timeout: float = 30.0  # a client slower than this sending its body gets 408
    http_header_timeout: float = 15.0  # request headers (and idle keep-alive) must arrive within this
    tokens_file: str | None = None  # else OPENFX_TOKENS_FILE / OPENFX_ADMIN_TOKEN / OPENFX_INVOKE_TOKEN
    allow_unauthenticated: bool = False  # needed to run without tokens on a non-loopback address
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # set to require client certificates (mutual TLS)
    backend: str = "embedded"  # or "kubernetes": functions are Deployments in `namespace`
    namespace: str = "openfx-fn"
    function_address: str = f"dns:///{{name}}.{{namespace}}.svc.cluster.local:{defaults.WATCHER_PORT}"
    # management (Deploy/Update/Delete/ReplicaUpdate/GetLog) needs a token even on loopback unless this
    open_management: bool = False
    admin_token_file: str | None = None  # the local admin token `openfx-cli up` creates (manage + invoke)
    allowed_hosts: tuple[str, ...] = ()  # extra names the HTTP Host header may carry
    allowed_origins: tuple[str, ...] = ()  # extra browser origins allowed besides the gateway's own
    # embedded replicas: the user they run as when the gateway runs as root ("" = the gateway's own)
    function_user: str | None = None  # None: openfx-fn if it exists, else nobody (only when root)
    log_file: str | None = None  # the gateway's log (rotated); None: stderr
    timeout_grace: float = 2.0  # a replica holding a call this long past its timeout is recycled
    cgroups: bool = True  # limits via cgroups where writable; off: RSS watchdog, CPU limits refused
    max_pids: int | None = None  # per replica; None: defaults.MAX_PIDS where a pids cgroup is, 0: none
    scale_to_zero: bool = True  # off: min_replicas 0 counts as 1 (README "Scaling"), e.g. for test runs
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 3

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert and self.tls_key)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The gateway's flags (each also read from an environment variable), shared by
    `python -m openfx.gateway` and `python -m openfx.launcher`."""
    with environ.exit_on_error("gateway"):
        _add_arguments(parser)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    d = GatewaySettings()
    env, optional = environ.string, environ.optional
    parser.add_argument("--grpc", default=env("OPENFX_GRPC_ADDR", d.grpc_address), help="gRPC listen address")
    parser.add_argument("--http", default=env("OPENFX_HTTP_ADDR", d.http_address), help="HTTP listen address")
    parser.add_argument(
        "--console",
        default=env("OPENFX_CONSOLE_ADDR", d.console_address),
        help="the operator's web console, an origin of its own ('' for none)",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=environ.integer("OPENFX_MAX_MESSAGE_BYTES", d.max_message_bytes, minimum=1),
    )
    parser.add_argument(
        "--max-streams", type=int, default=environ.integer("OPENFX_MAX_STREAMS", d.max_streams, minimum=1)
    )
    parser.add_argument(
        "--http-body-timeout",
        type=float,
        default=environ.number("OPENFX_HTTP_BODY_TIMEOUT", d.http_body_timeout),
    )
    parser.add_argument(
        "--http-header-timeout",
        type=float,
        default=environ.number("OPENFX_HTTP_HEADER_TIMEOUT", d.http_header_timeout),
        help="close HTTP connections whose request headers take longer (slowloris), and idle ones",
    )
    parser.add_argument(
        "--tokens-file", default=optional("OPENFX_TOKENS_FILE"), help="bearer tokens and scopes (YAML)"
    )
    parser.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        default=environ.flag("OPENFX_ALLOW_UNAUTHENTICATED", False),
        help="serve without tokens on a non-loopback address (not recommended)",
    )
    parser.add_argument(
        "--tls-cert", default=optional("OPENFX_TLS_CERT"), help="TLS certificate (PEM) for both listeners"
    )
    parser.add_argument("--tls-key", default=optional("OPENFX_TLS_KEY"), help="TLS private key (PEM)")
    parser.add_argument(
        "--tls-client-ca", default=optional("OPENFX_TLS_CLIENT_CA"), help="require client certificates"
    )
    parser.add_argument(
        "--backend", choices=["embedded", "kubernetes"], default=env("OPENFX_BACKEND", d.backend)
    )
    parser.add_argument(
        "--namespace", default=env("FUNCTION_NAMESPACE", d.namespace), help="kubernetes backend"
    )
    parser.add_argument(
        "--function-address",
        default=env("OPENFX_FUNCTION_ADDRESS", d.function_address),
        help="kubernetes backend: where a function's pods answer ({name}, {namespace})",
    )
    parser.add_argument(
        "--open-management",
        action="store_true",
        default=environ.flag("OPENFX_OPEN_MANAGEMENT", False),
        help="DANGEROUS: let anyone who reaches loopback deploy code (for tools that cannot send tokens)",
    )
    parser.add_argument(
        "--admin-token-file",
        default=optional("OPENFX_ADMIN_TOKEN_FILE"),
        help="file holding the local admin token (openfx-cli up creates it); invoking stays open on loopback",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[h for h in env("OPENFX_ALLOWED_HOSTS").split(",") if h],
        help="another name the HTTP Host header may carry (repeatable)",
    )
    parser.add_argument(
        "--allowed-origin",
        action="append",
        default=[o for o in env("OPENFX_ALLOWED_ORIGINS").split(",") if o],
        help="another browser origin allowed to call the gateway (repeatable)",
    )
    parser.add_argument(
        "--function-user",
        default=optional("OPENFX_FUNCTION_USER"),
        help="user the replicas run as when the gateway runs as root (default openfx-fn, else nobody)",
    )
    parser.add_argument(
        "--timeout-grace",
        type=float,
        default=environ.number("OPENFX_TIMEOUT_GRACE", d.timeout_grace),
        help="seconds past a call's timeout before its replica is recycled",
    )
    parser.add_argument(
        "--no-cgroups",
        dest="cgroups",
        action="store_false",
        default=environ.flag("OPENFX_CGROUPS", True, also_on=("auto",)),
        help="no cgroups: memory by an RSS watchdog, CPU limits refused (OPENFX_CGROUPS=off)",
    )
    parser.add_argument(
        "--max-pids",
        type=int,
        default=environ.optional_integer("OPENFX_MAX_PIDS"),
        help=f"processes and threads per replica, by a pids cgroup (default {defaults.MAX_PIDS} where "
        "one is writable; 0: no cap; a cap that cannot be enforced is refused)",
    )
    parser.add_argument(
        "--no-scale-to-zero",
        dest="scale_to_zero",
        action="store_false",
        default=None,
        help="never stop a function's last replica: min_replicas 0 counts as 1 (OPENFX_SCALE_TO_ZERO=off)",
    )
    parser.add_argument("--log-file", default=optional("OPENFX_LOG_FILE"), help="write the log here, rotated")
    parser.add_argument(
        "--log-max-bytes",
        type=int,
        default=environ.integer("OPENFX_LOG_MAX_BYTES", d.log_max_bytes, minimum=1),
    )
    parser.add_argument(
        "--log-backups", type=int, default=environ.integer("OPENFX_LOG_BACKUPS", d.log_backups)
    )


def scale_to_zero_from_env() -> bool:
    """OPENFX_SCALE_TO_ZERO: on (the default) or off; anything else is a one-line SystemExit."""
    with environ.exit_on_error("gateway"):
        return environ.flag(SCALE_TO_ZERO_ENV, True)


def settings_from(args: argparse.Namespace) -> GatewaySettings:
    from_env = scale_to_zero_from_env()  # checked even when the flag is given: a bad value is a mistake
    return GatewaySettings(
        grpc_address=args.grpc,
        http_address=args.http,
        console_address=args.console,
        max_message_bytes=args.max_message_bytes,
        max_streams=args.max_streams,
        http_body_timeout=args.http_body_timeout,
        http_header_timeout=args.http_header_timeout,
        tokens_file=args.tokens_file,
        allow_unauthenticated=args.allow_unauthenticated,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        backend=args.backend,
        namespace=args.namespace,
        function_address=args.function_address,
        open_management=args.open_management,
        admin_token_file=args.admin_token_file,
        allowed_hosts=tuple(args.allowed_host),
        allowed_origins=tuple(args.allowed_origin),
        function_user=args.function_user,
        log_file=args.log_file,
        timeout_grace=args.timeout_grace,
        cgroups=args.cgroups,
        max_pids=args.max_pids,
        scale_to_zero=from_env if args.scale_to_zero is None else args.scale_to_zero,
        log_max_bytes=args.log_max_bytes,
        log_backups=args.log_backups,
    )


def split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


class Gateway:
    def __init__(self, settings: GatewaySettings, stack: StackFile | None = None) -> None:
        self.settings = settings
        self.stack = stack
        self.run_dir = sandbox.temp_folder("gw")
        self.metrics = GatewayMetrics()
        try:
            self.backend = self._make_backend()
        except BaseException:
            sandbox.remove_temp_folder(self.run_dir)
            raise
        self.backend.on_gauge = self.metrics.set_replicas
        self.metrics.watch_in_flight(lambda: [(n, f.in_flight) for n, f in self.backend.functions.items()])
        self.invoker = Invoker(self.backend, self.metrics, max_streams=settings.max_streams, starting=True)
        self.tokens = TokenStore.from_environment(
            settings.tokens_file,
            admin_token_file=settings.admin_token_file,
            open_management=settings.open_management,
        )
        self.manage = Management(self.backend, self.invoker, settings.http_address)
        self.grpc_server: grpc.aio.Server | None = None
        self.http_runner: web.AppRunner | None = None
        self.console_runner: web.AppRunner | None = None
        self.console_url = ""  # http(s)://host:port/ once listening
        self.health = health.aio.HealthServicer()

    def _make_backend(self):  # type: ignore[no-untyped-def]
        s = self.settings
        if s.backend == "kubernetes":
            if s.max_pids:  # the cluster's kubelet (podPidsLimit) caps pods, not this gateway
                raise ConfigError("--max-pids applies to embedded replicas; set podPidsLimit on the cluster")
            from openfx.gateway.kubernetes import KubernetesBackend

            return KubernetesBackend(s.namespace, s.function_address, s.max_message_bytes)
        if s.backend != "embedded":
            raise ValueError(f"unknown backend {s.backend!r}: use embedded or kubernetes")
        try:
            return EmbeddedBackend(
                self.run_dir,
                s.max_message_bytes,
                s.grace_seconds,
                function_user=s.function_user,
                timeout_grace=s.timeout_grace,
                on_recycle=self.metrics.replica_recycled,
                cgroups=s.cgroups,
                max_pids=s.max_pids,
                gateway_address=s.grpc_address,
                scale_to_zero=s.scale_to_zero,
            )
        except ValueError as exc:  # e.g. --function-user names no user
            raise ConfigError(str(exc)) from None

    def _check_exposure(self) -> None:
        s = self.settings
        loopback = all(is_loopback(a) for a in (s.grpc_address, s.http_address, s.console_address) if a)
        if not self.tokens.enabled and not loopback and not s.allow_unauthenticated:
            raise OSError(
                f"refusing to serve {s.grpc_address} / {s.http_address} / console {s.console_address or '-'} "
                "without authentication: "
                "configure tokens "
                "(OPENFX_TOKENS_FILE, OPENFX_ADMIN_TOKEN) or pass --allow-unauthenticated"
            )
        if bool(s.tls_cert) != bool(s.tls_key):
            raise OSError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        if s.open_management:
            if self.tokens.enabled:
                raise OSError("--open-management contradicts the configured tokens: use one or the other")
            if not loopback:
                raise OSError(
                    "--open-management is allowed only when both listeners are on loopback (and the console)"
                )
            log.warning(
                "gateway: WARNING: management is OPEN (--open-management): any local user or program "
                "that reaches %s can deploy code and run it as the functions' user",
                s.grpc_address,
            )

    def _server_credentials(self) -> grpc.ServerCredentials:
        s = self.settings
        key, cert = Path(s.tls_key).read_bytes(), Path(s.tls_cert).read_bytes()  # type: ignore[arg-type]
        client_ca = Path(s.tls_client_ca).read_bytes() if s.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )

    def _ssl_context(self) -> ssl.SSLContext:
        s = self.settings
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(s.tls_cert, s.tls_key)  # type: ignore[arg-type]
        if s.tls_client_ca:
            context.load_verify_locations(s.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def _own_hosts(self) -> HostNames:
        """The names the HTTP Host header may carry: loopback names with the bound port, the bound
        address, and --allowed-host names (with a port: exactly; without: any port)."""
        host, port = split_host_port(self.settings.http_address)
        return HostNames.for_listener(host, port, self.settings.allowed_hosts)

    async def start(self) -> None:
        s = self.settings
        self._check_exposure()
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            # gRPC binds with SO_REUSEPORT by default: a second gateway on a taken port would start
            # and share the connections with the first; this makes the bind fail instead
            ("grpc.so_reuseport", 0),
        ]
        everything_open = all(self.tokens.is_open(scope) for scope in (INVOKE, MANAGE, ANY))
        interceptors = [] if everything_open else [AuthInterceptor(self.tokens, self.metrics.auth_rejected)]
        server = grpc.aio.server(options=options, interceptors=interceptors)
        servicer = GatewayServicer(self.manage)
        gpb_grpc.add_FxGatewayServicer_to_server(servicer, server)
        gpb_grpc.add_GatewayServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        services = [gpb.DESCRIPTOR.services_by_name[n].full_name for n in ("FxGateway", "Gateway")]
        reflection.enable_server_reflection([*services, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        try:
            if s.tls:
                server.add_secure_port(s.grpc_address, self._server_credentials())
            else:
                server.add_insecure_port(s.grpc_address)
        except (RuntimeError, OSError) as exc:
            raise OSError(f"cannot listen on {s.grpc_address} for gRPC (in use?): {exc}") from None
        await server.start()
        self.grpc_server = server

        app = build_app(self.manage, self.metrics, s.max_message_bytes, self.tokens, s.http_body_timeout)
        app.middlewares.insert(0, browser_guard(self._own_hosts(), s.allowed_origins, self.metrics.registry))
        # aiohttp closes a connection whose request headers (or next request) do not arrive in time
        self.http_runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=s.grace_seconds, keepalive_timeout=s.http_header_timeout
        )
        await self.http_runner.setup()
        host, port = split_host_port(s.http_address)
        ssl_context = self._ssl_context() if s.tls else None
        await web.TCPSite(self.http_runner, host, port, ssl_context=ssl_context).start()
        if s.console_address:
            await self._start_console(ssl_context)

        await self.backend.start()
        if self.stack is not None and self.backend.mode == "embedded":
            for name, spec in self.stack.functions.items():
                try:
                    await self.backend.deploy(FunctionDef.from_request(to_request(name, spec)))
                except InvokeError as exc:  # the stack's fault, not a crash: one line, no traceback
                    reason = exc.message.removeprefix(f"{name}: ")
                    raise StartError(f"cannot start function {name} of the stack file: {reason}") from None
        self.invoker.starting = False
        for service in ("", "pb.FxGateway", "pb.Gateway"):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def _start_console(self, ssl_context: ssl.SSLContext | None) -> None:
        """The console's listener: bound first, so that port 0 (tests) gives the Host names to allow."""
        s = self.settings
        host, port = split_host_port(s.console_address)
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(info[0], socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(info[4])
        except OSError as exc:
            raise OSError(f"cannot listen on {s.console_address} for the console (in use?): {exc}") from None
        port = sock.getsockname()[1]
        app = build_console(self.manage, self.metrics, s.max_message_bytes, self.tokens, s.http_body_timeout)
        hosts = HostNames.for_listener(host, port, s.allowed_hosts)
        app.middlewares.insert(0, browser_guard(hosts, (), self.metrics.registry))
        self.console_runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=s.grace_seconds, keepalive_timeout=s.http_header_timeout
        )
        await self.console_runner.setup()
        await web.SockSite(self.console_runner, sock, ssl_context=ssl_context).start()
        shown = "127.0.0.1" if host in ("", "0.0.0.0", "::") else (f"[{host}]" if ":" in host else host)
        self.console_url = f"{'https' if ssl_context else 'http'}://{shown}:{port}/"
        log.info("gateway: console on %s", self.console_url)

    async def wait_ready(self) -> list[str]:
        return await self.backend.wait_ready(self.settings.ready_timeout)

    async def stop(self) -> None:
        """Drain: refuse new calls, let the ones in flight (and open streams) finish, stop functions."""
        for service in ("", "pb.FxGateway", "pb.Gateway"):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.grpc_server is not None:
            await self.grpc_server.stop(self.settings.grace_seconds)
        if self.http_runner is not None:
            await self.http_runner.cleanup()
        if self.console_runner is not None:
            await self.console_runner.cleanup()
        await self.backend.close()
        sandbox.remove_temp_folder(self.run_dir)


class StartError(Exception):
    """A start that cannot go on for a reason the user can fix (a bad function in the stack file):
    said in one line, the gateway exits non-zero."""


async def serve(settings: GatewaySettings, stack: StackFile | None, announce: bool = True) -> None:
    """Run the gateway until SIGTERM or SIGINT."""
    try:
        gateway = Gateway(settings, stack)
    except ConfigError as exc:
        log.error("gateway: %s", exc)
        raise SystemExit(2) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await gateway.start()
    except (OSError, StartError) as exc:
        await gateway.stop()  # the functions started before the failure go too
        log.error("gateway: %s", exc)  # last, so `up -d`'s log tail ends with it
        raise SystemExit(1) from None
    if announce:
        waiter = loop.create_task(gateway.wait_ready())
        done, _ = await asyncio.wait(
            {waiter, loop.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED
        )
        if waiter in done:
            not_ready = waiter.result()
            names = ", ".join(gateway.backend.functions) or "none"
            log.info(
                "gateway: ready on grpc %s, http http://%s (functions: %s)%s",
                settings.grpc_address,
                settings.http_address,
                names,
                f"; NOT ready: {', '.join(not_ready)}" if not_ready else "",
            )
        else:
            waiter.cancel()
    await stop.wait()
    log.info("gateway: stopping (draining in-flight calls)")
    with contextlib.suppress(Exception):
        await gateway.stop()


def configure_logging(settings: GatewaySettings) -> None:
    """One line per event on stderr, or in a size-rotated file (--log-file): a function that prints
    100,000 lines must not fill the disk of a platform left running."""
    handler: logging.Handler
    if settings.log_file:
        Path(settings.log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = PrivateRotatingFileHandler(
            settings.log_file, maxBytes=settings.log_max_bytes, backupCount=settings.log_backups
        )
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=environ.string("LOG_LEVEL", "INFO"), handlers=[handler], force=True)

"""Bearer-token authentication for the gateway's gRPC and HTTP front ends.

Tokens carry scopes: `invoke` (call functions) and `manage` (Deploy, Update, Delete,
ReplicaUpdate, GetLog). Read-only management (List, GetMeta, Info) needs any valid token;
health, reflection and /metrics stay open for probes and scrapers. Tokens come from a
file (OPENFX_TOKENS_FILE) or the environment (OPENFX_ADMIN_TOKEN: both scopes,
OPENFX_INVOKE_TOKEN: invoke only), never from the repository. Only SHA-256 digests are
kept, compared in constant time.

Managing means running code as the gateway's user, so it is never open by default. A
gateway with no tokens (the embedded demo, on loopback only) leaves invoking and reading
open and takes management only with the local admin token `openfx-cli up` writes
(--admin-token-file); `--open-management` (loopback only) is the loud way out for tools that
cannot send a token.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml

from openfx.errors import InvokeError

INVOKE, MANAGE, ANY = "invoke", "manage", "any"
SCOPES = {INVOKE, MANAGE}

# gRPC method -> scope needed (methods not listed are open)
GRPC_SCOPES = {
    "Invoke": INVOKE,
    "Invokes": INVOKE,
    "Deploy": MANAGE,
    "Update": MANAGE,
    "Delete": MANAGE,
    "ReplicaUpdate": MANAGE,
    "GetLog": MANAGE,
    "List": ANY,
    "GetMeta": ANY,
    "Info": ANY,
}
GATEWAY_SERVICES = ("pb.FxGateway", "pb.Gateway")


def http_scope(method: str, path: str) -> str | None:
    """Scope an HTTP route needs (None: open)."""
    if path.startswith("/function/"):
        return INVOKE
    if path.startswith("/system/function-log/") or path == "/system/scale-function":
        return MANAGE
    if path.startswith("/system/"):
        return ANY if method in ("GET", "HEAD") else MANAGE
    return None


class AuthError(InvokeError):
    pass


@dataclass(frozen=True)
class Token:
    name: str
    digest: bytes
    scopes: frozenset[str]


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


MANAGEMENT_CLOSED = (
    "management needs a token, even on loopback: use the one 'openfx-cli up' wrote "
    "('openfx-cli token' prints it), configure OPENFX_ADMIN_TOKEN, or start the gateway "
    "with --open-management"
)


class TokenStore:
    """The tokens a gateway accepts, and which scopes are open without one."""

    def __init__(
        self, tokens: list[Token], local_admin: Token | None = None, open_management: bool = False
    ) -> None:
        self.tokens = tokens  # configured tokens: with any, every scope needs a token
        self.local_admin = local_admin
        self.open_management = open_management
        self.accepted = [*tokens, local_admin] if local_admin else list(tokens)
        self.open_scopes: frozenset[str] = (
            frozenset() if tokens else frozenset({INVOKE, ANY} | ({MANAGE} if open_management else set()))
        )

    @property
    def enabled(self) -> bool:
        """Configured tokens guard every scope (invoking included)."""
        return bool(self.tokens)

    @classmethod
    def from_environment(
        cls,
        tokens_file: str | None = None,
        env: dict[str, str] | None = None,
        admin_token_file: str | None = None,
        open_management: bool = False,
    ) -> TokenStore:
        env = dict(os.environ if env is None else env)
        tokens: list[Token] = []
        path = tokens_file or env.get("OPENFX_TOKENS_FILE")
        if path:
            tokens += _read_tokens_file(Path(path))
        if env.get("OPENFX_ADMIN_TOKEN"):
            tokens.append(Token("env-admin", _digest(env["OPENFX_ADMIN_TOKEN"]), frozenset(SCOPES)))
        if env.get("OPENFX_INVOKE_TOKEN"):
            tokens.append(Token("env-invoke", _digest(env["OPENFX_INVOKE_TOKEN"]), frozenset({INVOKE})))
        local = _read_admin_token_file(Path(admin_token_file)) if admin_token_file else None
        return cls(tokens, local, open_management)

    def is_open(self, scope: str | None) -> bool:
        return scope is None or scope in self.open_scopes

    def check(self, authorization: str | None, scope: str) -> Token | None:
        """Raise AuthError unless `authorization` ("Bearer <token>") grants `scope`."""
        if scope in self.open_scopes:
            return None
        if not self.accepted or (not authorization and not self.tokens):
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, MANAGEMENT_CLOSED)
        if not authorization:
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED, "missing bearer token (Authorization: Bearer <token>)"
            )
        kind, _, secret = authorization.partition(" ")
        if kind.lower() != "bearer" or not secret.strip():
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED, "malformed Authorization header: use 'Bearer <token>'"
            )
        presented = _digest(secret.strip())
        match = None
        for token in self.accepted:  # no early exit: the time taken does not depend on which token matched
            if hmac.compare_digest(token.digest, presented):
                match = token
        if match is None:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "invalid token")
        if scope != ANY and scope not in match.scopes:
            raise AuthError(
                grpc.StatusCode.PERMISSION_DENIED, f"token {match.name!r} lacks the {scope!r} scope"
            )
        return match


def _read_tokens_file(path: Path) -> list[Token]:
    from openfx.config import ConfigError, yaml_error

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: tokens file not found") from None
    except yaml.YAMLError as exc:
        raise yaml_error(path, exc) from None
    entries = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: expected 'tokens:' with a list of {{name, token or sha256, scopes}}")
    tokens = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: tokens[{i}] must be a mapping")
        unknown = set(entry) - {"name", "token", "sha256", "scopes"}
        if unknown:
            raise ConfigError(f"{path}: tokens[{i}]: unknown key '{sorted(unknown)[0]}'")
        scopes = frozenset(entry.get("scopes") or [INVOKE])
        if not scopes <= SCOPES:
            raise ConfigError(f"{path}: tokens[{i}]: scopes must be among {sorted(SCOPES)}")
        if entry.get("sha256"):
            try:
                digest = bytes.fromhex(entry["sha256"])
            except ValueError:
                raise ConfigError(f"{path}: tokens[{i}]: sha256 is not hex") from None
        elif entry.get("token"):
            digest = _digest(str(entry["token"]))
        else:
            raise ConfigError(f"{path}: tokens[{i}] needs 'token' or 'sha256'")
        tokens.append(Token(str(entry.get("name", f"token{i}")), digest, scopes))
    return tokens


def _read_admin_token_file(path: Path) -> Token:
    """The local admin token: a secret file only its owner may read (like an ssh key)."""
    from openfx.config import ConfigError

    try:
        mode = path.stat().st_mode
        secret = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the admin token file ({exc.strerror})") from None
    if mode & 0o077:
        raise ConfigError(
            f"{path}: admin token file is readable by others (mode {mode & 0o777:o}); chmod 600 it"
        )
    if len(secret) < 16:
        raise ConfigError(f"{path}: admin token is shorter than 16 characters")
    return Token("local-admin", _digest(secret), frozenset(SCOPES))


def is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the `authorization` metadata before a gateway RPC runs."""

    def __init__(self, store: TokenStore, on_reject: Callable[[AuthError], None]) -> None:
        self.store = store
        self.on_reject = on_reject

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        service, _, method = details.method.lstrip("/").partition("/")
        scope = GRPC_SCOPES.get(method) if service in GATEWAY_SERVICES else None
        handler = await continuation(details)
        if handler is None or self.store.is_open(scope):
            return handler
        header = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        try:
            self.store.check(header, scope)  # type: ignore[arg-type]
        except AuthError as exc:
            self.on_reject(exc)
            return _rejecting(handler, exc)
        return handler


def _rejecting(handler: grpc.RpcMethodHandler, exc: AuthError) -> grpc.RpcMethodHandler:
    async def unary(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(exc.code, exc.message)

    async def streaming(request_iterator: object, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        await context.abort(exc.code, exc.message)
        yield  # pragma: no cover (makes this an async generator)

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)

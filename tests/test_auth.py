"""openfx.gateway.auth alone (no processes): which scope each route needs, which tokens are
accepted for which scope, and every way a tokens file or admin token file can be wrong. The
same decisions end to end are in tests/test_security.py and tests/test_exposure.py."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from openfx.config import ConfigError
from openfx.gateway import auth
from openfx.gateway.auth import ANY, INVOKE, MANAGE, AuthError, Token, TokenStore

ADMIN, INVOKER, MANAGER, LOCAL = "admin-token-1", "invoke-token-2", "manage-token-3", "local-admin-token-4567"


def token(name: str, secret: str, *scopes: str) -> Token:
    return Token(name, hashlib.sha256(secret.encode()).digest(), frozenset(scopes))


def denied(store: TokenStore, header: str | None, scope: str) -> tuple[grpc.StatusCode, int, str]:
    with pytest.raises(AuthError) as err:
        store.check(header, scope)
    return err.value.code, err.value.http, err.value.message


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [
        ("POST", "/function/echo", INVOKE),
        ("GET", "/function/echo/", INVOKE),
        ("GET", "/system/functions", ANY),
        ("HEAD", "/system/function/echo", ANY),
        ("GET", "/system/info", ANY),
        ("POST", "/system/functions", MANAGE),
        ("PUT", "/system/functions", MANAGE),
        ("DELETE", "/system/function/echo", MANAGE),
        ("GET", "/system/function-log/echo", MANAGE),  # logs may hold secrets: a read that needs manage
        ("PUT", "/system/scale-function", MANAGE),
        ("GET", "/system/scale-function", MANAGE),
        ("GET", "/healthz", None),
        ("GET", "/metrics", None),
        ("GET", "/openapi.yaml", None),
        ("GET", "/functions/echo", None),
    ],
)
def test_http_scopes(method: str, path: str, scope: str | None) -> None:
    assert auth.http_scope(method, path) == scope


def test_grpc_scopes() -> None:
    assert {m for m, s in auth.GRPC_SCOPES.items() if s == MANAGE} == {
        "Deploy",
        "Update",
        "Delete",
        "ReplicaUpdate",
        "GetLog",
    }
    assert {m for m, s in auth.GRPC_SCOPES.items() if s == INVOKE} == {"Invoke", "Invokes"}
    assert {m for m, s in auth.GRPC_SCOPES.items() if s == ANY} == {"List", "GetMeta", "Info"}


def test_configured_tokens_guard_every_scope() -> None:
    store = TokenStore(
        [token("admin", ADMIN, INVOKE, MANAGE), token("inv", INVOKER, INVOKE), token("man", MANAGER, MANAGE)]
    )
    assert store.enabled and store.open_scopes == frozenset()
    assert not store.is_open(INVOKE) and not store.is_open(ANY) and not store.is_open(MANAGE)
    assert store.is_open(None)
    assert store.check(f"Bearer {ADMIN}", MANAGE).name == "admin"
    assert store.check(f"Bearer {ADMIN}", INVOKE).name == "admin"
    assert store.check(f"Bearer {INVOKER}", INVOKE).name == "inv"
    assert store.check(f"Bearer {MANAGER}", ANY).name == "man"  # any valid token may read
    assert store.check(f"Bearer {INVOKER}", ANY).name == "inv"
    assert store.check(f"bearer   {INVOKER}  ", INVOKE).name == "inv"  # scheme case, spaces
    assert denied(store, f"Bearer {INVOKER}", MANAGE) == (
        grpc.StatusCode.PERMISSION_DENIED,
        403,
        "token 'inv' lacks the 'manage' scope",
    )
    assert denied(store, f"Bearer {MANAGER}", INVOKE)[:2] == (grpc.StatusCode.PERMISSION_DENIED, 403)
    assert denied(store, None, INVOKE) == (
        grpc.StatusCode.UNAUTHENTICATED,
        401,
        "missing bearer token (Authorization: Bearer <token>)",
    )
    assert denied(store, "", ANY)[2].startswith("missing bearer token")
    assert denied(store, "Bearer wrong", INVOKE) == (grpc.StatusCode.UNAUTHENTICATED, 401, "invalid token")
    assert denied(store, ADMIN, INVOKE)[2] == "malformed Authorization header: use 'Bearer <token>'"
    for header in ("Basic abc", "Bearer", "Bearer   ", f"Token {ADMIN}"):
        assert denied(store, header, INVOKE)[:2] == (grpc.StatusCode.UNAUTHENTICATED, 401), header
        assert denied(store, header, INVOKE)[2].startswith("malformed"), header


def test_no_configured_tokens_opens_invoke_and_reads_but_never_management() -> None:
    store = TokenStore([])
    assert not store.enabled and store.open_scopes == {INVOKE, ANY}
    assert store.check(None, INVOKE) is None and store.check("Bearer whatever", ANY) is None
    assert store.is_open(INVOKE) and store.is_open(ANY) and not store.is_open(MANAGE)
    for header in (None, "", f"Bearer {LOCAL}"):
        code, http, message = denied(store, header, MANAGE)
        assert (code, http, message) == (grpc.StatusCode.UNAUTHENTICATED, 401, auth.MANAGEMENT_CLOSED)


def test_local_admin_token_manages_an_otherwise_open_gateway() -> None:
    store = TokenStore([], local_admin=token("local-admin", LOCAL, INVOKE, MANAGE))
    assert store.open_scopes == {INVOKE, ANY} and not store.enabled
    assert store.check(f"Bearer {LOCAL}", MANAGE).name == "local-admin"
    assert denied(store, None, MANAGE)[2] == auth.MANAGEMENT_CLOSED
    assert denied(store, "Bearer nope", MANAGE)[2] == "invalid token"
    assert denied(store, "Basic x", MANAGE)[2].startswith("malformed")
    # with configured tokens too, the local admin is one more accepted token
    both = TokenStore(
        [token("inv", INVOKER, INVOKE)], local_admin=token("local-admin", LOCAL, INVOKE, MANAGE)
    )
    assert both.check(f"Bearer {LOCAL}", MANAGE).name == "local-admin"
    assert both.check(f"Bearer {INVOKER}", INVOKE).name == "inv"
    assert denied(both, None, INVOKE)[2].startswith("missing bearer token")


def test_open_management_opens_manage_only_without_configured_tokens() -> None:
    assert TokenStore([], open_management=True).open_scopes == {INVOKE, ANY, MANAGE}
    assert TokenStore([], open_management=True).open_management is True
    assert TokenStore([]).open_management is False
    opened = TokenStore.from_environment(None, {}, open_management=True)
    assert opened.open_management is True and opened.is_open(MANAGE)
    assert not TokenStore.from_environment(None, {}).is_open(MANAGE)
    assert TokenStore([], open_management=True).check(None, MANAGE) is None
    assert TokenStore([token("a", ADMIN, MANAGE)], open_management=True).open_scopes == frozenset()


def test_tokens_from_file_and_environment(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    digest = hashlib.sha256(b"hashed-secret").hexdigest()
    tokens.write_text(
        "tokens:\n"
        f"  - {{name: hashed, sha256: {digest}, scopes: [manage]}}\n"
        "  - {token: plain-secret}\n"  # no name, no scopes: token1, invoke only
        "  - {name: both, token: both-secret, scopes: [invoke, manage]}\n"
    )
    store = TokenStore.from_environment(
        None, {"OPENFX_TOKENS_FILE": str(tokens), "OPENFX_ADMIN_TOKEN": ADMIN, "OPENFX_INVOKE_TOKEN": INVOKER}
    )
    assert [(t.name, sorted(t.scopes)) for t in store.tokens] == [
        ("hashed", [MANAGE]),
        ("token1", [INVOKE]),
        ("both", [INVOKE, MANAGE]),
        ("env-admin", [INVOKE, MANAGE]),
        ("env-invoke", [INVOKE]),
    ]
    assert store.check("Bearer hashed-secret", MANAGE).name == "hashed"
    assert denied(store, f"Bearer {digest}", MANAGE)[2] == "invalid token"  # the digest is not the token
    assert store.check("Bearer plain-secret", INVOKE).name == "token1"
    assert store.check(f"Bearer {ADMIN}", MANAGE).name == "env-admin"
    assert denied(store, f"Bearer {INVOKER}", MANAGE)[0] == grpc.StatusCode.PERMISSION_DENIED
    # the argument wins over the environment's file; no tokens at all: nothing configured
    other = tmp_path / "other.yaml"
    other.write_text("tokens:\n  - {name: o, token: other-secret}\n")
    assert [
        t.name for t in TokenStore.from_environment(str(other), {"OPENFX_TOKENS_FILE": str(tokens)}).tokens
    ] == ["o"]
    empty = TokenStore.from_environment(None, {})
    assert empty.tokens == [] and empty.local_admin is None and empty.accepted == []
    assert [t.name for t in TokenStore.from_environment(None, {"OPENFX_ADMIN_TOKEN": ""}).tokens] == []


def test_tokens_from_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENFX_INVOKE_TOKEN", INVOKER)
    monkeypatch.delenv("OPENFX_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("OPENFX_TOKENS_FILE", raising=False)
    assert [t.name for t in TokenStore.from_environment().tokens] == ["env-invoke"]


def test_tokens_are_kept_only_as_digests(tmp_path: Path) -> None:
    store = TokenStore.from_environment(None, {"OPENFX_ADMIN_TOKEN": ADMIN})
    assert store.tokens[0].digest == hashlib.sha256(ADMIN.encode()).digest()
    assert ADMIN not in repr(store.tokens)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "tokens file not found"),
        ("tokens: [a, b", "not valid YAML"),
        ("", "expected 'tokens:' with a list of {name, token or sha256, scopes}"),
        ("- a\n- b", "expected 'tokens:' with a list"),
        ("tokens: {name: x}", "expected 'tokens:' with a list"),
        ("tokens:\n  - {name: x, token: s, scope: [invoke]}", "tokens[0]: unknown key 'scope'"),
        (
            "tokens:\n  - {name: x, token: s, scopes: [admin]}",
            "tokens[0]: scopes must be among ['invoke', 'manage']",
        ),
        ("tokens:\n  - {token: s}\n  - {name: x, sha256: not-hex}", "tokens[1]: sha256 is not hex"),
        ("tokens:\n  - {name: x}", "tokens[0] needs 'token' or 'sha256'"),
        ("tokens:\n  - {name: x, token: ''}", "tokens[0] needs 'token' or 'sha256'"),
        ("tokens:\n  - just-a-string", "tokens[0] must be a mapping"),
    ],
)
def test_bad_tokens_files(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "tokens.yaml"
    if content is not None:
        path.write_text(content + "\n")
    with pytest.raises(ConfigError) as err:
        TokenStore.from_environment(str(path), {})
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_admin_token_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(LOCAL + "\n")
    path.chmod(0o600)
    store = TokenStore.from_environment(None, {}, admin_token_file=str(path))
    assert store.local_admin == token("local-admin", LOCAL, INVOKE, MANAGE)
    assert store.accepted == [store.local_admin]
    assert store.check(f"Bearer {LOCAL}", MANAGE).name == "local-admin"
    for mode in (0o640, 0o604, 0o700 | 0o004):
        path.chmod(mode)
        with pytest.raises(
            ConfigError, match=f"readable by others \\(mode {mode & 0o777:o}\\); chmod 600 it"
        ):
            TokenStore.from_environment(None, {}, admin_token_file=str(path))
    path.chmod(0o400)
    assert TokenStore.from_environment(None, {}, admin_token_file=str(path)).local_admin is not None
    path.chmod(0o600)
    path.write_text("x" * 15)
    with pytest.raises(ConfigError, match="shorter than 16 characters"):
        TokenStore.from_environment(None, {}, admin_token_file=str(path))
    path.write_text("x" * 16)
    assert TokenStore.from_environment(None, {}, admin_token_file=str(path)).local_admin is not None
    with pytest.raises(ConfigError, match="cannot read the admin token file"):
        TokenStore.from_environment(None, {}, admin_token_file=str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:31113", True),
        ("127.8.9.10:1", True),
        ("[::1]:31113", True),
        ("localhost:31113", True),
        ("0.0.0.0:31113", False),
        ("[::]:1", False),
        ("10.0.0.1:31113", False),
        ("example.org:31113", False),
    ],
)
def test_is_loopback(address: str, loopback: bool) -> None:
    assert auth.is_loopback(address) is loopback


def _details(method: str, header: str | None) -> SimpleNamespace:
    metadata = (("authorization", header),) if header is not None else ()
    return SimpleNamespace(method=method, invocation_metadata=metadata)


def test_interceptor_checks_gateway_methods_only() -> None:
    store = TokenStore([token("inv", INVOKER, INVOKE)])
    rejected: list[AuthError] = []
    interceptor = auth.AuthInterceptor(store, rejected.append)
    codec = {"request_deserializer": bytes.upper, "response_serializer": bytes.lower}
    unary = grpc.unary_unary_rpc_method_handler(lambda r, c: r, **codec)
    stream = grpc.stream_stream_rpc_method_handler(lambda r, c: r, **codec)

    async def intercept(method: str, header: str | None, handler: object = unary) -> object:
        async def continuation(details: SimpleNamespace) -> object:
            assert details.method == method  # the call's own details go on
            return handler

        return await interceptor.intercept_service(continuation, _details(method, header))

    assert asyncio.run(intercept("/pb.FxGateway/Invoke", f"Bearer {INVOKER}")) is unary
    assert asyncio.run(intercept("/pb.Gateway/Invoke", f"Bearer {INVOKER}")) is unary
    assert asyncio.run(intercept("/grpc.health.v1.Health/Check", None)) is unary  # probes stay open
    assert asyncio.run(intercept("/pb.FxGateway/HealthCheck", None)) is unary
    assert asyncio.run(intercept("/other.Service/Deploy", None)) is unary  # another service's method
    assert asyncio.run(intercept("/pb.FxGateway/Invoke", None, None)) is None  # unknown method: grpc answers
    assert rejected == []
    refused = asyncio.run(intercept("/pb.FxGateway/Invoke", None))
    assert refused is not unary and refused.unary_unary is not None
    # the refusal parses and answers like the method it stands for
    assert refused.request_deserializer is unary.request_deserializer
    assert refused.response_serializer is unary.response_serializer
    refused_stream = asyncio.run(intercept("/pb.FxGateway/Invokes", "Bearer nope", stream))
    assert refused_stream is not stream and refused_stream.stream_stream is not None
    assert refused_stream.request_deserializer is stream.request_deserializer
    denied_deploy = asyncio.run(intercept("/pb.FxGateway/Deploy", f"Bearer {INVOKER}"))
    assert denied_deploy is not unary
    assert [(e.code, e.message) for e in rejected] == [
        (grpc.StatusCode.UNAUTHENTICATED, "missing bearer token (Authorization: Bearer <token>)"),
        (grpc.StatusCode.UNAUTHENTICATED, "invalid token"),
        (grpc.StatusCode.PERMISSION_DENIED, "token 'inv' lacks the 'manage' scope"),
    ]

    class Context:
        code: object = None

        async def abort(self, code: grpc.StatusCode, message: str) -> None:
            self.code = (code, message)
            raise RuntimeError("aborted")

    context = Context()
    with pytest.raises(RuntimeError):
        asyncio.run(refused.unary_unary(None, context))
    assert context.code == (
        grpc.StatusCode.UNAUTHENTICATED,
        "missing bearer token (Authorization: Bearer <token>)",
    )

    async def drain() -> None:
        async for _ in refused_stream.stream_stream(None, context):
            pass

    with pytest.raises(RuntimeError):
        asyncio.run(drain())
    assert context.code == (grpc.StatusCode.UNAUTHENTICATED, "invalid token")


def test_open_scopes_skip_the_check_in_the_interceptor() -> None:
    rejected: list[AuthError] = []
    interceptor = auth.AuthInterceptor(TokenStore([]), rejected.append)
    unary = grpc.unary_unary_rpc_method_handler(lambda r, c: r)

    async def intercept(method: str) -> object:
        async def continuation(details: object) -> object:
            return unary

        return await interceptor.intercept_service(continuation, _details(method, None))

    assert asyncio.run(intercept("/pb.FxGateway/Invoke")) is unary
    assert asyncio.run(intercept("/pb.FxGateway/List")) is unary
    assert asyncio.run(intercept("/pb.FxGateway/Deploy")) is not unary
    assert [e.message for e in rejected] == [auth.MANAGEMENT_CLOSED]

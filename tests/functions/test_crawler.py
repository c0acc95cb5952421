"""crawler against pages served by a local HTTP server started here; nothing reaches the internet."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from collections.abc import Iterator

import grpc
import pytest
import requests

from openfx.config import load_stack
from openfx.errors import InvokeError
from openfx.function_def import to_request
from openfx.pb import fxgateway_pb2 as gpb
from openfx.watcher.loader import load_handler
from tests.conftest import ROOT, RunningGateway, free_port
from tests.functions.conftest import Req, call
from tests.test_gateway_manage import meta, wait_for

HANDLER = ROOT / "functions/crawler/src/handler.py"
NEWS = "<html><body>" + "".join(f'<a class="issue" href="/{i}">Headline  {i}</a>' for i in range(1, 26))
PAGES = {
    "/news.html": (200, "text/html; charset=utf-8", NEWS + "</body></html>"),
    "/robots.txt": (200, "text/plain", "User-agent: *\nDisallow: /private\n"),
    "/private.html": (200, "text/html", "<a class='issue'>secret</a>"),
    "/data.json": (200, "application/json", "{}"),
    "/big.html": (200, "text/html", "<p>" + "x" * 300_000 + "</p>"),
    "/missing": (404, "text/html", "nope"),
}


HITS: dict[str, int] = {}  # path -> requests served (the robots.txt cache test counts them)


class Site(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        HITS[self.path] = HITS.get(self.path, 0) + 1
        target = None
        if self.path == "/redirect":
            target = "/news.html"
        elif self.path.startswith("/hops/"):  # /hops/N redirects N more times, then to the news
            left = int(self.path.rsplit("/", 1)[1])
            target = f"/hops/{left - 1}" if left > 1 else "/news.html"
        elif self.path.startswith("/to?"):  # an open redirect: /to?<absolute URL>
            target = self.path.partition("?")[2]
        if target is not None:
            self.send_response(302)
            self.send_header("Location", target)
            self.end_headers()
            return
        status, ctype, body = PAGES.get(self.path, (404, "text/plain", "not found"))
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Site)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def crawler(monkeypatch):  # type: ignore[no-untyped-def]
    """A crawler allowed to reach private addresses (this test's loopback server) and capped at 200 KB."""
    monkeypatch.setenv("CRAWLER_ALLOW_PRIVATE", "1")
    monkeypatch.setenv("CRAWLER_MAX_BYTES", "200000")
    return type(load_handler(HANDLER))()


def ask(crawler, url: str, **extra: object) -> str:  # type: ignore[no-untyped-def]
    return crawler(Req(json.dumps({"url": url, "selector": "a.issue", **extra}).encode()))


def test_headlines_numbered_at_most_20(crawler, site: str) -> None:  # type: ignore[no-untyped-def]
    lines = ask(crawler, f"{site}/news.html").splitlines()
    assert len(lines) == 20
    assert lines[0] == "1,Headline 1" and lines[19] == "20,Headline 20"
    assert ask(crawler, f"{site}/news.html", limit=3).splitlines() == [
        "1,Headline 1",
        "2,Headline 2",
        "3,Headline 3",
    ]
    assert ask(crawler, f"{site}/redirect", limit=1) == "1,Headline 1"


@pytest.mark.parametrize(
    ("path", "extra", "message"),
    [
        ("/private.html", {}, "robots.txt .* disallows"),
        ("/data.json", {}, "not an HTML page"),
        ("/big.html", {}, "larger than 200000 bytes"),
        ("/news.html", {"limit": 50}, "limit must be an integer from 1 to 20"),
        ("/news.html", {"selector": "a[["}, "bad CSS selector"),
    ],
)
def test_value_errors(crawler, site: str, path: str, extra: dict, message: str) -> None:  # type: ignore[no-untyped-def]
    doc = {"url": site + path, "selector": "a.issue", **extra}
    with pytest.raises(ValueError, match=message):
        crawler(Req(json.dumps(doc).encode()))


def test_fetch_failures_have_clear_statuses(crawler, site: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvokeError) as err:
        ask(crawler, f"{site}/missing")
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "HTTP 404" in err.value.message
    with pytest.raises(InvokeError) as err:
        ask(crawler, f"http://127.0.0.1:{free_port()}/")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "cannot connect" in err.value.message

    def no_dns(*args: object, **kwargs: object) -> None:
        raise socket.gaierror("no such host")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(InvokeError) as err:
        ask(crawler, "http://no-such-host.example/")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "DNS lookup failed" in err.value.message


def test_safe_by_default(site: str) -> None:
    default = load_handler(HANDLER)  # CRAWLER_ALLOW_PRIVATE unset
    for url, message in [
        (f"{site}/news.html", "non-public address"),
        ("http://[::1]/", "non-public address"),
        ("http://169.254.169.254/latest/meta-data", "non-public address"),
        ("ftp://example.com/x", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
    ]:
        with pytest.raises(ValueError, match=message):
            default(Req(url.encode()))


def test_redirect_limit_is_five_hops(crawler, site: str) -> None:  # type: ignore[no-untyped-def]
    assert ask(crawler, f"{site}/hops/5", limit=1) == "1,Headline 1"  # 5 redirects: followed
    before = {p: n for p, n in HITS.items() if p.startswith("/hops/")}
    with pytest.raises(ValueError, match="more than 5 redirects"):
        ask(crawler, f"{site}/hops/6", limit=1)
    served = {p: n - before.get(p, 0) for p, n in HITS.items() if p.startswith("/hops/")}
    assert sorted(p for p, n in served.items() if n) == [
        f"/hops/{i}" for i in range(1, 7)
    ]  # 6 requests, no 7th


def test_robots_txt_is_fetched_once_per_site_for_five_minutes(crawler, site: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import types

    now = [1000.0]
    handler_globals = type(crawler).__call__.__globals__
    monkeypatch.setitem(handler_globals, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    start = HITS.get("/robots.txt", 0)
    for _ in range(3):
        ask(crawler, f"{site}/news.html", limit=1)
    assert HITS["/robots.txt"] - start == 1
    now[0] += 300  # exactly the TTL: still cached
    ask(crawler, f"{site}/news.html", limit=1)
    assert HITS["/robots.txt"] - start == 1
    now[0] += 1  # past it: fetched again
    with pytest.raises(ValueError, match="disallows"):
        ask(crawler, f"{site}/private.html")
    assert HITS["/robots.txt"] - start == 2


def test_redirect_to_a_private_address_is_refused(site: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """CRAWLER_ALLOW_PRIVATE unset: a public site (here a name resolved to a public address, its
    requests served by the local test server) that redirects inside is stopped at that hop."""
    monkeypatch.delenv("CRAWLER_ALLOW_PRIVATE", raising=False)
    crawler = type(load_handler(HANDLER))()
    real_getaddrinfo = socket.getaddrinfo
    port = int(site.rsplit(":", 1)[1])

    def resolve(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host == "public.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))]
        return real_getaddrinfo(host, *args, **kwargs)

    real_get = crawler.session.get
    fetched: list[str] = []

    def get(url, **kwargs):  # type: ignore[no-untyped-def]
        fetched.append(url)
        return real_get(url.replace("public.example", "127.0.0.1"), **kwargs)  # the "public" site is ours

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    crawler.session.get = get
    assert ask(crawler, f"http://public.example:{port}/news.html", limit=1) == "1,Headline 1"  # allowed
    for inside in (
        f"http://127.0.0.1:{port}/news.html",
        "http://169.254.169.254/latest/meta-data",
        "http://10.1.2.3/",
    ):
        fetched.clear()
        with pytest.raises(ValueError, match="non-public address"):
            ask(crawler, f"http://public.example:{port}/to?{inside}", limit=1)
        assert fetched == [f"http://public.example:{port}/to?{inside}"]  # the inside address never requested


def test_through_gateway(stack_gateway: RunningGateway, site: str) -> None:
    stub = stack_gateway.stub()
    spec = load_stack(ROOT / "openfx.yaml").functions["crawler"]
    local = spec.model_copy(update={"environment": {**spec.environment, "CRAWLER_ALLOW_PRIVATE": "1"}})
    stub.Deploy(to_request("crawler-local", local), timeout=30)
    try:
        wait_for(lambda: meta(stack_gateway, "crawler-local").AvailableReplicas == 1, what="crawler-local")
        query = json.dumps({"url": f"{site}/news.html", "selector": "a.issue", "limit": 2}).encode()
        assert call(stack_gateway, "crawler-local", query) == b"1,Headline 1\n2,Headline 2"
        r = requests.post(f"{stack_gateway.http_url}/function/crawler-local", data=query, timeout=30)
        assert r.content == b"1,Headline 1\n2,Headline 2"
        # the stack's own crawler keeps refusing loopback addresses
        r = requests.post(f"{stack_gateway.http_url}/function/crawler", data=f"{site}/news.html", timeout=30)
        assert r.status_code == 400 and "non-public address" in r.text
    finally:
        stub.Delete(gpb.DeleteFunctionRequest(FunctionName="crawler-local"), timeout=30)

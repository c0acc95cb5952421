"""Fetch a page and print its headlines as `1,<text>` lines (at most 20), like the workshop.

Input: a URL, or JSON `{"url": ..., "selector": ..., "limit": ...}`; empty input crawls
CRAWLER_DEFAULT_URL with CRAWLER_DEFAULT_SELECTOR. Safe by default: http/https only,
connect/read timeouts, a maximum page size, robots.txt respected, an honest User-Agent,
and private, loopback, link-local and reserved addresses refused (checked on every redirect)
unless CRAWLER_ALLOW_PRIVATE=1, so the function cannot reach a cluster's internals.
"""

import ipaddress
import json
import os
import socket
import time
from urllib.parse import urljoin, urlsplit
from urllib.robotparser import RobotFileParser

import grpc
import requests
from bs4 import BeautifulSoup

from openfx.errors import InvokeError  # a handler may raise it to choose its status

USER_AGENT = "openfx-py-crawler/0.1 (serverless function; respects robots.txt)"
HTML_TYPES = ("text/html", "application/xhtml+xml")
MAX_REDIRECTS = 5
ROBOTS_TTL = 300.0


def _env_bool(name):
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


class Handler:
    def __init__(self):
        self.default_url = os.environ.get("CRAWLER_DEFAULT_URL", "https://news.ycombinator.com/")
        self.default_selector = os.environ.get("CRAWLER_DEFAULT_SELECTOR", ".titleline > a")
        self.allow_private = _env_bool("CRAWLER_ALLOW_PRIVATE")
        self.max_bytes = int(os.environ.get("CRAWLER_MAX_BYTES", str(2 * 1024 * 1024)))
        self.timeout = (
            float(os.environ.get("CRAWLER_CONNECT_TIMEOUT", "3")),
            float(os.environ.get("CRAWLER_READ_TIMEOUT", "10")),
        )
        self.max_limit = 20
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT
        self.robots = {}

    # -- input ---------------------------------------------------------------

    def parse(self, data):
        try:
            text = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError("input is not UTF-8") from None
        url, selector, limit = text or self.default_url, self.default_selector, self.max_limit
        if text.startswith("{"):
            try:
                doc = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"invalid JSON: {exc.msg}") from None
            url = doc.get("url") or self.default_url
            selector = doc.get("selector") or selector
            limit = doc.get("limit", limit)
            if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= self.max_limit:
                raise ValueError(f"limit must be an integer from 1 to {self.max_limit}")
            if not isinstance(url, str) or not isinstance(selector, str):
                raise ValueError("url and selector must be strings")
        return url, selector, limit

    # -- safe fetching -------------------------------------------------------

    def check_url(self, url):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"only http and https URLs are crawled, not {parts.scheme or 'a bare word'!r}")
        if not parts.hostname:
            raise ValueError(f"no host in URL {url!r}")
        try:
            infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        except socket.gaierror:
            raise InvokeError(
                grpc.StatusCode.UNAVAILABLE, f"DNS lookup failed for {parts.hostname}"
            ) from None
        if not self.allow_private:
            for info in infos:
                address = ipaddress.ip_address(info[4][0])
                if not address.is_global:
                    raise ValueError(
                        f"{parts.hostname} resolves to a non-public address ({address}); "
                        "set CRAWLER_ALLOW_PRIVATE=1 to allow it"
                    )

    def fetch(self, url, max_bytes, html=True):
        """GET with redirects followed by hand, so every hop's address is checked."""
        for _ in range(MAX_REDIRECTS + 1):
            self.check_url(url)
            try:
                response = self.session.get(url, timeout=self.timeout, stream=True, allow_redirects=False)
            except requests.exceptions.ConnectTimeout:
                raise InvokeError(grpc.StatusCode.UNAVAILABLE, f"connecting to {url} timed out") from None
            except requests.exceptions.ReadTimeout:
                raise InvokeError(grpc.StatusCode.UNAVAILABLE, f"{url} did not answer in time") from None
            except requests.exceptions.ConnectionError:
                raise InvokeError(
                    grpc.StatusCode.UNAVAILABLE, f"cannot connect to {url} (refused?)"
                ) from None
            with response:
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("Location", ""))
                    continue
                if response.status_code >= 400:
                    raise InvokeError(
                        grpc.StatusCode.FAILED_PRECONDITION, f"{url} answered HTTP {response.status_code}"
                    )
                ctype = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
                if html and ctype not in HTML_TYPES:
                    raise ValueError(f"{url} is not an HTML page (Content-Type {ctype or 'missing'})")
                body = b""
                for chunk in response.iter_content(65536):
                    body += chunk
                    if len(body) > max_bytes:
                        raise ValueError(f"{url} is larger than {max_bytes} bytes")
                return response.status_code, body, response.encoding or "utf-8"
        raise ValueError(f"more than {MAX_REDIRECTS} redirects")

    def allowed_by_robots(self, url):
        """robots.txt rules, fetched once per site and kept for ROBOTS_TTL seconds (as crawlers do)."""
        parts = urlsplit(url)
        site = f"{parts.scheme}://{parts.netloc}"
        cached = self.robots.get(site)
        if cached is None or time.monotonic() - cached[0] > ROBOTS_TTL:
            parser = RobotFileParser()
            try:
                _, body, encoding = self.fetch(f"{site}/robots.txt", 512 * 1024, html=False)
                parser.parse(body.decode(encoding, "replace").splitlines())
            except InvokeError as exc:
                if exc.code != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                parser.parse([])  # no robots.txt (4xx/5xx): no rules
            if len(self.robots) > 1000:
                self.robots.clear()
            cached = self.robots[site] = (time.monotonic(), parser)
        return cached[1].can_fetch(USER_AGENT, url)

    # -- the call ------------------------------------------------------------

    def __call__(self, req):
        url, selector, limit = self.parse(req.input)
        self.check_url(url)
        if not self.allowed_by_robots(url):
            raise ValueError(f"robots.txt of {urlsplit(url).netloc} disallows {url}")
        _, body, encoding = self.fetch(url, self.max_bytes)
        soup = BeautifulSoup(body, "lxml", from_encoding=encoding)  # lxml: ~5x html.parser on big pages
        try:
            nodes = soup.css.compile(selector).iselect(soup)  # lazy: stops at the limit
        except Exception as exc:  # soupsieve raises its own SelectorSyntaxError
            raise ValueError(f"bad CSS selector {selector!r}: {exc}") from None
        lines = []
        for node in nodes:
            text = " ".join(node.get_text(" ", strip=True).split())
            if text:
                lines.append(f"{len(lines) + 1},{text}")
            if len(lines) >= limit:
                break
        return "\n".join(lines)

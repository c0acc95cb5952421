"""broker/bridge.yaml: what loads, and every kind of mistake, named with its file and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from openfx.bridge.config import BridgeConfig, Route, load_bridge_config
from openfx.config import ConfigError
from tests.conftest import ROOT


def test_the_shipped_config_loads_with_its_documented_values() -> None:
    c = load_bridge_config(ROOT / "broker/bridge.yaml")
    assert (c.host, c.port, c.gateway, c.client_id) == (
        "127.0.0.1",
        1883,
        "127.0.0.1:31113",
        "openfx-bridge-0",
    )
    assert (c.max_inflight, c.invoke_timeout, c.session_expiry) == (64, 30, 3600)
    assert (c.retry.budget_seconds, c.retry.first_delay, c.retry.max_delay) == (30, 0.05, 1.0)
    assert [(r.filter, r.function) for r in c.routes] == [("fn/+", "{1}")]
    assert c.metrics_address == "127.0.0.1:9101" and c.ack == "after-reply"


def test_overrides_win_and_none_means_not_given(tmp_path: Path) -> None:
    c = load_bridge_config(ROOT / "broker/bridge.yaml", port=1999, gateway=None, routes=None)
    assert c.port == 1999 and c.gateway == "127.0.0.1:31113" and c.routes[0].filter == "fn/+"
    assert load_bridge_config(None, host="h").host == "h"
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_bridge_config(empty) == BridgeConfig()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "file not found"),
        ("port: [1", "not valid YAML"),
        ("- a\n- b", "expected a mapping at the top level"),
        ("prot: 1883", "unknown key 'prot'"),
        ("retry: {budget: 3}", "unknown key 'retry.budget'"),
        ("port: many", "'port': Input should be a valid integer"),
        ("max_inflight: 0", "'max_inflight': Input should be greater than or equal to 1"),
        ("max_inflight: 65536", "'max_inflight': Input should be less than or equal to 65535"),
        ("session_expiry: -1", "'session_expiry': Input should be greater than or equal to 0"),
        ("invoke_timeout: 0", "'invoke_timeout': Input should be greater than 0"),
        ("retry: {budget_seconds: 0}", "'retry.budget_seconds': Input should be greater than 0"),
        ("retry: {first_delay: -1}", "'retry.first_delay': Input should be greater than 0"),
        ("retry: {max_delay: 0}", "'retry.max_delay': Input should be greater than 0"),
        ("ack: never", "'ack': Input should be 'after-reply' or 'on-receipt'"),
        ("routes: [{filter: 'fn/a+'}]", "not a valid MQTT topic filter: 'fn/a+'"),
        ("routes: [{filter: 'fn/#/x'}]", "not a valid MQTT topic filter: 'fn/#/x'"),
        ("routes: [{filter: 'a#'}]", "not a valid MQTT topic filter: 'a#'"),
        ("routes: [{filter: ''}]", "not a valid MQTT topic filter: ''"),
        ("routes: [{function: echo}]", "'routes.0.filter': Field required"),
        ("routes: [{filter: fn/+, fn: echo}]", "unknown key 'routes.0.fn'"),
    ],
)
def test_mistakes_name_the_file_and_the_key(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "bridge.yaml"
    if content is not None:
        path.write_text(content + "\n")
    with pytest.raises(ConfigError) as err:
        load_bridge_config(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("filter_", "topic", "function", "expected"),
    [
        ("fn/+", "fn/echo", "{1}", "echo"),
        ("fn/+", "fn/echo/x", "{1}", None),
        ("fn/#", "fn/a/b", "{2}", "b"),
        ("fn/#", "fn", "{1}", ""),  # '#' matches the parent level too; no level 1: empty name
        ("sensors/+/battery", "sensors/17/battery", "unmarshalling", "unmarshalling"),
        ("+/+", "a/b", "{0}-{1}", "a-b"),
        ("a/+", "b/c", "{1}", None),
    ],
)
def test_routes_resolve_topics(filter_: str, topic: str, function: str, expected: str | None) -> None:
    assert Route(filter=filter_, function=function).resolve(topic) == expected


def test_first_matching_route_wins_and_own_output_is_recognised() -> None:
    c = BridgeConfig(routes=[Route(filter="fn/special", function="echo"), Route(filter="fn/+")])
    assert c.function_for("fn/special") == "echo" and c.function_for("fn/info") == "info"
    assert c.function_for("other") is None
    assert c.is_own_output("fn/echo/reply") and c.is_own_output("dlq/fn/echo")
    assert not c.is_own_output("fn/echo") and not c.is_own_output("fn/replyx")
    assert c.reply_topic("fn/echo", "echo") == "fn/echo/reply"


def test_the_bridge_refuses_a_bad_config_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text("routes: [{filter: 'fn/a+'}]\n")
    out = subprocess.run(
        [sys.executable, "-m", "openfx.bridge", "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert (
        out.stderr
        == f"bridge: {path}: 'routes.0.filter': Value error, not a valid MQTT topic filter: 'fn/a+'\n"
    )
    bad_route = subprocess.run(
        [sys.executable, "-m", "openfx.bridge", "--route", "fn/a+=echo"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad_route.returncode == 2 and "not a valid MQTT topic filter: 'fn/a+'" in bad_route.stderr

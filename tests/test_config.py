"""Config and stack files: the openfx-cli schema, our additions, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from openfx.config import ConfigError, load_stack
from tests.conftest import ROOT


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_repo_stack_lists_the_collection() -> None:
    stack = load_stack(ROOT / "openfx.yaml")
    assert "echo" in stack.functions
    echo = stack.functions["echo"]
    assert echo.handler_file == ROOT / "functions/echo/src/handler.py"
    assert stack.openfx.gateway == "127.0.0.1:31113"


def test_openfx_cli_format_with_additions(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
functions:
  hello:
    runtime: python3
    desc: ""
    maintainer: ""
    handler: {dir: ./src, file: handler.py, name: Handler}
    docker_registry: 10.0.0.255:5000/openfx
    constraints: [nodetype=cpunode]
    environment: {A: 1, B: null}
    limits: {memory: "", cpu: "", gpu: ""}
    requests: {memory: 50Mi, cpu: 50m, gpu: ""}
    timeout: 500ms
    max_inflight: 4
openfx:
  gateway: 10.0.0.183:31113
""",
    )
    fn = load_stack(path).functions["hello"]
    assert fn.image == "10.0.0.255:5000/openfx/hello"
    assert fn.environment == {"A": "1", "B": ""}
    assert fn.timeout == 0.5 and fn.max_inflight == 4 and fn.replicas == 1
    assert fn.handler_dir == tmp_path / "src"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("functions:\n  a:\n    runtme: python3\n", "unknown key 'runtme'"),
        ("functions:\n  a:\n    handler: {dirr: x}\n", "unknown key 'handler.dirr'"),
        ("functions:\n  a:\n    timeout: soon\n", "'timeout'"),
        ("functions:\n  a:\n    max_inflight: 0\n", "'max_inflight'"),
        ("functions:\n  Bad_Name: {}\n", "function name 'Bad_Name'"),
        ("functions: [\n", "not valid YAML"),
        ("- a\n", "expected a mapping"),
        ("gatway: x\n", "unknown key 'gatway'"),
        ("include: [nothing/*.yaml]\n", "matches no file"),
    ],
)
def test_bad_config_is_one_line_naming_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_stack(path)
    assert message in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_stack(tmp_path / "nope.yaml")


def test_include_then_override_environment(tmp_path: Path) -> None:
    (tmp_path / "fn").mkdir()
    write(tmp_path / "fn", "functions:\n  f:\n    environment: {A: '1', B: '2'}\n    timeout: 5\n")
    stack = write(
        tmp_path, "include: [fn/config.yaml]\nfunctions:\n  f:\n    environment: {B: '3'}\n", "stack.yaml"
    )
    fn = load_stack(stack).functions["f"]
    assert fn.environment == {"A": "1", "B": "3"} and fn.timeout == 5
    assert fn.handler_dir == tmp_path / "fn" / "src"  # relative to the included file


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0),
        (2.5, 2.5),
        ("30", 30.0),
        ("30s", 30.0),
        (" 1.5 s ", 1.5),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        (".5", 0.5),
    ],
)
def test_timeouts_take_go_style_durations(tmp_path: Path, value: object, seconds: float) -> None:
    import yaml as _yaml

    path = write(tmp_path, _yaml.safe_dump({"functions": {"f": {"handler": {"dir": "."}, "timeout": value}}}))
    assert load_stack(path).functions["f"].timeout == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", "-1s", "1d", ""])
def test_bad_durations_say_how_to_write_one(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"functions:\n  f:\n    handler: {{dir: .}}\n    timeout: '{value}'\n")
    with pytest.raises(ConfigError) as err:
        load_stack(path)
    assert "timeout" in str(err.value) and "\n" not in str(err.value)
    if value not in ("-1s",):
        assert f"not a duration: {value!r} (use e.g. 30, '30s', '500ms', '2m')" in str(err.value)


def test_yaml_errors_name_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "functions:\n  f:\n    handler: [oops\n")
    with pytest.raises(ConfigError) as err:
        load_stack(path)
    message = str(err.value)
    assert message.startswith(f"{path}: line 4 not valid YAML (") and "\n" not in message
    assert "parse error" not in message  # PyYAML's own problem text


def test_environment_files_and_deep_overrides(tmp_path: Path) -> None:
    fn_dir = tmp_path / "fn"
    fn_dir.mkdir()
    (fn_dir / "env.yaml").write_text("environment: {FROM_FILE: 1, SHARED: file}\n")
    write(
        fn_dir,
        "functions:\n  f:\n    handler: {dir: ., file: h.py}\n    environment: {OWN: a}\n"
        "    environment_file: [env.yaml]\n    limits: {memory: 1G, cpu: '1'}\n",
    )
    stack = write(
        tmp_path, "include: [fn/config.yaml]\nfunctions:\n  f:\n    limits: {memory: 2G}\n", name="stack.yaml"
    )
    f = load_stack(stack).functions["f"]
    assert f.environment == {"OWN": "a", "FROM_FILE": "1", "SHARED": "file"}  # values as strings
    assert f.handler_file == fn_dir / "h.py"  # the include's folder, its handler file kept
    assert (f.limits.memory, f.limits.cpu) == ("2G", "1")  # merged key by key, not replaced


def test_a_yaml_error_without_a_place_is_still_one_line(tmp_path: Path) -> None:
    """PyYAML's reader errors (a control character) carry neither a mark nor a problem text: the
    message names the character and where it is."""
    path = write(tmp_path, "functions:\n  f: \x07\n")
    with pytest.raises(ConfigError) as err:
        load_stack(path)
    assert str(err.value) == (
        f"{path}: character 17 not valid YAML (special characters are not allowed: '\\x07')"
    )


def test_an_override_may_add_a_section_the_include_lacks(tmp_path: Path) -> None:
    fn_dir = tmp_path / "fn"
    fn_dir.mkdir()
    write(fn_dir, "functions:\n  f:\n    handler: {dir: ., file: h.py}\n")
    stack = write(
        tmp_path, "include: [fn/config.yaml]\nfunctions:\n  f:\n    limits: {memory: 2G}\n", name="stack.yaml"
    )
    assert load_stack(stack).functions["f"].limits.memory == "2G"


def test_the_default_image_is_the_name_under_the_registry_if_any(tmp_path: Path) -> None:
    bare = write(tmp_path, "functions:\n  f: {}\n")
    assert load_stack(bare).functions["f"].image == "f"
    pushed = write(tmp_path, "functions:\n  f: {docker_registry: 'r.local:5000'}\n", name="r.yaml")
    assert load_stack(pushed).functions["f"].image == "r.local:5000/f"

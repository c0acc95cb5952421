"""sentiment-analysis: the seed's exact output, JSON mode, bad input, no downloads."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import grpc
import pytest
import requests

from openfx.watcher.loader import load_handler
from tests.conftest import ROOT, RunningGateway
from tests.functions.conftest import Req, call

HANDLER = ROOT / "functions/sentiment-analysis/src/handler.py"


@pytest.fixture(scope="module")
def handler():  # type: ignore[no-untyped-def]
    return load_handler(HANDLER)


def test_seed_output(handler) -> None:  # type: ignore[no-untyped-def]
    assert handler(Req(b"Have a nice day\n")) == "Sentiment(polarity=0.6, 1.0) \n"


def test_json_texts(handler) -> None:  # type: ignore[no-untyped-def]
    one = json.loads(handler(Req(b'{"text": "Have a nice day"}')))
    assert one == {"text": "Have a nice day", "polarity": 0.6, "subjectivity": 1.0}
    many = json.loads(handler(Req(json.dumps(["I love it", "This is terrible"]).encode())))
    assert many[0]["polarity"] > 0 > many[1]["polarity"]
    assert json.loads(handler(Req(b'{"texts": []}'))) == []


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"\xff\xfe", "not UTF-8"), (b'{"txt": 1}', '"text"'), (b"[1, 2]", "list of strings")],
)
def test_bad_input_is_value_error(handler, data: bytes, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        handler(Req(data))


def test_no_network_needed() -> None:
    """Run the handler in a fresh process where every socket connect fails: no corpus download."""
    script = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('network disabled in this test')\n"
        "socket.socket.connect = refuse; socket.create_connection = refuse\n"
        "from openfx.watcher.loader import load_handler\n"
        "class R: input = b'Have a nice day'\n"
        f"print(load_handler({str(HANDLER)!r})(R()), end='')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin", "NLTK_DATA": "/nonexistent", "HOME": "/nonexistent"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "Sentiment(polarity=0.6, 1.0) \n"
    assert socket.socket.connect is not None  # this process untouched


def test_through_gateway(stack_gateway: RunningGateway) -> None:
    assert (
        call(stack_gateway, "sentiment-analysis", b"Have a nice day\n") == b"Sentiment(polarity=0.6, 1.0) \n"
    )
    r = requests.post(
        f"{stack_gateway.http_url}/function/sentiment-analysis", data=b'{"text":"great"}', timeout=30
    )
    assert r.status_code == 200 and json.loads(r.content)["polarity"] == 0.8
    with pytest.raises(grpc.RpcError) as err:
        call(stack_gateway, "sentiment-analysis", b"\xff")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        requests.post(
            f"{stack_gateway.http_url}/function/sentiment-analysis", data=b"\xff", timeout=30
        ).status_code
        == 400
    )

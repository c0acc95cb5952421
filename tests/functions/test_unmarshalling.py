"""unmarshalling: the seed's Go output, strict typing, batches, and arbitrary bytes (hypothesis)."""

from __future__ import annotations

import json

import grpc
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from openfx.watcher.loader import load_handler
from tests.conftest import ROOT, RunningGateway
from tests.functions.conftest import Req, call

SEED_IN = b'{"name": "battery sensor", "capacity": 40, "time": "2019-01-21T19:07:28Z"}\n'
SEED_OUT = "{Name:battery sensor Capacity:40 Time:2019-01-21T19:07:28Z}"
handler = load_handler(ROOT / "functions/unmarshalling/src/handler.py")


def test_seed_output() -> None:
    assert handler(Req(SEED_IN)) == SEED_OUT


def test_array_and_ndjson_line_by_line() -> None:
    reading = {"name": "a", "capacity": 1, "time": "2020-01-01T00:00:00+09:00", "extra": True}
    expected = "{Name:a Capacity:1 Time:2020-01-01T00:00:00+09:00}\n" * 2
    assert handler(Req(json.dumps([reading, reading]).encode())) == expected
    assert handler(Req((json.dumps(reading) + "\n" + json.dumps(reading)).encode())) == expected


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (b'{"capacity": 40, "time": "2019-01-21T19:07:28Z"}', "name: missing"),
        (
            b'{"name": "a", "capacity": "40", "time": "2019-01-21T19:07:28Z"}',
            "capacity: Input should be a valid integer",
        ),
        (b'{"name": "a", "capacity": 40.5, "time": "2019-01-21T19:07:28Z"}', "capacity"),
        (b'{"name": "a", "capacity": 40, "time": "yesterday"}', "time: Value error, not an RFC 3339"),
        (b'{"name": "a", "capacity": 40, "time": "2019-02-30T00:00:00Z"}', "day is out of range"),
        (b'{"name": ', "invalid JSON"),
        (b"[1]", "reading 0: expected a JSON object"),
        (b"", "empty input"),
        (b"\xff", "not UTF-8"),
    ],
)
def test_clear_errors(doc: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        handler(Req(doc))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_give_a_reading_or_a_value_error(data: bytes) -> None:
    try:
        out = handler(Req(data))
    except ValueError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert out.startswith("{Name:")


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {"name": st.text(), "capacity": st.integers(), "time": st.just("2019-01-21T19:07:28Z")}
    )
)
def test_valid_readings_round_trip(doc: dict) -> None:
    assert handler(Req(json.dumps(doc).encode())) == (
        f"{{Name:{doc['name']} Capacity:{doc['capacity']} Time:2019-01-21T19:07:28Z}}"
    )


def test_through_gateway(stack_gateway: RunningGateway) -> None:
    assert call(stack_gateway, "unmarshalling", SEED_IN) == SEED_OUT.encode()
    r = requests.post(f"{stack_gateway.http_url}/function/unmarshalling", data=b'{"name": 3}', timeout=30)
    assert r.status_code == 400 and r.text.startswith("name: Input should be a valid string")
    with pytest.raises(grpc.RpcError) as err:
        call(stack_gateway, "unmarshalling", b"{")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

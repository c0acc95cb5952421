"""imgprocessing: each operation's effect on known pixels, bad images, and the gateway paths."""

from __future__ import annotations

import cv2
import grpc
import numpy as np
import pytest
import requests

from openfx.pb import fxgateway_pb2 as gpb
from openfx.watcher.loader import HandlerLoadError, load_handler
from tests.conftest import ROOT, RunningGateway
from tests.functions.conftest import Req, call
from tests.functions.image_helpers import drawn_face, green_box

HANDLER = ROOT / "functions/imgprocessing/src/handler.py"


def scene() -> np.ndarray:
    """960x640: black, a white square (edges on its border only), a pure blue block (gray value known)."""
    img = np.zeros((640, 960, 3), np.uint8)
    img[200:400, 300:500] = 255
    img[50:150, 700:900] = (255, 0, 0)  # BGR blue
    return img


def jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def png(img: np.ndarray) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


def decode(data: bytes | tuple[bytes, str]) -> np.ndarray:
    if isinstance(data, tuple):  # the handler's own answer: (JPEG, its content type)
        data, content_type = data
        assert content_type == "image/jpeg"
    assert data[:3] == b"\xff\xd8\xff"
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


@pytest.fixture(scope="module")
def handler():  # type: ignore[no-untyped-def]
    return load_handler(HANDLER)


def test_edges_mark_the_square_border_only(handler) -> None:  # type: ignore[no-untyped-def]
    out = decode(handler(Req(b"op=edges\n" + png(scene()))))
    assert out.ndim == 2 and out.shape == (640, 960)
    assert out[200, 350:450].mean() > 100 or out[199:202, 350:450].max() > 200  # top border
    assert out[250:350, 350:450].max() < 40  # flat interior
    assert out[500:600, 50:200].max() < 40  # flat background


def test_gray_matches_the_luma_of_known_pixels(handler) -> None:  # type: ignore[no-untyped-def]
    out = decode(handler(Req(b"op=gray\n" + png(scene()))))
    assert out.ndim == 2
    assert abs(int(out[100, 800]) - round(0.114 * 255)) <= 3  # blue -> 29
    assert out[300, 400] >= 250 and out[600, 10] <= 3


def test_a_real_face_gets_a_green_box_around_it(handler) -> None:  # type: ignore[no-untyped-def]
    face = drawn_face(300)  # 600x600: detected on the handler's 320-wide copy, drawn on the original
    out = decode(handler(Req(b"op=faces\n" + jpeg(face))))
    box = green_box(out)
    assert box is not None, "no face found"
    x1, y1, x2, y2 = box
    assert x1 < 300 - 70 and x2 > 300 + 70 and y1 < 300 - 60 and y2 > 300 + 90  # eyes to mouth inside
    assert 150 < x2 - x1 < 500 and 150 < y2 - y1 < 500  # a face-sized box, not the whole picture
    assert green_box(out[y1 + 10 : y2 - 10, x1 + 10 : x2 - 10]) is None  # lines only: the face is untouched
    assert np.abs(out[300, 300].astype(int) - face[300, 300].astype(int)).max() < 12


def test_default_operation_is_faces(handler) -> None:  # type: ignore[no-untyped-def]
    face = jpeg(drawn_face(300))
    assert green_box(decode(handler(Req(face)))) is not None  # no prefix: faces, a box drawn
    untouched = decode(handler(Req(b"op=none\n" + face)))
    assert green_box(untouched) is None and untouched.shape == (600, 600, 3)
    plain = decode(handler(Req(jpeg(scene()))))  # no face: the picture comes back as it was
    assert plain.shape == (640, 960, 3) and np.abs(plain.astype(int) - scene().astype(int)).mean() < 3


def test_img_operation_sets_the_default(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("IMG_OPERATION", "gray")
    gray_default = type(load_handler(HANDLER))()
    assert decode(gray_default(Req(png(scene())))).ndim == 2
    assert decode(gray_default(Req(b"op=none\n" + png(scene())))).ndim == 3  # a request still picks
    monkeypatch.setenv("IMG_OPERATION", "sepia")
    with pytest.raises(
        HandlerLoadError, match="IMG_OPERATION='sepia'; choose one of faces, edges, gray, none"
    ):
        load_handler(HANDLER)


def test_face_boxes_are_drawn_where_the_detector_fires(handler) -> None:  # type: ignore[no-untyped-def]
    """The drawing alone, at a known place: a stand-in detector returns one box on the small copy."""

    class FakeCascade:
        def detectMultiScale(self, *args, **kwargs):  # noqa: N802 (OpenCV's name)
            return np.array([[50, 50, 40, 40]])  # on the 320-wide copy: (100,100)-(180,180) here

    real = handler.faces
    handler.faces = FakeCascade()
    try:
        out = decode(handler(Req(b"op=faces\n" + png(np.zeros((640, 640, 3), np.uint8)))))
    finally:
        handler.faces = real
    green = out[100, 140]  # on the box's top edge
    assert green[1] > 200 and green[0] < 60 and green[2] < 60
    assert out[140, 140].max() < 30  # inside the box untouched


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty input"),
        (b"hello, not an image", "not a JPEG or PNG"),
        (None, "truncated JPEG"),
        (b"op=sepia\n\xff\xd8\xff", "unknown operation 'sepia'"),
        (b"op=edges", "must end with a newline"),
        (b"\xff\xd8\xff\xe0garbage\xff\xd9", "could not be decoded"),
    ],
)
def test_bad_images_are_value_errors(handler, data: bytes | None, message: str) -> None:  # type: ignore[no-untyped-def]
    if data is None:
        full = jpeg(scene())
        data = full[: len(full) // 2]
    with pytest.raises(ValueError, match=message):
        handler(Req(data))


def test_size_limit(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("IMG_MAX_BYTES", "1000")
    small_limit = type(load_handler(HANDLER))()
    with pytest.raises(ValueError, match="over the limit of 1000"):
        small_limit(Req(png(scene())))


def test_through_gateway_grpc_http_and_stream(stack_gateway: RunningGateway) -> None:
    frame = jpeg(scene(), 80)
    assert decode(call(stack_gateway, "imgprocessing", b"op=edges\n" + frame)).ndim == 2
    r = requests.post(f"{stack_gateway.http_url}/function/imgprocessing", data=frame, timeout=30)
    assert r.status_code == 200 and decode(r.content).shape == (640, 960, 3)
    assert r.headers["Content-Type"] == "image/jpeg" and r.headers["X-Content-Type-Options"] == "nosniff"
    echoed = requests.post(f"{stack_gateway.http_url}/function/echo", data=b"<p>x</p>", timeout=30)
    assert echoed.headers["Content-Type"] == "application/octet-stream"  # echo chose no type
    replies = stack_gateway.stub().Invokes(
        iter([gpb.InvokeServiceRequest(Service="imgprocessing", Input=frame)] * 5), timeout=60
    )
    assert [decode(m.Output).shape for m in replies] == [(640, 960, 3)] * 5
    with pytest.raises(grpc.RpcError) as err:
        call(stack_gateway, "imgprocessing", b"not an image")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert call(stack_gateway, "echo", b"alive") == b"alive"
    r = requests.post(f"{stack_gateway.http_url}/function/imgprocessing", data=frame[:1000], timeout=30)
    assert r.status_code == 400 and "truncated JPEG" in r.text
    bomb = png(np.zeros((7000, 7000), np.uint8))  # 49 MP in ~50 KB
    r = requests.post(f"{stack_gateway.http_url}/function/imgprocessing", data=bomb, timeout=30)
    assert r.status_code == 400 and "over the limit of 40000000 pixels" in r.text

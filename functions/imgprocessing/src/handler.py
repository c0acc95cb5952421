"""Image bytes (JPEG or PNG) -> a processed JPEG.

Operations: `faces` (default: Haar-cascade face detection with the cascade OpenCV ships,
green boxes drawn), `edges` (Canny), `gray`, `none` (re-encode only). The default comes
from IMG_OPERATION; a request picks another by prefixing the image with one ASCII line
`op=<name>\\n` (images start with binary magic bytes, so the prefix is unambiguous).
Settings: IMG_JPEG_QUALITY (80), IMG_MAX_BYTES (20 MiB), IMG_MAX_PIXELS (40 MP),
IMG_FACE_WIDTH (320: faces are searched on a copy this wide).
"""

import os

MAX_PIXELS = int(os.environ.get("IMG_MAX_PIXELS", str(40_000_000)))
# imdecode refuses images over this many pixels (decompression bombs); read when cv2 is imported
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_PIXELS))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

JPEG, PNG = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"
OPERATIONS = ("faces", "edges", "gray", "none")


def _split_op(data, default):
    if data.startswith(b"op="):
        line, sep, rest = data.partition(b"\n")
        if not sep:
            raise ValueError("an op= prefix must end with a newline before the image bytes")
        op = line[3:].decode("ascii", "replace").strip()
        return op, rest
    return default, data


class Handler:
    def __init__(self):
        self.default_op = os.environ.get("IMG_OPERATION", "faces")
        if self.default_op not in OPERATIONS:
            raise ValueError(f"IMG_OPERATION={self.default_op!r}; choose one of {', '.join(OPERATIONS)}")
        self.quality = int(os.environ.get("IMG_JPEG_QUALITY", "80"))
        self.max_bytes = int(os.environ.get("IMG_MAX_BYTES", str(20 * 1024 * 1024)))
        self.face_width = int(os.environ.get("IMG_FACE_WIDTH", "320"))  # detection size: speed vs small faces
        cascade = os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
        self.faces = cv2.CascadeClassifier(cascade)
        if self.faces.empty():
            raise RuntimeError(f"cannot load the face cascade {cascade}")

    def decode(self, data):
        if not data:
            raise ValueError("empty input: send a JPEG or PNG image")
        if len(data) > self.max_bytes:
            raise ValueError(f"image of {len(data)} bytes is over the limit of {self.max_bytes}")
        if data.startswith(JPEG):
            if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
                raise ValueError("truncated JPEG (no end-of-image marker)")
        elif data.startswith(PNG):
            if b"IEND" not in data[-16:]:
                raise ValueError("truncated PNG (no IEND chunk)")
        else:
            raise ValueError("not a JPEG or PNG image")
        try:
            frame = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        except cv2.error:
            raise ValueError(f"image over the limit of {MAX_PIXELS} pixels (IMG_MAX_PIXELS)") from None
        if frame is None:
            raise ValueError("the image could not be decoded (corrupt, or over IMG_MAX_PIXELS)")
        return frame

    def process(self, op, frame):
        if op == "none":
            return frame
        gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        if op == "gray":
            return gray
        if op == "edges":
            return cv2.Canny(gray, 100, 200)
        # faces: detect on a downscaled copy (fast enough for video), draw on the original
        scale = max(1.0, max(gray.shape) / self.face_width)
        small = cv2.resize(gray, None, fx=1 / scale, fy=1 / scale) if scale > 1 else gray
        boxes = self.faces.detectMultiScale(
            cv2.equalizeHist(small), scaleFactor=1.2, minNeighbors=5, minSize=(24, 24)
        )
        out = frame.copy()
        for x, y, w, h in boxes:
            p1 = (int(x * scale), int(y * scale))
            p2 = (int((x + w) * scale), int((y + h) * scale))
            cv2.rectangle(out, p1, p2, (0, 255, 0), 2)
        return out

    def __call__(self, req):
        op, data = _split_op(req.input, self.default_op)
        if op not in OPERATIONS:
            raise ValueError(f"unknown operation {op!r}; choose one of {', '.join(OPERATIONS)}")
        result = self.process(op, self.decode(data))
        ok, encoded = cv2.imencode(".jpg", result, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        return encoded.tobytes(), "image/jpeg"  # a browser shows the HTTP trigger's answer

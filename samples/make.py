"""Writes the sample files the README's examples use (nothing is downloaded): `square.jpg`, a
960x640 JPEG, and `test.mp4`, a 2-second 320x240 video for the workshop's `client.py --image
test.mp4`. Both come from the video client's synthetic source, so they are the same on every
machine; tests/functions/test_readme.py checks they are current.

    .venv/bin/python samples/make.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "clients"))
from client import synthetic  # noqa: E402


def square_jpg() -> bytes:
    frame = next(synthetic(960, 640, 1))
    return cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()


def write_video(path: Path, frames: int = 30, fps: float = 15.0) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (320, 240))
    for frame in synthetic(320, 240, frames):
        writer.write(frame)
    writer.release()


def main() -> None:
    (HERE / "square.jpg").write_bytes(square_jpg())
    write_video(HERE / "test.mp4")
    print(f"wrote {HERE / 'square.jpg'} and {HERE / 'test.mp4'}")


if __name__ == "__main__":
    main()

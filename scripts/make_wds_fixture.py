#!/usr/bin/env python3
"""Writes tests/fixtures/webdataset/python-tarwriter.tar with Python webdataset's own TarWriter.

The Rust tests read this committed file, so they never need Python. Python's tarfile writes pax headers, which
the long key below needs. Contents (keys in order):
  000000          jpg 8x6, png 8x6, txt "a red square", cls "3"
  dir/000001      jpg 8x6, png 8x6, txt "café ☕" (UTF-8)
  <120 x "k">     jpg 8x6, png 8x6, txt "long key"   (path longer than 100 bytes: pax 'path' record)
  000003          jpg 8x6, txt "no map"              (no png: a bad sample)
Expected: 4 samples read, 3 usable, 1 bad.

    python3 -m venv .tools/venv && .tools/venv/bin/pip install webdataset==1.0.2 pillow
    .tools/venv/bin/python scripts/make_wds_fixture.py
"""

import io
import os

import webdataset as wds
from PIL import Image


def encoded(color, fmt):
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format=fmt)
    return buf.getvalue()


def main():
    out = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "webdataset", "python-tarwriter.tar")
    jpg, png = encoded((200, 30, 30), "JPEG"), encoded((0, 255, 0), "PNG")
    samples = [
        {"__key__": "000000", "jpg": jpg, "png": png, "txt": "a red square".encode(), "cls": b"3"},
        {"__key__": "dir/000001", "jpg": jpg, "png": png, "txt": "café ☕".encode()},
        {"__key__": "k" * 120, "jpg": jpg, "png": png, "txt": b"long key"},
        {"__key__": "000003", "jpg": jpg, "txt": b"no map"},
    ]
    with wds.TarWriter(out, encoder=False) as sink:
        for sample in samples:
            sink.write(sample)
    print(f"wrote {os.path.normpath(out)} ({os.path.getsize(out)} bytes)")


if __name__ == "__main__":
    main()

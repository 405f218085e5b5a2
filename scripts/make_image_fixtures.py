#!/usr/bin/env python3
"""Writes tests/fixtures/images/: small JPEG, PNG and WebP files written by Pillow, whole, cut short and with bytes
after their end, and manifest.json saying for each whether Pillow decodes it (Image.open(...).load() with
ImageFile.LOAD_TRUNCATED_IMAGES left False, as webdataset's decoders use it).

The Rust tests (tests/io_formats/image_fixtures.rs) read the committed files and must accept exactly what Pillow accepts, so
they never need Python.

    python3 -m venv .tools/venv && .tools/venv/bin/pip install pillow
    .tools/venv/bin/python scripts/make_image_fixtures.py
"""

import io
import json
import os

from PIL import Image, ImageFile

assert not ImageFile.LOAD_TRUNCATED_IMAGES


def picture():
    # Detail everywhere, so the entropy-coded data is most of the file and a cut at a third lands inside it.
    img = Image.new("RGB", (96, 64))
    img.putdata([((x * 37 + y * 11) % 256, (x * y * 13) % 256, (x ^ y) * 5 % 256) for y in range(64) for x in range(96)])
    return img


def encoded(fmt, **opts):
    buf = io.BytesIO()
    picture().save(buf, format=fmt, **opts)
    return buf.getvalue()


def pillow_decodes(data):
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - any failure means "refused"
        return False


def png_without_iend(png):
    assert png[-12:-8] == b"\x00\x00\x00\x00" and png[-8:-4] == b"IEND"
    return png[:-12]


def main():
    out = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "images")
    os.makedirs(out, exist_ok=True)
    jpg = encoded("JPEG", quality=90)
    progressive = encoded("JPEG", quality=90, progressive=True)
    png = encoded("PNG")
    webp = encoded("WEBP", lossless=True)
    files = {
        "whole.jpg": jpg,
        "progressive.jpg": progressive,
        "whole.png": png,
        "whole.webp": webp,
        # Cut to a third, as the example; and short of only the end marker / chunk.
        "third.jpg": jpg[: len(jpg) // 3],
        "third-progressive.jpg": progressive[: len(progressive) // 3],
        "no-eoi.jpg": jpg[:-2],
        "third.png": png[: len(png) // 3],
        "no-iend.png": png_without_iend(png),
        "half-iend.png": png[:-6],
        "third.webp": webp[: len(webp) // 3],
        # Bytes after the end are common (padding, appended metadata) and accepted by Pillow.
        "trailing.jpg": jpg + b"\x00" * 16,
        "trailing.png": png + b"extra bytes",
    }
    manifest = {}
    for name, data in files.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
        manifest[name] = pillow_decodes(data)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps(manifest, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()

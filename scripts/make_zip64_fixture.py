#!/usr/bin/env python3
"""tests/fixtures/checkpoint/tiny_zip64.ckpt: tiny.ckpt with ZIP64 records, as torch.save writes files over 4 GB.

Real SD 1.5 checkpoints (v1-5-pruned.ckpt, 4.27 GB) need ZIP64: their offsets and sizes do not fit 32 bits, so the
zip holds ZIP64 extra fields, the ZIP64 end-of-central-directory record and its locator. Writing a 4 GB file for a
test is not reasonable; this script rewrites the small tiny.ckpt entry by entry with Python's zipfile (stored,
uncompressed, as torch.save stores) with zipfile's ZIP64 threshold lowered to 0, so that every record takes the form
it takes in a file over 4 GB: 0xFFFFFFFF placeholders with ZIP64 extra fields in the local and central headers, and
the ZIP64 end-of-central-directory record and locator. It then checks that torch.load reads the result and gives
the same tensors as the original.

Usage: /work/torchenv/bin/python scripts/make_zip64_fixture.py   (torch 2.15.0)
"""

import io
import sys
import zipfile
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "checkpoint"


def main() -> int:
    source = (FIXTURES / "tiny.ckpt").read_bytes()
    out = io.BytesIO()
    zipfile.ZIP64_LIMIT = 0  # every size and offset "exceeds" it: the records a 4 GB file needs
    with zipfile.ZipFile(io.BytesIO(source)) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            entry = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            entry.compress_type = zipfile.ZIP_STORED
            with zin.open(info) as src, zout.open(entry, "w", force_zip64=True) as dst:
                dst.write(src.read())
    zipfile.ZIP64_LIMIT = (1 << 31) - 1
    data = out.getvalue()
    if b"PK\x06\x06" not in data or b"PK\x06\x07" not in data:
        print("no ZIP64 end-of-central-directory record or locator was written", file=sys.stderr)
        return 1
    original = torch.load(io.BytesIO(source), weights_only=True)
    repacked = torch.load(io.BytesIO(data), weights_only=True)
    if original.keys() != repacked.keys() or any(not torch.equal(original[k], repacked[k]) for k in original):
        print("torch.load reads the ZIP64 file differently from the original", file=sys.stderr)
        return 1
    (FIXTURES / "tiny_zip64.ckpt").write_bytes(data)
    print(f"tiny_zip64.ckpt: {len(data)} bytes, {len(original)} entries, read back by torch.load")
    return 0


if __name__ == "__main__":
    sys.exit(main())

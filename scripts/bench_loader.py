#!/usr/bin/env python3
"""Python reference for `zeroconv dataset bench`: the same per-sample work with webdataset + Pillow + numpy.

Per sample: decode the JPEG image and the PNG map, resize the shortest side to RES (bicubic for the image,
nearest for the map; the long side truncated like torchvision's Resize), centre crop RES x RES, convert to
float32 CHW ([-1, 1] image, [0, 1] map). One process, no shuffling, best of --repeats passes after one warm-up.

Setup (kept out of git in .tools/):
    python3 -m venv .tools/venv && .tools/venv/bin/pip install webdataset==1.0.2 pillow numpy
Run after `zeroconv dataset bench` has written the shards:
    .tools/venv/bin/python scripts/bench_loader.py --dir target/bench-loader
"""

import argparse
import glob
import os
import time

import numpy as np
import webdataset as wds
from PIL import Image


def cover_crop(img, res, resample):
    w, h = img.size
    if w <= h:
        nw, nh = res, h * res // w
    else:
        nw, nh = w * res // h, res
    img = img.resize((nw, nh), resample=resample)
    left, top = (nw - res) // 2, (nh - res) // 2
    return img.crop((left, top, left + res, top + res))


def prepare(sample, res):
    image = cover_crop(sample["jpg"].convert("RGB"), res, Image.BICUBIC)
    control = cover_crop(sample["png"].convert("RGB"), res, Image.NEAREST)
    image = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    control = np.asarray(control, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return image, control, sample["txt"]


def one_pass(shards, res):
    dataset = wds.WebDataset(shards, shardshuffle=False).decode("pil")
    count = 0
    start = time.perf_counter()
    for sample in dataset:
        prepare(sample, res)
        count += 1
    return count, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="target/bench-loader", help="folder with bench-*.tar shards")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shards = sorted(glob.glob(os.path.join(args.dir, "bench-*.tar")))
    if not shards:
        raise SystemExit(f"no bench-*.tar shards in {args.dir}; run `zeroconv dataset bench` first")
    one_pass(shards, args.resolution)  # warm-up: page cache, imports
    best = min((one_pass(shards, args.resolution) for _ in range(max(1, args.repeats))), key=lambda r: r[1])
    count, seconds = best
    print(f"python webdataset {wds.__version__ if hasattr(wds, '__version__') else '?'} + Pillow "
          f"{Image.__version__}: {count} samples in {seconds:.3f} s = {count / seconds:.1f} samples/s (1 process)")


if __name__ == "__main__":
    main()

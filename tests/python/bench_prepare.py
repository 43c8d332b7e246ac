"""img2dataset's side of crates/albef-data/benches/prepare.rs: its Resizer on every DIR/*.jpg.

Usage: python bench_prepare.py DIR --image-size N --resize-mode keep_ratio|center_crop --quality Q [--passes P]

Each file is opened and handed to img2dataset.resizer.Resizer (what its downloader calls per
image: OpenCV decode, albumentations SmallestMaxSize with area/Lanczos, CenterCrop, OpenCV JPEG
encode; it pins OpenCV to one thread), in one process. Prints one JSON line with the throughput of
the fastest pass.
"""

import argparse
import json
import time
from pathlib import Path

from img2dataset.resizer import Resizer

parser = argparse.ArgumentParser()
parser.add_argument("dir")
parser.add_argument("--image-size", type=int, required=True)
parser.add_argument("--resize-mode", required=True)
parser.add_argument("--quality", type=int, required=True)
parser.add_argument("--passes", type=int, default=5)
args = parser.parse_args()

files = sorted(Path(args.dir).glob("*.jpg"))
resizer = Resizer(args.image_size, args.resize_mode, resize_only_if_bigger=False, encode_quality=args.quality)


def one_pass():
    start = time.perf_counter()
    for path in files:
        with open(path, "rb") as f:
            img, width, height, _, _, err = resizer(f)
        assert err is None and min(width, height) == args.image_size, (path, err, width, height)
    return time.perf_counter() - start


one_pass()  # warm-up
best = min(one_pass() for _ in range(args.passes))
print(json.dumps({"img_per_s": len(files) / best, "files": len(files), "passes": args.passes}))

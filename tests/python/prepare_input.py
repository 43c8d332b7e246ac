"""Input for `albef data prepare`, written with Pillow, and its output read back with tarfile and Pillow.

  prepare_input.py write DIR   -> DIR/images/*, DIR/train.json (the reference's annotation
                                  layout), DIR/pairs/ (a folder of image + caption pairs)
  prepare_input.py read OUT.json SIZE MODE DIR SHARD.tar...
                               -> OUT.json: per sample key, size, caption, image and how far its
                                  pixels are from Pillow's own resize of the original
"""

import io
import json
import sys
import tarfile

import numpy as np
from PIL import Image


def picture(w, h, seed, mode="RGB"):
    """Smooth colour waves with fine noise (photo-like), so JPEG and resizing behave as on photos."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = [128 + 60 * np.sin(x * (0.03 + 0.01 * c) + seed) * np.cos(y * 0.05 - c) for c in range(3)]
    rgb = np.stack(chans, -1) + rng.normal(0, 1.5, (h, w, 3))
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    return img.convert(mode)


# name, size, mode, format: landscape and portrait to shrink, a small one to enlarge, a square one
# already at size, a greyscale JPEG, an opaque RGBA PNG, a WebP.
IMAGES = [
    ("land.jpg", (300, 200), "RGB", "JPEG"),
    ("port.jpg", (150, 260), "RGB", "JPEG"),
    ("small.jpg", (40, 30), "RGB", "JPEG"),
    ("square.png", (64, 64), "RGB", "PNG"),
    ("grey.jpg", (130, 97), "L", "JPEG"),
    ("alpha.png", (90, 120), "RGBA", "PNG"),
    ("wide.webp", (400, 100), "RGB", "WEBP"),
]


def write(root):
    import os

    os.makedirs(f"{root}/images", exist_ok=True)
    os.makedirs(f"{root}/pairs/sub", exist_ok=True)
    rows = []
    for i, (name, size, mode, fmt) in enumerate(IMAGES):
        picture(*size, seed=i, mode=mode).save(f"{root}/images/{name}", fmt, quality=95)
        rows.append({"image": f"images/{name}", "caption": f"picture number {i}", "image_id": i})
    # A row of two captions (as COCO's), and a JPEG cut inside its tables.
    rows[0]["caption"] = ["a first caption", "a second caption"]
    buf = io.BytesIO()
    picture(120, 80, seed=99).save(buf, "JPEG", quality=90)
    open(f"{root}/images/corrupt.jpg", "wb").write(buf.getvalue()[:150])
    rows.insert(3, {"image": "images/corrupt.jpg", "caption": "a broken picture", "image_id": 99})
    json.dump(rows, open(f"{root}/train.json", "w"))
    # The folder form: two pairs (one in a subfolder), an image without caption, a caption
    # without image, and a macOS leftover.
    picture(100, 70, seed=5).save(f"{root}/pairs/a.jpg", "JPEG", quality=95)
    open(f"{root}/pairs/a.txt", "w").write("a pair in the folder\n")
    picture(70, 100, seed=6).save(f"{root}/pairs/sub/b.png", "PNG")
    open(f"{root}/pairs/sub/b.txt", "w").write("a pair in a subfolder")
    picture(50, 50, seed=7).save(f"{root}/pairs/lonely.jpg", "JPEG")
    open(f"{root}/pairs/orphan.txt", "w").write("no picture")
    open(f"{root}/pairs/.DS_Store", "wb").write(b"\0\0\0\1Bud1")


def expected(original, size, mode, out_size):
    """Pillow's resize of the original as img2dataset's asks: area (BOX) down, Lanczos up."""
    w, h = original.size
    filt = Image.BOX if min(w, h) > size else Image.LANCZOS
    rw, rh = out_size if mode == "keep_ratio" else (max(1, round(w * size / min(w, h))), max(1, round(h * size / min(w, h))))
    if mode == "keep_ratio":
        return original.resize((rw, rh), filt)
    x0, y0 = (rw - size) // 2, (rh - size) // 2
    sx, sy = w / rw, h / rh
    return original.resize((size, size), filt, box=(x0 * sx, y0 * sy, (x0 + size) * sx, (y0 + size) * sy))


def read(out, size, mode, root, shards):
    samples = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(members):
            if not name.endswith(".jpg"):
                continue
            key = name[:-4]
            meta = json.loads(members[f"{key}.json"])
            img = Image.open(io.BytesIO(members[name]))
            assert img.format == "JPEG", img.format
            img = img.convert("RGB")
            original = Image.open(f"{root}/{meta['image']}").convert("RGB")
            ref = expected(original, size, mode, img.size)
            diff = np.abs(np.asarray(img, np.float64) - np.asarray(ref, np.float64)).mean()
            samples[key] = {
                "shard": shard.rsplit("/", 1)[-1],
                "size": list(img.size),
                "original": list(original.size),
                "caption": members[f"{key}.txt"].decode(),
                "image": meta["image"],
                "image_id": meta.get("image_id"),
                "mean_abs_diff": diff,
            }
    json.dump(samples, open(out, "w"), indent=1)


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2])
    else:
        read(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6:])

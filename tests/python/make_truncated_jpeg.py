"""Writes a JPEG cut inside its scan data (a download that stopped) beside a whole one, with
Pillow, and an annotation file naming both:

    make_truncated_jpeg.py OUT_DIR

Prints a JSON object: the cut file's height and the first row from which Pillow, with the
reference's ImageFile.LOAD_TRUNCATED_IMAGES, leaves every row grey (128).
"""
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
noise = (np.random.default_rng(0).random((128, 96, 3)) * 255).astype("uint8")
buf = io.BytesIO()
Image.fromarray(noise).save(buf, format="JPEG", quality=90)
whole = buf.getvalue()
(out / "whole.jpg").write_bytes(whole)
(out / "cut.jpg").write_bytes(whole[: len(whole) // 2])
json.dump(
    [{"image": "cut.jpg", "caption": "a cut picture"}, {"image": "whole.jpg", "caption": "a whole picture"}],
    open(out / "ann.json", "w"),
)

ImageFile.LOAD_TRUNCATED_IMAGES = True
rows = np.asarray(Image.open(out / "cut.jpg").convert("RGB"))
grey = [bool((row == 128).all()) for row in rows]
grey_from = next(i for i in range(len(grey)) if all(grey[i:]))
print(json.dumps({"height": rows.shape[0], "grey_from": grey_from}))

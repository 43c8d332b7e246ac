"""Writes annotation files as users meet them, with Pillow's pictures and os.mkfifo:

    make_reference_annotations.py OUT_DIR

- coco/train2014/*.jpg: the pictures, in the folder the authors' prefix stands for;
- absolute.json: every row names its picture by the authors' absolute path, as the reference
  ALBEF's published coco.json does (/export/share/datasets/vision/coco/images/train2014/...);
- fifo.json: rows of those pictures (relative paths) and one whose image is a named pipe that
  nothing ever writes (opening it for reading would wait forever).

Prints a JSON object: the rows of each file and how many of fifo.json's are good.
"""
import json
import os
import sys
from pathlib import Path

from PIL import Image

out = Path(sys.argv[1])
folder = out / "coco" / "train2014"
folder.mkdir(parents=True, exist_ok=True)
AUTHORS = "/export/share/datasets/vision/coco/images/"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}

names = []
for i, (colour, rgb) in enumerate(COLOURS.items()):
    name = f"COCO_train2014_{i:012d}.jpg"
    Image.new("RGB", (40, 40), rgb).save(folder / name, format="JPEG", quality=90)
    names.append((name, colour))

# Two rows per picture, as COCO has several captions of one image.
absolute = [
    {"image": f"{AUTHORS}train2014/{name}", "caption": f"a {colour} square", "image_id": f"coco_{i}"}
    for i, (name, colour) in enumerate(names)
    for _ in range(2)
]
(out / "absolute.json").write_text(json.dumps(absolute))

os.mkfifo(out / "pipe.jpg")
fifo = [{"image": f"coco/train2014/{name}", "caption": f"a {colour} square"} for name, colour in names]
fifo.insert(1, {"image": "pipe.jpg", "caption": "a pipe"})
(out / "fifo.json").write_text(json.dumps(fifo))

print(json.dumps({"absolute": len(absolute), "fifo": len(fifo), "fifo_good": len(names)}))

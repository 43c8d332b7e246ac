"""Writes a small dataset as a user brings their own (the README's quick start): pictures made with
Pillow, annotation files in the reference ALBEF's format with paths relative to them, and a
vocabulary the small model takes:

    make_own_data.py OUT_DIR

OUT_DIR/train.json: [{"image": "images/train-0.jpg", "caption": "a red circle on the left"}, ...]
OUT_DIR/test.json: [{"image": "images/test-0.png", "caption": [two captions]}, ...] (held out)
OUT_DIR/vocab.txt: [PAD] [UNK] [CLS] [SEP] [MASK], then every caption word.
"""
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

out = Path(sys.argv[1])
(out / "images").mkdir(parents=True, exist_ok=True)
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 210, 20)}
SHAPES = ["circle", "square"]
SIDES = {"left": 0, "right": 1}
PICTURES = [(c, s, side) for c in COLOURS for s in SHAPES for side in SIDES]


def draw(colour, shape, side, size):
    img = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(img)
    x0 = 4 + SIDES[side] * size // 2
    box = [x0, size // 4, x0 + size // 2 - 8, 3 * size // 4]
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[colour])
    return img


train, test = [], []
for i in range(48):
    colour, shape, side = PICTURES[i % len(PICTURES)]
    name = f"images/train-{i}.jpg"
    draw(colour, shape, side, 72 + i % 3 * 8).save(out / name, quality=90)
    train.append({"image": name, "caption": f"a {colour} {shape} on the {side}"})
for i, (colour, shape, side) in enumerate(PICTURES):
    name = f"images/test-{i}.png"
    draw(colour, shape, side, 80).save(out / name)
    test.append({"image": name, "caption": [f"a {colour} {shape} on the {side}", f"the {shape} is {colour}"]})
(out / "train.json").write_text(json.dumps(train))
(out / "test.json").write_text(json.dumps(test))

words = sorted({w for e in train + test for c in ([e["caption"]] if isinstance(e["caption"], str) else e["caption"])
                for w in c.split()})
(out / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")

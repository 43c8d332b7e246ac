"""Pillow reference outputs for the Rust image-op parity test (crates/albef-data/tests/transform.rs).

Usage: python pillow_ops.py DIR

For every DIR/NAME.png (names without "__"), applies each op below with FIXED parameters and
writes DIR/NAME__OP.png. The parameters must match the ones in the Rust test.
"""

import sys
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

FILL = (128, 128, 128)
BILINEAR = Image.Resampling.BILINEAR
BICUBIC = Image.Resampling.BICUBIC


def affine(coeffs):
    return lambda im: im.transform(im.size, Image.Transform.AFFINE, coeffs, BILINEAR, fillcolor=FILL)


OPS = {
    "autocontrast": ImageOps.autocontrast,
    "equalize": ImageOps.equalize,
    "brightness": lambda im: ImageEnhance.Brightness(im).enhance(1.36),
    "sharpness": lambda im: ImageEnhance.Sharpness(im).enhance(1.36),
    "shear_x": affine((1, 0.21, 0, 0, 1, 0)),
    "shear_y": affine((1, 0, 0, -0.21, 1, 0)),
    "translate_x": affine((1, 0, 7, 0, 1, 0)),
    "translate_y": affine((1, 0, 0, 0, 1, -7)),
    "rotate": lambda im: im.rotate(21, BILINEAR, fillcolor=FILL),
    "rotate_neg": lambda im: im.rotate(-21, BILINEAR, fillcolor=FILL),
    "hflip": lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "resize": lambda im: im.resize((32, 32), BICUBIC),
    # torchvision's F.resized_crop on a PIL image is exactly crop() then resize().
    "resized_crop": lambda im: im.crop((5, 7, 5 + 40, 7 + 30)).resize((64, 64), BICUBIC),
}


def main() -> None:
    out = Path(sys.argv[1])
    for path in sorted(out.glob("*.png")):
        if "__" in path.stem:
            continue
        im = Image.open(path).convert("RGB")
        for name, op in OPS.items():
            op(im).convert("RGB").save(out / f"{path.stem}__{name}.png")


if __name__ == "__main__":
    main()

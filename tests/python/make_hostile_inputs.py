"""Writes the hostile inputs of albef-data's peak-RSS tests (tests/hostile.rs), with Pillow,
Python's tarfile and byte edits (not albef's writers):

    make_hostile_inputs.py KIND OUT_DIR

KIND:
  big_image  ann.json naming ok.jpg and big.jpg, a 512 MiB file of zeros written sparsely (a
             seek, no 512 MiB write): over data.max_member_mb by its size alone.
  captions   captions.tar: a sample whose caption is 10 MiB of 'a' (no space), one of 10 MiB of
             CJK characters (no space), and a plain one.
  headers    headers.tar: a plain sample, an image under a GNU long name ('L') of 256 MiB, an
             image under a PAX header ('x') of 256 MiB (a comment record), each followed by its
             caption under a plain name, and a plain sample. The extensions' bodies are written
             sparsely: their first 64 KiB, then a hole.
  pixels     ann.json naming six real 3000x3000 RGB PNGs (27 MB decoded each), a real
             9000x9000 one (243 MB decoded, under max_pixels), and a PNG whose header declares
             10000x10000 (over max_pixels) but holds a few bytes; the large ones are
             compressed rows of zeros, streamed.

Prints nothing.
"""
import io
import json
import struct
import sys
import tarfile
import zlib
from pathlib import Path

from PIL import Image

kind, out = sys.argv[1], Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
MIB = 1 << 20


def jpeg():
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def annotations(images):
    rows = [{"image": name, "caption": f"picture {i}"} for i, name in enumerate(images)]
    (out / "ann.json").write_text(json.dumps(rows))


def big_image():
    (out / "ok.jpg").write_bytes(jpeg())
    with open(out / "big.jpg", "wb") as f:
        f.truncate(512 * MIB)
    annotations(["ok.jpg", "big.jpg"])


def member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def captions():
    with tarfile.open(out / "captions.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for key, caption in [("ascii", "a" * (10 * MIB)), ("cjk", "猫" * (10 * MIB // 3)), ("plain", "a cat")]:
            member(tar, f"{key}.jpg", jpeg())
            member(tar, f"{key}.txt", caption.encode())


def padded(f):
    """Pads the file to the next 512-byte block with a hole."""
    f.seek(-f.tell() % 512, 1)


def raw_member(f, name, data, type=tarfile.REGTYPE):
    """One header (tarfile's) and its data."""
    info = tarfile.TarInfo(name)
    info.size, info.type = len(data), type
    f.write(info.tobuf(tarfile.USTAR_FORMAT))
    f.write(data)
    padded(f)


def huge_extension(f, type, size, body_start, body_end):
    """An extension of `size` bytes: its header (tarfile's), `body_start`, a hole, `body_end`."""
    info = tarfile.TarInfo("././@LongLink" if type == tarfile.GNUTYPE_LONGNAME else "././@PaxHeader")
    info.size, info.type = size, type
    f.write(info.tobuf(tarfile.GNU_FORMAT if type == tarfile.GNUTYPE_LONGNAME else tarfile.USTAR_FORMAT))
    end = f.tell() + size
    f.write(body_start)
    f.seek(end - len(body_end))
    f.write(body_end)
    padded(f)


def headers():
    size = 256 * MIB
    with open(out / "headers.tar", "wb") as f:
        raw_member(f, "a.jpg", jpeg())
        raw_member(f, "a.txt", b"a red square")
        huge_extension(f, tarfile.GNUTYPE_LONGNAME, size, b"n" * (64 << 10), b"\0")
        raw_member(f, "gnu_cut.jpg", jpeg())
        raw_member(f, "gnu.txt", b"a red square")
        record = f"{size} comment=".encode()
        huge_extension(f, tarfile.XHDTYPE, size, record + b"c" * ((64 << 10) - len(record)), b"\n")
        raw_member(f, "pax.jpg", jpeg())
        raw_member(f, "pax.txt", b"a red square")
        raw_member(f, "b.jpg", jpeg())
        raw_member(f, "b.txt", b"a red square")
        f.write(b"\0" * 1024)


def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_of_zeros(path, side):
    """A real RGB PNG of side x side black pixels, its rows compressed as they are streamed."""
    z, row = zlib.compressobj(9), b"\0" * (1 + 3 * side)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def pixels():
    names = [f"big{i}.png" for i in range(6)]
    for name in names:
        png_of_zeros(out / name, 3000)
    png_of_zeros(out / "near.png", 9000)
    # Pillow's 8x8 PNG with its IHDR edited to declare 10000x10000 (its CRC recomputed).
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    png[16:24] = struct.pack(">II", 10000, 10000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    (out / "declared.png").write_bytes(png)
    annotations(names + ["near.png", "declared.png"])


{"big_image": big_image, "captions": captions, "headers": headers, "pixels": pixels}[kind]()

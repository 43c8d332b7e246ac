"""Writes tar shards whose header extensions are huge, with Python's tarfile (not albef's
writer): a GNU long name and a PAX path of NAME_BYTES, and a PAX header carrying a comment of
NAME_BYTES, between samples that must still be read:

    make_long_header_shards.py OUT_DIR NAME_BYTES

gnu.tar (GNU_FORMAT) and pax.tar (PAX_FORMAT). Prints a JSON object: each file -> the keys the
reader must deliver, in order.
"""
import io
import json
import sys
import tarfile
from pathlib import Path

from PIL import Image

out, name_bytes = Path(sys.argv[1]), int(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)


def jpeg():
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def member(tar, name, data, pax=None):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    if pax:
        info.pax_headers = pax
    tar.addfile(info, io.BytesIO(data))


def sample(tar, key, pax=None):
    member(tar, f"{key}.jpg", jpeg(), pax)
    member(tar, f"{key}.txt", b"a red square")


huge = "n" * name_bytes
# A name over 100 bytes that every tar writes with an extension, well under any bound.
long_ok = "deep/" * 40 + "long_ok"
expect = {}

with tarfile.open(out / "gnu.tar", "w", format=tarfile.GNU_FORMAT) as tar:
    sample(tar, "a")
    sample(tar, huge)  # a GNU long name ('L') of NAME_BYTES on each member
    sample(tar, long_ok)
    sample(tar, "b")
expect["gnu.tar"] = ["a", long_ok, "b"]

with tarfile.open(out / "pax.tar", "w", format=tarfile.PAX_FORMAT) as tar:
    sample(tar, "a")
    sample(tar, huge)  # a PAX path record of NAME_BYTES on each member
    sample(tar, long_ok)
    # A PAX header with a comment record of NAME_BYTES on the image only: its caption stays
    # behind as a sample of its own without an image.
    sample(tar, "big_pax", pax={"comment": huge})
    sample(tar, "caf\u00e9")  # a non-ASCII name: a PAX path record
    sample(tar, "b")
expect["pax.tar"] = ["a", long_ok, "caf\u00e9", "b"]

print(json.dumps(expect))

"""Writes the broken shards and annotation files users actually meet, with Python's tarfile,
gzip and Pillow (not albef's writer), plus byte-level edits where no tool writes such a file:

    make_hostile_shards.py OUT_DIR

Prints a JSON object: each file's name -> what the reader must make of it (good and bad keys).
"""
import gzip
import io
import json
import sys
import tarfile
from pathlib import Path

from PIL import Image

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def jpeg(colour):
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), COLOURS[colour]).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def samples(tar, prefix, n):
    keys = []
    for i in range(n):
        colour = list(COLOURS)[i % 3]
        key = f"{prefix}{i:04d}"
        member(tar, f"{key}.jpg", jpeg(colour))
        member(tar, f"{key}.txt", f"a {colour} square".encode())
        keys.append(key)
    return keys


def tar_bytes(build, fmt=tarfile.GNU_FORMAT):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        result = build(tar)
    return buf.getvalue(), result


expect = {}

# A Mac user's shard: AppleDouble forks, .DS_Store and a __MACOSX folder beside the samples.
def mac(tar):
    member(tar, "._mac0000.jpg", b"\x00\x05\x16\x07AppleDouble")
    keys = samples(tar, "mac", 4)
    member(tar, ".DS_Store", b"\x00\x00\x00\x01Bud1")
    member(tar, "__MACOSX/._mac0001.jpg", b"\x00\x05\x16\x07")
    member(tar, "__MACOSX/folder/._x.txt", b"\x00\x05\x16\x07")
    return keys
data, keys = tar_bytes(mac)
(out / "mac.tar").write_bytes(data)
expect["mac.tar"] = {"good": keys, "junk": 4}

# A member whose header declares 2^50 bytes (a corrupt size field; GNU base-256 encoding), while
# the file holds a few kilobytes: the samples before it are good, the stream then ends inside it.
data, keys = tar_bytes(lambda tar: samples(tar, "big", 3))
body = data.rstrip(b"\0")
body += b"\0" * (-len(body) % 512)
huge = tarfile.TarInfo("big0003.jpg")
huge.size = 2**50
body += huge.tobuf(format=tarfile.GNU_FORMAT) + b"\xff" * 3000
(out / "huge-header.tar").write_bytes(body)
expect["huge-header.tar"] = {"good": keys, "oversized": ["big0003"]}

# A corrupt header (one flipped byte in the third sample's .txt header): the first two samples and
# the third's image were read whole before it.
data, keys = tar_bytes(lambda tar: samples(tar, "sum", 4))
with tarfile.open(fileobj=io.BytesIO(data)) as t:
    offsets = {m.name: m.offset for m in t.getmembers()}
broken = bytearray(data)
broken[offsets["sum0002.txt"] + 3] ^= 0x20
(out / "bad-checksum.tar").write_bytes(bytes(broken))
expect["bad-checksum.tar"] = {"good": keys[:2], "missing_caption": ["sum0002"]}

# gzip: .tar.gz, .tgz, and a gzip stream in a file named .tar.
for name, prefix in [("gz.tar.gz", "gza"), ("gz.tgz", "gzb"), ("gz-named.tar", "gzc")]:
    data, keys = tar_bytes(lambda tar: samples(tar, prefix, 3), fmt=tarfile.PAX_FORMAT)
    (out / name).write_bytes(gzip.compress(data))
    expect[name] = {"good": keys}

# Sources with no sample: an HTML error page saved as .tar, a 0-byte .tar, a tar with no
# members, an empty annotation list.
(out / "error-page.tar").write_bytes(b"<html><head><title>403 Forbidden</title></head><body>Forbidden</body></html>\n")
(out / "zero.tar").write_bytes(b"")
(out / "no-members.tar").write_bytes(tar_bytes(lambda tar: None)[0])
(out / "empty.json").write_text("[]")
expect["error-page.tar"] = {"source": "not_a_tar"}
expect["zero.tar"] = {"source": "empty_source"}
expect["no-members.tar"] = {"source": "empty_source"}
expect["empty.json"] = {"source": "empty_source"}

print(json.dumps(expect))

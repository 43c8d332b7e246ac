"""An S3 endpoint that stalls, for crates/albef-data/tests/stalled_reads.rs.

    stalling_s3.py ROOT

Serves the files under ROOT as the objects of any bucket (path style: GET and HEAD of
/<bucket>/<key>, with Range), as object_store's S3 client reads them, and prints its port. Objects
whose name starts with `stall-` answer every GET with their headers and first 4 KiB, then send
nothing more while holding the connection open (an object store or proxy that hangs mid-body);
those starting with `late-` are served whole by their first GET and stall like `stall-` from the
second on (a shard indexed fine whose later read hangs).
"""
import email.utils
import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = sys.argv[1]
GETS = {}
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def target(self):
        parts = self.path.split("?")[0].lstrip("/").split("/", 1)
        path = os.path.join(ROOT, parts[1]) if len(parts) == 2 else None
        return (parts[1], path) if path and os.path.isfile(path) else (None, None)

    def headers_for(self, path, start, end, size):
        self.send_header("Content-Length", str(end - start))
        self.send_header("ETag", '"%x"' % int(os.path.getmtime(path)))
        self.send_header("Last-Modified", email.utils.formatdate(os.path.getmtime(path), usegmt=True))
        self.send_header("Accept-Ranges", "bytes")
        if (start, end) != (0, size):
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end - 1, size))
        self.end_headers()

    def not_found(self):
        body = b"<Error><Code>NoSuchKey</Code></Error>"
        self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    def do_HEAD(self):
        key, path = self.target()
        if key is None:
            return self.not_found()
        size = os.path.getsize(path)
        self.send_response(200)
        self.headers_for(path, 0, size, size)

    def do_GET(self):
        key, path = self.target()
        if key is None:
            return self.not_found()
        with open(path, "rb") as f:
            data = f.read()
        start, end = 0, len(data)
        m = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if m:
            start = int(m.group(1))
            end = int(m.group(2)) + 1 if m.group(2) else len(data)
        with LOCK:
            GETS[key] = GETS.get(key, 0) + 1
            n = GETS[key]
        name = os.path.basename(key)
        stalls = name.startswith("stall-") or (name.startswith("late-") and n > 1)
        self.send_response(206 if (start, end) != (0, len(data)) else 200)
        self.headers_for(path, start, end, len(data))
        if not stalls:
            self.wfile.write(data[start:end])
            return
        self.wfile.write(data[start:min(end, start + 4096)])
        self.wfile.flush()
        time.sleep(3600)


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()

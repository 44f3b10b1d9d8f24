"""A read-only GCS stand-in with per-request latency, for pipeline_margin.py's bucket mode (run as its own process).

python benchmarks/_latency_server.py PORT ROOT LATENCY_FILE
Serves the files under ROOT as the objects of gs://bucket through the JSON API paths TensorStore's gcs driver reads
(GET .../b/bucket/o/OBJECT?alt=media, with the x-goog-generation header; metadata without alt=media; 404 for what
is not there), one thread per request as a bucket serves requests concurrently, every request held for the
milliseconds written in LATENCY_FILE (read per request: one server serves every latency of a run) before it is
answered: what a read from a real bucket waits per request (first byte), here on localhost. The tests' emulator
(gcp-storage-emulator) serves one request at a time and spends ~ms of Python per request, which at the ~100
chunk requests of a zoom2 window made it, not the latency, the bottleneck. Prints "ready" once listening.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.parse
from http import server


def main() -> None:
  port, root, latency_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]

  class Handler(server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: TensorStore reuses connections, as with a real bucket

    def do_GET(self):
      with open(latency_file) as f:
        time.sleep(float(f.read() or 0) / 1e3)
      url = urllib.parse.urlsplit(self.path)
      marker = "/b/bucket/o/"
      if marker not in url.path:
        return self._send(404, b"{}")
      name = urllib.parse.unquote(url.path.split(marker, 1)[1])
      path = os.path.join(root, name)
      if not os.path.isfile(path):
        return self._send(404, b'{"error": {"code": 404}}')
      stat = os.stat(path)
      generation = str(int(stat.st_mtime_ns // 1000))
      if "alt=media" in url.query:
        with open(path, "rb") as f:
          body = f.read()
        return self._send(200, body, {"x-goog-generation": generation, "Content-Type": "application/octet-stream"})
      meta = {"name": name, "bucket": "bucket", "generation": generation, "size": str(stat.st_size)}
      return self._send(200, json.dumps(meta).encode(), {"Content-Type": "application/json"})

    def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
      self.send_response(status)
      for k, v in (headers or {}).items():
        self.send_header(k, v)
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def log_message(self, *args):
      pass

  httpd = server.ThreadingHTTPServer(("localhost", port), Handler)
  httpd.daemon_threads = True
  print("ready", flush=True)
  httpd.serve_forever()


if __name__ == "__main__":
  main()

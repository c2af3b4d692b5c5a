"""Run under opentelemetry-instrument: downstream HTTP calls, a forced GC, cold requests.

No OpenTelemetry code: the requests library is instrumented by contrib's
opentelemetry-instrumentation-requests, and otel-inference turns its client
spans into `downstream` stages.
"""

import gc
import http.server
import threading
import time

import requests

from otel_inference import request, stage


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(0.01)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
url = f"http://127.0.0.1:{server.server_address[1]}/"

for index in range(5):
    with request("embed"):
        with stage("feature_hydration"):
            requests.get(url, timeout=5)
        if index == 4:
            gc.collect()
server.shutdown()
print("done", flush=True)

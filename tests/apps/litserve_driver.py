"""Start the LitServe embedder for real on 127.0.0.1 (one HTTP server, two
instrumented inference workers), send it N texts, print its answers and the
same model's answers computed here without LitServe or instrumentation as JSON,
and stop every process it started.

``python litserve_driver.py PORT N``. Rounds as in ray_serve_driver.py: one text
at a time (bit-identical to the baseline), then N at once (batched by LitServe;
float tolerance).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from examples.frameworks.baseline import embed_one_by_one

TEXTS = [f"request {i}: " + "the quick brown fox " * (1 + i % 5) for i in range(int(sys.argv[2]))]


def post(url: str, text: str) -> list[float]:
    request = urllib.request.Request(
        url,
        data=json.dumps({"text": text}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["embedding"]


def ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
            return response.read().decode().strip('"') == "ok"
    except OSError:
        return False


def main() -> None:
    port = int(sys.argv[1])
    base = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "examples.frameworks.litserve_embedder", "--port", str(port)],
        start_new_session=True,  # its own process group: the workers go with it
    )
    try:
        started = time.monotonic()
        baseline = embed_one_by_one(TEXTS)  # while the workers load
        deadline = started + 180
        while not ready(base):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"LitServe did not become ready (exit code {process.poll()})")
            time.sleep(0.5)
        print(f"ready after {time.monotonic() - started:.1f} s", file=sys.stderr)
        results = {"baseline": baseline}
        url = f"{base}/embed"
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda t: post(url, t), TEXTS[:4]))  # warm-up
            results["sequential"] = [post(url, t) for t in TEXTS]
            results["concurrent"] = list(pool.map(lambda t: post(url, t), TEXTS))
        time.sleep(float(os.environ.get("DRIVER_EXPORT_WAIT_S", "2")))  # exporters' next tick
        print(json.dumps(results), flush=True)
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(process.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()

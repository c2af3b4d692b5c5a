"""``make demo``: the embedding service under ``opentelemetry-instrument``, a load, a report.

    .venv/bin/python -m examples.run_demo            # from the repository root

1. checks that ``redis-server`` exists (``make demo`` installs it first with
   ``scripts/bootstrap.sh`` when run as root; otherwise it says what to install) and
   starts one on a free 127.0.0.1 port;
2. seeds per-user features (about 10% of users will miss);
3. starts ``examples/embedding_service`` under ``opentelemetry-instrument`` with the
   embedded defaults: spans to ``build/demo/spans.jsonl`` (OTLP JSON Lines, through
   ``OTEL_INFERENCE_SPANS_FILE``), metrics on a Prometheus endpoint, budgets set;
4. drives a steady phase and a burst (``examples/embedding_service/loadgen.py``);
5. reads the stage counts from the metrics endpoint, stops the service (which
   flushes its spans), and prints ``otel-inference report`` for the span file;
6. stops every process it started, on success, failure or Ctrl-C.

Everything stays on 127.0.0.1. Options: ``--steady-requests``, ``--rate``,
``--burst-requests``, ``--burst-concurrency``, ``--max-seconds``, ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
LOCALHOST = "127.0.0.1"
BUDGETS = (
    "feature_hydration=5ms,queue_wait=100ms,batch=150ms,tokenize=5ms,model_forward=100ms,"
    "serialize=2ms"
)
STAGE_ORDER = (
    "parse",
    "feature_hydration",
    "queue_wait",
    "batch",
    "tokenize",
    "model_forward",
    "serialize",
)


class DemoError(RuntimeError):
    """A step failed; the message says which and what to do."""


def say(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")


def ensure_redis_server() -> str:
    """The redis-server binary (``make demo`` installs it first when run as root)."""
    found = shutil.which("redis-server")
    if found:
        return found
    raise DemoError(
        "redis-server is not installed. Install it, then run `make demo` again:\n"
        "    sudo apt-get install redis-server      # Debian/Ubuntu (make demo does this as root)\n"
        "    brew install redis                     # macOS"
    )


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside the block raise KeyboardInterrupt at its end."""
    received: list[int] = []
    previous = {
        signum: signal.signal(signum, lambda signum, _frame: received.append(signum))
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            raise KeyboardInterrupt(f"signal {received[0]}")


class Processes:
    """Every process the demo starts; ``stop_all()`` ends them, newest first."""

    def __init__(self) -> None:
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        with signals_deferred():  # a Ctrl-C between the two would leave the process unrecorded
            process = subprocess.Popen(args, start_new_session=True, **kwargs)
            self.started.append((name, process))
        return process

    @staticmethod
    def stop(process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)  # its own session: it and its children
        except ProcessLookupError:
            return
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)

    def stop_all(self) -> None:
        while self.started:
            _name, process = self.started.pop()
            self.stop(process)


def redis_ping(port: int) -> bool:
    with socket.create_connection((LOCALHOST, port), timeout=0.5) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(16).startswith(b"+PONG")


# Loopback only: never through a proxy from the environment.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with _LOCAL.open(url, timeout=timeout) as response:
        return response.read()


def http_ok(url: str) -> bool:
    with _LOCAL.open(url, timeout=1) as response:
        return response.status == 200


def service_env(out: Path, redis_port: int, metrics_port: int) -> dict[str, str]:
    """The embedding service's environment (see :func:`instrumented_env`)."""
    return instrumented_env(
        out,
        metrics_port,
        "embedding-service",
        BUDGETS,
        EMBEDDING_REDIS_URL=f"redis://{LOCALHOST}:{redis_port}/0",
    )


def instrumented_env(
    out: Path, metrics_port: int, service: str, budgets: str, **extra: str
) -> dict[str, str]:
    """The embedded defaults: spans to a local file, metrics on a scrape endpoint."""
    return {
        **os.environ,
        "OTEL_SERVICE_NAME": service,
        "OTEL_TRACES_EXPORTER": "none",  # the span file is the destination
        "OTEL_INFERENCE_SPANS_FILE": str(out / "spans.jsonl"),
        # Every request is traced: a burst makes ~10 spans a request, more than the
        # BatchSpanProcessor's default queue (2048) holds between two exports.
        "OTEL_BSP_MAX_QUEUE_SIZE": "65536",
        "OTEL_BSP_SCHEDULE_DELAY": "1000",
        "OTEL_METRICS_EXPORTER": "prometheus",
        "OTEL_EXPORTER_PROMETHEUS_HOST": LOCALHOST,
        "OTEL_EXPORTER_PROMETHEUS_PORT": str(metrics_port),
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_INFERENCE_BUDGETS": budgets,
        # Warm-up stages outside any request: histograms only, no orphan spans.
        "OTEL_INFERENCE_ROOT_STAGES": "metrics",
        "OTEL_PYTHON_FASTAPI_EXCLUDED_URLS": "healthz",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
        **extra,
    }


_SAMPLE = re.compile(
    r"^inference_stage_duration_seconds_count\{(?P<labels>[^}]*)\} (?P<value>\S+)$"
)


def stage_counts(metrics_text: str) -> dict[str, int]:
    """Requests per top-level stage from the Prometheus exposition (all label sets summed)."""
    counts: dict[str, float] = defaultdict(float)
    for line in metrics_text.splitlines():
        match = _SAMPLE.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        if labels.get("inference_stage_parent"):
            continue
        counts[labels.get("inference_stage", "?")] += float(match["value"])
    return {stage: int(value) for stage, value in counts.items()}


def iter_spans(path: Path) -> Iterator[dict[str, Any]]:
    """Spans of an OTLP JSON Lines file, each with its attributes flattened."""
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if not line.strip():
                continue
            for resource_spans in json.loads(line).get("resourceSpans", []):
                for scope_spans in resource_spans.get("scopeSpans", []):
                    for span in scope_spans.get("spans", []):
                        span["attrs"] = {
                            a["key"]: next(iter(a["value"].values()), None)
                            for a in span.get("attributes", [])
                        }
                        yield span


def stage_table(path: Path) -> str:
    """A plain per-stage table from the span file (used when no report command exists)."""
    durations: dict[tuple[str, str], list[float]] = defaultdict(list)
    for span in iter_spans(path):
        stage = span["attrs"].get("inference.stage")
        if stage is None:
            continue
        parent = span["attrs"].get("inference.stage.parent") or ""
        seconds = (int(span["endTimeUnixNano"]) - int(span["startTimeUnixNano"])) / 1e9
        durations[(stage, parent)].append(seconds)

    def rank(key: tuple[str, str]) -> tuple[int, str]:
        stage = key[1] or key[0]
        return (STAGE_ORDER.index(stage) if stage in STAGE_ORDER else 99, key[1] + key[0])

    rows = [f"{'stage':<36}{'spans':>7}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}"]
    for key in sorted(durations, key=rank):
        values = sorted(durations[key])

        def q(fraction: float, values: list[float] = values) -> str:
            return f"{values[max(0, round(fraction * len(values)) - 1)] * 1000:.2f}"

        name = key[0] if not key[1] else f"  {key[0]} (in {key[1]})"
        rows.append(f"{name:<36}{len(values):>7}{q(0.5):>10}{q(0.95):>10}{q(0.99):>10}")
    return "\n".join(rows)


def report_available() -> bool:
    try:
        return importlib.util.find_spec("otel_inference.cli") is not None
    except ImportError:
        return False


def print_report(spans: Path, cost_per_hour: float) -> int:
    if report_available():
        command = [
            str(VENV_BIN / "otel-inference"),
            "report",
            "--spans",
            str(spans),
            "--cost-per-hour",
            str(cost_per_hour),
        ]
        say("otel-inference " + " ".join(command[1:]))
        # The budgets the service ran with, for the report's status column (the report
        # prefers those the spans carry, inference.budget, where the recorder writes them).
        env = {**os.environ, "OTEL_INFERENCE_BUDGETS": BUDGETS}
        status = subprocess.run(command, check=False, env=env).returncode
        page = spans.parent / "report.html"
        html = subprocess.run(
            [*command, "--format", "html", "--output", str(page)],
            check=False,
            env=env,
            capture_output=True,
            text=True,
        )
        if html.returncode == 0:
            say(f"the same report as a page (p95 over time, the slowest requests): {page}")
        else:
            print(html.stderr, end="", file=sys.stderr)
        return status or html.returncode
    say(
        "`otel-inference report` is not in this checkout yet; "
        "per-stage span durations from the span file instead:"
    )
    print(stage_table(spans), flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    started_at = time.monotonic()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    spans = out / "spans.jsonl"
    spans.unlink(missing_ok=True)  # the exporter appends: one run per file
    processes = Processes()
    try:
        redis_server = ensure_redis_server()
        redis_port = free_port()
        (out / "redis").mkdir(exist_ok=True)
        processes.start(
            "redis-server",
            [
                redis_server,
                "--port",
                str(redis_port),
                "--bind",
                LOCALHOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(out / "redis"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: redis_ping(redis_port), 10, "redis-server")
        say(f"redis-server on {LOCALHOST}:{redis_port}")

        from examples.embedding_service.seed import seed

        written = seed(f"redis://{LOCALHOST}:{redis_port}/0")
        say(f"seeded features for {written} users")

        port, metrics_port = free_port(), free_port()
        log_path = out / "service.log"
        service = start_service(
            processes,
            "examples.embedding_service.app",
            port,
            service_env(out, redis_port, metrics_port),
            log_path,
            args.startup_timeout,
        )
        say(f"service ready on http://{LOCALHOST}:{port} (metrics :{metrics_port}/metrics)")

        load = subprocess.run(
            [
                sys.executable,
                "-m",
                "examples.embedding_service.loadgen",
                "--url",
                f"http://{LOCALHOST}:{port}",
                "--steady-requests",
                str(args.steady_requests),
                "--rate",
                str(args.rate),
                "--burst-requests",
                str(args.burst_requests),
                "--burst-concurrency",
                str(args.burst_concurrency),
                "--max-seconds",
                str(args.max_seconds),
            ],
            cwd=ROOT,
            check=False,
        )
        if load.returncode != 0:
            raise DemoError(f"the load generator failed (exit {load.returncode})")

        counts = stage_counts(http_get(f"http://{LOCALHOST}:{metrics_port}/metrics").decode())
        say(
            "metrics endpoint, requests per stage: "
            + ", ".join(f"{s}={counts[s]}" for s in sorted(counts, key=_stage_rank))
        )

        processes.stop(service)  # SIGTERM: uvicorn shuts down, the SDK flushes the spans
        if not spans.exists() or spans.stat().st_size == 0:
            raise DemoError(f"no spans were written to {spans}; see {log_path}")
        say(f"spans: {spans} ({spans.stat().st_size // 1024} KiB)")
        status = print_report(spans, args.cost_per_hour)
        say(f"demo finished in {time.monotonic() - started_at:.0f} s")
        return status
    finally:
        processes.stop_all()


def start_service(
    processes: Processes,
    module: str,
    port: int,
    env: dict[str, str],
    log_path: Path,
    startup_timeout: float,
) -> subprocess.Popen[bytes]:
    """``python -m module --port port`` under ``opentelemetry-instrument``, output to
    ``log_path``; returns once its ``/healthz`` answers (DemoError if it exits first)."""
    with log_path.open("wb") as log:
        service = processes.start(
            "service",
            [
                str(VENV_BIN / "opentelemetry-instrument"),
                sys.executable,
                "-m",
                module,
                "--port",
                str(port),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    say(f"{module} starting under opentelemetry-instrument (log: {log_path})")

    def ready() -> bool:
        if service.poll() is not None:
            raise DemoError(
                f"the service exited ({service.returncode}):\n{log_path.read_text()[-3000:]}"
            )
        return http_ok(f"http://{LOCALHOST}:{port}/healthz")

    wait_until(ready, startup_timeout, "the service to load the model")
    return service


def _stage_rank(stage: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(stage) if stage in STAGE_ORDER else 99, stage)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the embedding-service demo end to end.")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "demo")
    parser.add_argument("--steady-requests", type=int, default=300)
    parser.add_argument("--rate", type=float, default=15.0)
    parser.add_argument("--burst-requests", type=int, default=160)
    parser.add_argument("--burst-concurrency", type=int, default=64)
    parser.add_argument("--max-seconds", type=float, default=90.0)
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("--cost-per-hour", type=float, default=0.10, help="$ per hour of the host")
    args = parser.parse_args(argv)

    return run_to_the_end(run, args)


def run_to_the_end(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """A demo's exit status: SIGTERM and Ctrl-C stop it as an interruption (its
    ``finally`` blocks stop what it started), a DemoError is one line and exit 1."""

    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    try:
        return run(args)
    except DemoError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo interrupted; stopped its processes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

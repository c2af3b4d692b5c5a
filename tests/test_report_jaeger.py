"""Jaeger input: the same known spans, served as Jaeger's ``/api/traces`` JSON.

No Jaeger binary exists here, so a local ``http.server`` on 127.0.0.1 answers
with the payload Jaeger's query service would give for these spans (its UI
JSON model: ``traceID``/``spanID``, ``references`` with the parent as
``CHILD_OF`` and links as ``FOLLOWS_FROM``, ``startTime``/``duration`` in
microseconds, typed ``tags``, ``processes``; see ``tests/apps/report_spans.py``).
The report must come out exactly as from the span file.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from otel_inference.report import ReportError, build_report, load_jaeger, load_spans_file
from tests.apps.report_spans import GAP, SERVICE, SpanWriter, jaeger_payload
from tests.servers import LOCALHOST, free_port

EXACT = {"rel": 1e-12, "abs": 1e-15}


class FakeJaeger:
    """Answers ``GET /api/traces`` with a fixed payload; remembers the queries."""

    def __init__(self, payload: Any, status: int = 200) -> None:
        self.payload = payload
        self.status = status
        self.queries: list[dict[str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                fake.queries.append(dict(urllib.parse.parse_qsl(url.query)))
                if url.path != "/api/traces":
                    self.send_error(404)
                    return
                body = json.dumps(fake.payload).encode()
                self.send_response(fake.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((LOCALHOST, 0), Handler)
        self.url = f"http://{LOCALHOST}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeJaeger:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def known(tmp_path: Path) -> Iterator[SpanWriter]:
    writer = SpanWriter(tmp_path / "spans.jsonl")
    for wait in [*range(1, 19), 40, 60]:
        writer.request(
            [
                ("queue_wait", wait),
                ("tokenize", 2),
                ("model_forward", 10),
                (GAP, 1),
                ("serialize", 1),
            ]
        )
    writer.batch([30, 10, 5, 1], forward_ms=20, after_ms=1)
    writer.batch([4, 3, 2, 1], forward_ms=20, after_ms=1, size=5)
    for gap in (2, 3):
        writer.request([("tokenize", 2), (GAP, gap), ("serialize", 1)], declare_unattributed=False)
    writer.close()
    yield writer


def test_jaeger_gives_the_same_report_as_the_span_file(known):
    options = {"budgets": {"queue_wait": 0.020}, "cost_per_hour": 3.6}
    from_file = build_report(load_spans_file(known.path), **options)
    with FakeJaeger(jaeger_payload(known.spans())) as jaeger:
        spans = load_jaeger(jaeger.url, service=SERVICE, lookback="2h", limit=50)
        from_jaeger = build_report(spans, **options)
    query = jaeger.queries[0]
    assert (query["service"], query["limit"], query["lookback"]) == (SERVICE, "50", "2h")
    assert int(query["end"]) - int(query["start"]) == 2 * 3600 * 1_000_000  # microseconds

    assert from_jaeger.requests == from_file.requests == 30
    assert [r.label for r in from_jaeger.rows] == [r.label for r in from_file.rows]
    for ours, theirs in zip(from_jaeger.rows, from_file.rows, strict=True):
        for key, value in asdict(theirs).items():
            if isinstance(value, float):
                assert getattr(ours, key) == pytest.approx(value, **EXACT), (ours.label, key)
            else:
                assert getattr(ours, key) == value, (ours.label, key)
    # The known truths, as in test_report (the batch members found through links).
    forward = from_jaeger.row("model_forward")
    assert (forward.count, forward.p99) == (20, 0.010)
    batch = from_jaeger.row("batch")
    assert (batch.count, batch.p99) == (8, 0.020)
    assert batch.cost_per_request == pytest.approx(
        (4 * 20 / 4 + 4 * 20 / 5) / 30 / 1000 * 0.001, **EXACT
    )
    assert from_jaeger.row("queue_wait").status == "over"
    assert from_jaeger.verdict == from_file.verdict


def test_jaeger_errors_are_reported(known):
    port = free_port()  # nothing listens there
    with pytest.raises(ReportError, match=f"cannot reach Jaeger at http://{LOCALHOST}:{port}"):
        load_jaeger(f"http://{LOCALHOST}:{port}", service=SERVICE, timeout=5)
    with FakeJaeger({"data": [], "errors": None}) as jaeger:
        with pytest.raises(ReportError, match="has no traces of service 'report-test'"):
            load_jaeger(jaeger.url, service=SERVICE)
    with FakeJaeger({"error": "boom"}, status=500) as jaeger:
        with pytest.raises(ReportError, match="answered HTTP 500"):
            load_jaeger(jaeger.url, service=SERVICE)
    with FakeJaeger({"status": "success", "data": {"result": []}}) as jaeger:
        with pytest.raises(ReportError, match="not answer with a Jaeger traces payload"):
            load_jaeger(jaeger.url, service=SERVICE)
    with pytest.raises(ReportError, match="needs --service"):
        load_jaeger("http://127.0.0.1:16686", service="")
    with pytest.raises(ReportError, match="--lookback"):
        load_jaeger("http://127.0.0.1:16686", service=SERVICE, lookback="an hour")

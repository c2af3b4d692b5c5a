"""Spans with known durations for the report tests, made with the real SDK.

Requests are laid out in whole microseconds (so Jaeger's microsecond model
loses nothing) and written through ``FileSpanExporter`` (OTLP JSON Lines),
exactly as a service under ``opentelemetry-instrument`` with
``OTEL_INFERENCE_SPANS_FILE`` writes them. :func:`jaeger_payload` turns the same
spans into Jaeger's ``/api/traces`` JSON (see ``otel_inference.report.jaeger``).

Usage::

    spans = SpanWriter(tmp_path / "spans.jsonl")
    spans.request([("queue_wait", 5), ("tokenize", 2), (GAP, 1), ("model_forward", 10)])
    spans.close()
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.json.file import FileSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, Span, SpanKind

GAP = None  # a step of a request that no stage covers
MS = 1_000_000  # ns
T0 = 1_700_000_000_000_000_000  # ns since the epoch: a whole number of microseconds
SERVICE = "report-test"


@dataclass
class Step:
    """One top-level stage of a request: ``(stage, ms)`` or ``(stage, ms, attributes)``,
    optionally with ``nested`` ``(stage, offset ms, ms)`` stages inside it."""

    stage: str | None
    ms: float
    attributes: Mapping[str, Any] = field(default_factory=dict)
    nested: Sequence[tuple[str, float, float]] = ()


def _ns(ms: float) -> int:
    ns = round(ms * MS)
    assert ns % 1000 == 0, f"{ms} ms is not a whole number of microseconds"
    return ns


class SpanWriter:
    """Writes requests to an OTLP JSON Lines file and keeps the spans in memory."""

    def __init__(self, path: Path, service: str = SERVICE) -> None:
        self.path = path
        self.memory = InMemorySpanExporter()
        self.provider = TracerProvider(resource=Resource.create({"service.name": service}))
        self.provider.add_span_processor(SimpleSpanProcessor(FileSpanExporter(path)))
        self.provider.add_span_processor(SimpleSpanProcessor(self.memory))
        self.tracer = self.provider.get_tracer("tests.report")
        self.clock = T0

    def _advance(self, ns: int) -> int:
        start = self.clock
        self.clock += ns + 1000 * MS  # requests 1 s apart: never overlapping
        return start

    def open_request(
        self,
        start: int,
        *,
        name: str = "inference.request",
        kind: SpanKind = SpanKind.SERVER,
        attributes: Mapping[str, Any] | None = None,
    ) -> Span:
        return self.tracer.start_span(
            name, kind=kind, start_time=start, attributes=dict(attributes or {})
        )

    def stage(
        self,
        parent: Span,
        stage: str,
        start: int,
        end: int,
        attributes: Mapping[str, Any] | None = None,
        links: Sequence[Link] = (),
    ) -> Span:
        span = self.tracer.start_span(
            stage,
            context=trace.set_span_in_context(parent),
            start_time=start,
            attributes={"inference.stage": stage, **(attributes or {})},
            links=list(links),
        )
        span.end(end_time=end)
        return span

    def request(
        self,
        steps: Sequence[tuple[Any, ...] | Step],
        *,
        declare_unattributed: bool = True,
        attributes: Mapping[str, Any] | None = None,
        name: str = "inference.request",
        kind: SpanKind = SpanKind.SERVER,
        gc_pauses: Sequence[tuple[float, float]] = (),
    ) -> Span:
        """One request made of ``steps`` in sequence; returns its (ended) span.

        With ``declare_unattributed`` the span carries
        ``inference.unattributed.duration`` (the GAP steps), as ``request()`` does;
        otherwise the report must compute it (a web framework's SERVER span).
        ``gc_pauses``: ``(end ms, duration ms)`` from the request's start, as
        ``gc.pause`` events (the runtime instrumentor stamps them at the pause's end).
        """
        steps = [s if isinstance(s, Step) else Step(*s) for s in steps]
        total = sum(_ns(s.ms) for s in steps)
        start = self._advance(total)
        gaps = sum(_ns(s.ms) for s in steps if s.stage is None)
        attrs = dict(attributes or {})
        if declare_unattributed:
            attrs["inference.unattributed.duration"] = gaps / 1e9
        root = self.open_request(start, name=name, kind=kind, attributes=attrs)
        for end_ms, pause_ms in gc_pauses:
            root.add_event(
                "gc.pause",
                {"inference.gc.pause.duration": pause_ms / 1000, "cpython.gc.generation": 2},
                timestamp=start + _ns(end_ms),
            )
        at = start
        for step in steps:
            end = at + _ns(step.ms)
            if step.stage is not None:
                span = self.stage(root, step.stage, at, end, step.attributes)
                for child, offset, ms in step.nested:
                    child_start = at + _ns(offset)
                    self.stage(
                        span,
                        child,
                        child_start,
                        child_start + _ns(ms),
                        {"inference.stage.parent": step.stage},
                    )
            at = end
        root.end(end_time=at)
        return root

    def batch(
        self,
        queue_ms: Sequence[float],
        forward_ms: float,
        after_ms: float = 0.0,
        *,
        size: int | None = None,
        link_members: bool = True,
        nested: Sequence[tuple[str, float, float, Mapping[str, Any]]] = (),
    ) -> list[Span]:
        """Requests submitted together to one ``batch`` (the batcher's spans): member i
        waits ``queue_ms[i]`` (``queue_wait``, share 1/size, linked to
        the batch), then the ONE batch span (child of member 0, linked to every
        member) runs ``forward_ms`` from the end of the longest wait, with ``nested``
        ``(stage, offset ms, ms, attributes)`` stages inside it (once per batch); each
        member then serializes for ``after_ms``. ``size`` > members: unsampled members."""
        size = size or len(queue_ms)
        start = self._advance(_ns(max(queue_ms) + forward_ms + after_ms))
        # Members arrive at different times so that each one's wait ends when the batch starts.
        batch_start = start + _ns(max(queue_ms))
        members = [self.open_request(batch_start - _ns(q), attributes={}) for q in queue_ms]
        batch_end = batch_start + _ns(forward_ms)
        batch = self.tracer.start_span(
            "batch",
            context=trace.set_span_in_context(members[0]),
            start_time=batch_start,
            attributes={
                "inference.stage": "batch",
                "inference.batch.size": size,
                "inference.batcher.name": "encoder",
            },
            links=[Link(m.get_span_context()) for m in members] if link_members else [],
        )
        for child, offset, ms, attributes in nested:
            child_start = batch_start + _ns(offset)
            self.stage(
                batch,
                child,
                child_start,
                child_start + _ns(ms),
                {"inference.stage.parent": "batch", **attributes},
            )
        batch.end(end_time=batch_end)
        for member, q in zip(members, queue_ms, strict=True):
            self.stage(
                member,
                "queue_wait",
                batch_start - _ns(q),
                batch_start,
                {
                    "inference.batch.size": size,
                    "inference.batch.share": 1 / size,
                    "inference.batcher.name": "encoder",
                },
                links=[Link(batch.get_span_context())],
            )
            if after_ms:
                self.stage(member, "serialize", batch_end, batch_end + _ns(after_ms))
            member.set_attribute("inference.unattributed.duration", 0.0)
            member.end(end_time=batch_end + _ns(after_ms))
        return members

    def plain(self, name: str, ms: float) -> None:
        """A span without any otel-inference attribute."""
        start = self._advance(_ns(ms))
        self.tracer.start_span(name, kind=SpanKind.SERVER, start_time=start).end(
            end_time=start + _ns(ms)
        )

    def close(self) -> Path:
        self.provider.shutdown()
        return self.path

    def spans(self) -> list[ReadableSpan]:
        return list(self.memory.get_finished_spans())


_KIND = {
    SpanKind.SERVER: "server",
    SpanKind.CLIENT: "client",
    SpanKind.INTERNAL: "internal",
    SpanKind.PRODUCER: "producer",
    SpanKind.CONSUMER: "consumer",
}


def _tag(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"key": key, "type": "bool", "value": value}
    if isinstance(value, int):
        return {"key": key, "type": "int64", "value": value}
    if isinstance(value, float):
        return {"key": key, "type": "float64", "value": value}
    return {"key": key, "type": "string", "value": str(value)}


def jaeger_payload(spans: Sequence[ReadableSpan]) -> dict[str, Any]:
    """``spans`` in the JSON shape of Jaeger's ``GET /api/traces`` (its UI model):
    one entry per trace, microsecond ``startTime``/``duration``, the parent as a
    ``CHILD_OF`` reference and links as ``FOLLOWS_FROM`` references (how Jaeger
    translates OTLP), the kind as the ``span.kind`` tag, one process per trace."""
    traces: dict[str, list[dict[str, Any]]] = {}
    services: dict[str, str] = {}
    for span in spans:
        ctx = span.get_span_context()
        trace_id = f"{ctx.trace_id:032x}"
        references = []
        if span.parent is not None:
            references.append(
                {
                    "refType": "CHILD_OF",
                    "traceID": trace_id,
                    "spanID": f"{span.parent.span_id:016x}",
                }
            )
        for link in span.links:
            references.append(
                {
                    "refType": "FOLLOWS_FROM",
                    "traceID": f"{link.context.trace_id:032x}",
                    "spanID": f"{link.context.span_id:016x}",
                }
            )
        tags = [_tag(k, v) for k, v in (span.attributes or {}).items()]
        tags.append(_tag("span.kind", _KIND[span.kind]))
        tags.append(_tag("otel.scope.name", span.instrumentation_scope.name))
        assert span.start_time % 1000 == 0 and span.end_time % 1000 == 0
        traces.setdefault(trace_id, []).append(
            {
                "traceID": trace_id,
                "spanID": f"{ctx.span_id:016x}",
                "flags": 1,
                "operationName": span.name,
                "references": references,
                "startTime": span.start_time // 1000,
                "duration": (span.end_time - span.start_time) // 1000,
                "tags": tags,
                "logs": [
                    {
                        "timestamp": event.timestamp // 1000,
                        "fields": [
                            _tag("event", event.name),
                            *(_tag(k, v) for k, v in (event.attributes or {}).items()),
                        ],
                    }
                    for event in span.events
                ],
                "processID": "p1",
                "warnings": None,
            }
        )
        services[trace_id] = str(span.resource.attributes.get("service.name"))
    return {
        "data": [
            {
                "traceID": trace_id,
                "spans": trace_spans,
                "processes": {
                    "p1": {
                        "serviceName": services[trace_id],
                        "tags": [_tag("telemetry.sdk.language", "python")],
                    }
                },
                "warnings": None,
            }
            for trace_id, trace_spans in traces.items()
        ],
        "total": 0,
        "limit": 0,
        "offset": 0,
        "errors": None,
    }

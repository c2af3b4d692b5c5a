"""Read spans from the Jaeger query HTTP API (``GET /api/traces``).

The payload is Jaeger's JSON model, as its UI receives it: ``{"data": [trace]}``,
each trace ``{"traceID", "spans", "processes"}``, each span ``{"traceID",
"spanID", "operationName", "references", "startTime" (us), "duration" (us),
"tags", "processID"}``. As Jaeger translates OTLP, the parent is a ``CHILD_OF``
reference, span links are ``FOLLOWS_FROM`` references, the span kind is the
``span.kind`` tag and the service is the process's ``serviceName``. Times have
microsecond resolution.

Usage::

    from otel_inference.report.jaeger import load_jaeger

    spans = load_jaeger("http://127.0.0.1:16686", service="embedding-service", lookback="1h")
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from typing import Any

from otel_inference.report._http import base_url, get_json
from otel_inference.report._model import ReportError, SpanEvent, SpanRecord

_LOOKBACK = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DEFAULT_LOOKBACK = "1h"
DEFAULT_LIMIT = 1000


def parse_lookback(text: str) -> float:
    """``"1h"`` -> 3600.0 seconds (units s, m, h, d)."""
    match = _LOOKBACK.match(text)
    if not match or float(match[1]) <= 0:
        raise ReportError(f"--lookback {text!r} must be a positive number with s, m, h or d (1h)")
    return float(match[1]) * _UNIT_SECONDS[match[2]]


def _tag_value(tag: Mapping[str, Any]) -> Any:
    value, kind = tag.get("value"), tag.get("type")
    if kind == "int64":
        return int(value)
    if kind == "float64":
        return float(value)
    if kind == "bool":
        return value if isinstance(value, bool) else str(value).lower() == "true"
    return value


def _id(raw: Any) -> str:
    if not isinstance(raw, str) or not raw:
        raise ValueError("a span without traceID/spanID")
    return raw.lower()


def spans_of_trace(trace: Mapping[str, Any]) -> Iterator[SpanRecord]:
    """Spans of one trace of Jaeger's JSON model."""
    processes = trace.get("processes") or {}
    for span in trace.get("spans") or ():
        tags = {tag["key"]: _tag_value(tag) for tag in span.get("tags") or ()}
        kind = str(tags.pop("span.kind", "unspecified")).lower()
        parent: str | None = None
        links: list[tuple[str, str]] = []
        for ref in span.get("references") or ():
            target = (_id(ref.get("traceID")), _id(ref.get("spanID")))
            if ref.get("refType") == "CHILD_OF" and parent is None:
                parent = target[1]
            else:
                links.append(target)
        process = span.get("process") or processes.get(span.get("processID"), {})
        start_ns = int(span["startTime"]) * 1000
        yield SpanRecord(
            trace_id=_id(span.get("traceID")),
            span_id=_id(span.get("spanID")),
            parent_id=parent,
            name=str(span.get("operationName", "")),
            kind=kind,
            start_ns=start_ns,
            end_ns=start_ns + int(span["duration"]) * 1000,
            attributes=tags,
            links=tuple(links),
            service=process.get("serviceName"),
            events=tuple(_events(span.get("logs") or ())),
        )


def _events(logs: Any) -> Iterator[SpanEvent]:
    """Jaeger logs as span events: OTLP events are stored with their name as the
    ``event`` field, microsecond timestamps."""
    for log in logs:
        fields = {field["key"]: _tag_value(field) for field in log.get("fields") or ()}
        name = fields.pop("event", "")
        yield SpanEvent(name=str(name), time_ns=int(log["timestamp"]) * 1000, attributes=fields)


def parse_jaeger(payload: Any, *, where: str = "Jaeger") -> list[SpanRecord]:
    """Spans of a ``/api/traces`` answer; :class:`ReportError` if it is not one."""
    if not isinstance(payload, Mapping) or "data" not in payload:
        raise ReportError(f"{where} did not answer with a Jaeger traces payload")
    data = payload["data"]
    if data is not None and not isinstance(data, list):
        raise ReportError(f"{where} did not answer with a Jaeger traces payload")
    if payload.get("errors"):
        raise ReportError(f"{where} answered with errors: {str(payload['errors'])[:300]}")
    spans: list[SpanRecord] = []
    try:
        for trace in data or ():
            spans.extend(spans_of_trace(trace))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ReportError(f"{where} sent a malformed trace ({type(exc).__name__}: {exc})") from None
    return spans


def load_jaeger(
    url: str,
    *,
    service: str,
    lookback: str = DEFAULT_LOOKBACK,
    limit: int = DEFAULT_LIMIT,
    timeout: float = 30.0,
) -> list[SpanRecord]:
    """Traces of ``service`` from the last ``lookback``, at most ``limit`` of them."""
    if not service:
        raise ReportError("--jaeger needs --service NAME (the service whose traces to read)")
    if limit < 1:
        raise ReportError(f"--limit must be at least 1; got {limit}")
    seconds = parse_lookback(lookback)
    root = base_url(url, what="Jaeger")
    end_us = int(time.time() * 1_000_000)
    params = {
        "service": service,
        "limit": str(limit),
        "lookback": lookback.strip(),
        "start": str(end_us - int(seconds * 1_000_000)),
        "end": str(end_us),
    }
    payload = get_json(f"{root}/api/traces", params, what="Jaeger", timeout=timeout)
    spans = parse_jaeger(payload, where=f"Jaeger at {root}")
    if not spans:
        raise ReportError(
            f"Jaeger at {root} has no traces of service {service!r} in the last {lookback.strip()}"
        )
    return spans

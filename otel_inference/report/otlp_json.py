"""Read spans from an OTLP JSON Lines file.

The format is what ``FileSpanExporter`` of ``opentelemetry-exporter-otlp-json-file``
writes (and the Collector's ``file`` exporter): one ``ExportTraceServiceRequest``
JSON object per line, ``resourceSpans`` -> ``scopeSpans`` -> ``spans``, hex ids,
nanosecond timestamps as strings, ``kind`` as the OTLP enum number. snake_case
keys and ``SPAN_KIND_*`` names are accepted too. The service under
``opentelemetry-instrument`` writes this file when ``OTEL_INFERENCE_SPANS_FILE``
names it.

Usage::

    from otel_inference.report.otlp_json import load_spans_file

    spans = load_spans_file("build/demo/spans.jsonl")
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from otel_inference.report._model import ReportError, SpanEvent, SpanRecord

_KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


def _get(mapping: Mapping[str, Any], camel: str, snake: str) -> Any:
    value = mapping.get(camel)
    return mapping.get(snake) if value is None else value


def any_value(value: Any) -> Any:
    """The Python value of an OTLP ``AnyValue`` (``{"intValue": "3"}`` -> 3)."""
    if not isinstance(value, Mapping) or not value:
        return None
    (key, inner), *_ = value.items()
    if key in ("stringValue", "string_value", "boolValue", "bool_value", "bytesValue"):
        return inner
    if key in ("intValue", "int_value"):
        return int(inner)
    if key in ("doubleValue", "double_value"):
        return float(inner)
    if key in ("arrayValue", "array_value"):
        return [any_value(item) for item in (inner or {}).get("values", [])]
    if key in ("kvlistValue", "kvlist_value"):
        return attributes_of((inner or {}).get("values", []))
    return inner


def attributes_of(items: Any) -> dict[str, Any]:
    """OTLP ``[{"key": k, "value": AnyValue}]`` as a dict."""
    return {item["key"]: any_value(item.get("value")) for item in items or ()}


def _kind(raw: Any) -> str:
    if isinstance(raw, int):
        return _KINDS.get(raw, "unspecified")
    if isinstance(raw, str):
        return raw.lower().removeprefix("span_kind_")
    return "unspecified"


def _id(raw: Any) -> str | None:
    return raw.lower() if isinstance(raw, str) and raw.strip("0") else None


def spans_of_request(document: Mapping[str, Any]) -> Iterator[SpanRecord]:
    """Spans of one ``ExportTraceServiceRequest`` object."""
    for resource_spans in _get(document, "resourceSpans", "resource_spans") or ():
        resource = attributes_of((resource_spans.get("resource") or {}).get("attributes"))
        service = resource.get("service.name")
        scopes = _get(resource_spans, "scopeSpans", "scope_spans") or resource_spans.get(
            "instrumentationLibrarySpans", ()
        )
        for scope_spans in scopes:
            for span in scope_spans.get("spans") or ():
                trace_id, span_id = (
                    _id(_get(span, "traceId", "trace_id")),
                    _id(_get(span, "spanId", "span_id")),
                )
                if trace_id is None or span_id is None:
                    raise ValueError("a span without traceId/spanId")
                links = tuple(
                    (_id(_get(link, "traceId", "trace_id")), _id(_get(link, "spanId", "span_id")))
                    for link in span.get("links") or ()
                )
                yield SpanRecord(
                    trace_id=trace_id,
                    span_id=span_id,
                    parent_id=_id(_get(span, "parentSpanId", "parent_span_id")),
                    name=str(span.get("name", "")),
                    kind=_kind(span.get("kind")),
                    start_ns=int(_get(span, "startTimeUnixNano", "start_time_unix_nano")),
                    end_ns=int(_get(span, "endTimeUnixNano", "end_time_unix_nano")),
                    attributes=attributes_of(span.get("attributes")),
                    links=tuple(link for link in links if None not in link),  # type: ignore[misc]
                    service=service if isinstance(service, str) else None,
                    events=tuple(
                        SpanEvent(
                            name=str(event.get("name", "")),
                            time_ns=int(_get(event, "timeUnixNano", "time_unix_nano") or 0),
                            attributes=attributes_of(event.get("attributes")),
                        )
                        for event in span.get("events") or ()
                    ),
                )


def load_spans_file(path: str | os.PathLike[str]) -> list[SpanRecord]:
    """Every span of an OTLP JSON Lines file.

    Raises :class:`ReportError` for a missing, unreadable or empty file and for
    a malformed line (naming its number). A last line without its newline that
    does not parse is skipped: the exporter may still be writing it.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"span file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ReportError(f"span file {str(path)!r} is a directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"cannot read span file {str(path)!r}: {exc}") from None
    if not text.strip():
        raise ReportError(f"span file {str(path)!r} is empty: no spans were written to it")
    lines = text.split("\n")
    spans: list[SpanRecord] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            document = json.loads(line)
            if not isinstance(document, Mapping):
                raise ValueError("not a JSON object")
            spans.extend(spans_of_request(document))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            if number == len(lines) and not text.endswith("\n"):
                continue  # a partial last line, still being written
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            raise ReportError(
                f"span file {str(path)!r} line {number} is not an OTLP JSON trace export "
                f"({type(exc).__name__}: {reason})"
            ) from None
    if not spans:
        raise ReportError(f"span file {str(path)!r} holds no spans")
    return spans

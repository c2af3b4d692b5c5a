"""In-memory OpenTelemetry pipelines for tests, and readers of what they captured."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Sampler


@dataclass
class Telemetry:
    """A tracer provider and a meter provider that keep everything in memory."""

    sampler: Sampler = ALWAYS_ON
    span_exporter: InMemorySpanExporter = field(default_factory=InMemorySpanExporter)
    metric_reader: InMemoryMetricReader = field(default_factory=InMemoryMetricReader)

    def __post_init__(self) -> None:
        self.tracer_provider = TracerProvider(sampler=self.sampler)
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.span_exporter))
        self.meter_provider = MeterProvider(metric_readers=[self.metric_reader])

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        spans = list(self.span_exporter.get_finished_spans())
        return spans if name is None else [s for s in spans if s.name == name]

    def metric_points(self, name: str) -> list[Any]:
        """Data points of metric ``name`` (all scopes), latest collection."""
        data = self.metric_reader.get_metrics_data()
        points: list[Any] = []
        if data is None:
            return points
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if metric.name == name:
                        points.extend(metric.data.data_points)
        return points

    def stage_points(self) -> dict[str, Any]:
        """``inference.stage.duration`` points keyed by stage name (top level and nested)."""
        result = {}
        for point in self.metric_points("inference.stage.duration"):
            attributes = dict(point.attributes)
            key = attributes["inference.stage"]
            if "inference.stage.parent" in attributes:
                key = f"{attributes['inference.stage.parent']}/{key}"
            if "error.type" in attributes:
                key = f"{key}!{attributes['error.type']}"
            result[key] = point
        return result

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


__all__ = ["ALWAYS_OFF", "ALWAYS_ON", "Telemetry"]

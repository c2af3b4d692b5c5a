"""A real OTLP/gRPC receiver for tests, built from opentelemetry-proto + grpcio.

It accepts what an OTLP exporter sends (traces, metrics, logs) on 127.0.0.1 and
keeps the decoded protobuf requests, so tests assert on what crossed the wire.
"""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.servers import LOCALHOST, free_port


def attributes_of(key_values) -> dict[str, Any]:
    """Decode repeated KeyValue into a dict of plain Python values."""
    result = {}
    for key_value in key_values:
        value = key_value.value
        kind = value.WhichOneof("value")
        result[key_value.key] = getattr(value, kind) if kind else None
    return result


class OtlpReceiver:
    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://{LOCALHOST}:{self.port}"
        self.trace_requests: list[Any] = []
        self.metric_requests: list[Any] = []
        self.log_requests: list[Any] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        receiver = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                with receiver._lock:
                    receiver.trace_requests.append(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request, context):
                with receiver._lock:
                    receiver.metric_requests.append(request)
                return metrics_service_pb2.ExportMetricsServiceResponse()

        class Logs(logs_service_pb2_grpc.LogsServiceServicer):
            def Export(self, request, context):
                with receiver._lock:
                    receiver.log_requests.append(request)
                return logs_service_pb2.ExportLogsServiceResponse()

        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self._server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self._server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), self._server)
        self._server.add_insecure_port(f"{LOCALHOST}:{self.port}")

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=1).wait()

    def spans(self) -> list[Any]:
        with self._lock:
            requests = list(self.trace_requests)
        return [
            span
            for request in requests
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    def metrics(self, name: str) -> list[Any]:
        """Every exported instance of metric ``name``, oldest first."""
        with self._lock:
            requests = list(self.metric_requests)
        return [
            metric
            for request in requests
            for resource_metrics in request.resource_metrics
            for scope_metrics in resource_metrics.scope_metrics
            for metric in scope_metrics.metrics
            if metric.name == name
        ]

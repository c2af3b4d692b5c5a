"""Component types of the pinned otelcol-contrib version, as the validator knows them.

Types, deprecated aliases and signals come from each component's ``metadata.yaml``
(``type``, ``deprecated_type``, ``status.stability``) at the pinned version: core
components read from opentelemetry-collector v0.159.0, contrib ones from their rename
notes (v0.144-v0.154 moved many to snake_case, keeping the old name as a deprecated
alias). This is the subset a Python inference deployment uses, not the whole
distribution (~250 components; the full list of modules is in the release's
``distributions/otelcol-contrib/manifest.yaml``): a type missing here is reported as
unknown. Add it here, with its signals, when you use one.
"""

from __future__ import annotations

from dataclasses import dataclass

OTELCOL_CONTRIB_VERSION = "0.159.0"
IMAGE = f"otel/opentelemetry-collector-contrib:{OTELCOL_CONTRIB_VERSION}"

TRACES, METRICS, LOGS = "traces", "metrics", "logs"
ALL = frozenset({TRACES, METRICS, LOGS})
SIGNALS = ALL  # profiles pipelines sit behind a feature gate: not accepted here

KINDS = ("receivers", "processors", "exporters", "connectors", "extensions")


@dataclass(frozen=True)
class Component:
    signals: frozenset[str] = frozenset()  # receivers, processors, exporters
    # connectors: the (exporter-side signal, receiver-side signal) pairs they support
    pairs: frozenset[tuple[str, str]] = frozenset()
    alias_of: str | None = None  # set on a deprecated alias: the current type


def _same_signal() -> frozenset[tuple[str, str]]:
    return frozenset((s, s) for s in ALL)


def _to_metrics(*signals: str) -> frozenset[tuple[str, str]]:
    return frozenset((s, METRICS) for s in signals)


def _with_aliases(table: dict[str, Component], aliases: dict[str, str]) -> dict[str, Component]:
    for old, new in aliases.items():
        current = table[new]
        table[old] = Component(current.signals, current.pairs, alias_of=new)
    return table


KNOWN: dict[str, dict[str, Component]] = {
    "receivers": _with_aliases(
        {
            "otlp": Component(ALL),
            "nop": Component(ALL),
            "prometheus": Component(frozenset({METRICS})),
            "host_metrics": Component(frozenset({METRICS})),
            "jaeger": Component(frozenset({TRACES})),
            "zipkin": Component(frozenset({TRACES})),
            "kafka": Component(ALL),
            "file_log": Component(frozenset({LOGS})),
        },
        {"hostmetrics": "host_metrics", "filelog": "file_log"},
    ),
    "processors": _with_aliases(
        {
            "batch": Component(ALL),
            "memory_limiter": Component(ALL),
            "resource_detection": Component(ALL),
            "tail_sampling": Component(frozenset({TRACES})),
            "probabilistic_sampler": Component(frozenset({TRACES, LOGS})),
            "attributes": Component(ALL),
            "resource": Component(ALL),
            "transform": Component(ALL),
            "filter": Component(ALL),
            "k8s_attributes": Component(ALL),
        },
        {"resourcedetection": "resource_detection", "k8sattributes": "k8s_attributes"},
    ),
    "exporters": _with_aliases(
        {
            "otlp_grpc": Component(ALL),
            "otlp_http": Component(ALL),
            "debug": Component(ALL),
            "nop": Component(ALL),
            "file": Component(ALL),
            "kafka": Component(ALL),
            "prometheus": Component(frozenset({METRICS})),
            "prometheus_remote_write": Component(frozenset({METRICS})),
            "load_balancing": Component(ALL),
        },
        {
            "otlp": "otlp_grpc",  # renamed in v0.144.0
            "otlphttp": "otlp_http",  # renamed in v0.144.0
            "loadbalancing": "load_balancing",  # renamed in v0.153.0
            "prometheusremotewrite": "prometheus_remote_write",  # renamed in v0.154.0
        },
    ),
    "connectors": _with_aliases(
        {
            "forward": Component(pairs=_same_signal()),
            "routing": Component(pairs=_same_signal()),
            "count": Component(pairs=_to_metrics(TRACES, METRICS, LOGS)),
            "span_metrics": Component(pairs=_to_metrics(TRACES)),
            "service_graph": Component(pairs=_to_metrics(TRACES)),
        },
        {"spanmetrics": "span_metrics", "servicegraph": "service_graph"},
    ),
    "extensions": {
        "health_check": Component(),
        "pprof": Component(),
        "zpages": Component(),
        "file_storage": Component(),
        "memory_limiter": Component(),
    },
}

# tail_sampling policy types (and the block each one's settings go in).
TAIL_SAMPLING_POLICIES = frozenset(
    {
        "always_sample",
        "latency",
        "numeric_attribute",
        "probabilistic",
        "status_code",
        "string_attribute",
        "rate_limiting",
        "bytes_limiting",
        "span_count",
        "trace_state",
        "trace_flags",
        "boolean_attribute",
        "ottl_condition",
        "and",
        "composite",
        "not",
        "drop",
    }
)
# Policy types without a settings block of their own name.
TAIL_SAMPLING_NO_BLOCK = frozenset({"always_sample", "trace_flags"})

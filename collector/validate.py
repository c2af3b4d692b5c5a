"""Check an OpenTelemetry Collector config the way otelcol-contrib does at startup,
without the binary.

    python -m collector.validate collector/agent.yaml collector/gateway.yaml

Mirrors the collector's own rules (``otelcol/config.go``, ``service/pipelines``,
``service/internal/graph`` of v0.159.0):

* the five component sections and ``service`` only; component IDs ``type[/name]``;
* every type known for its kind (``collector.components``); a deprecated alias is
  an error too (the collector only warns, but our configs use the current names);
* a connector ID is not also an exporter or receiver ID;
* ``service.extensions`` reference configured extensions;
* at least one pipeline; pipeline IDs ``traces|metrics|logs[/name]``; each pipeline
  has receivers and exporters, references only configured components (a connector
  counts as receiver or exporter), and no processor twice;
* each component supports its pipeline's signal;
* a connector used as an exporter is used as a receiver in a pipeline of a signal it
  can feed, and the other way round; no cycle through connectors;
* settings the collector rejects for the components we use: the otlp receiver needs
  a protocol, memory_limiter a check interval and a limit, exporters an endpoint,
  load_balancing one resolver and no per-backend endpoint, tail_sampling known
  policy types with their settings block.

It does not load component settings in general (an unknown key, a bad duration, a
port already in use all pass here), expand ``${env:...}``, or reach any endpoint:
``otelcol-contrib validate --config FILE`` does that, where the binary is available.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from collector.components import (
    KINDS,
    KNOWN,
    OTELCOL_CONTRIB_VERSION,
    SIGNALS,
    TAIL_SAMPLING_NO_BLOCK,
    TAIL_SAMPLING_POLICIES,
    TRACES,
)

TYPE_RE = re.compile(r"^[a-zA-Z][0-9a-zA-Z_]{0,62}$")
NAME_RE = re.compile(r"^[^\s\x00-\x1f]+$")
SINGULAR = {k: k[:-1] for k in KINDS}


@dataclass(frozen=True)
class Problem:
    where: str  # the config path, as the collector prints it: service::pipelines::traces
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def _split_id(component_id: str) -> tuple[str, str | None]:
    kind, _, name = str(component_id).partition("/")
    return kind, (name if "/" in str(component_id) else None)


def _check_id(where: str, component_id: Any) -> Iterator[Problem]:
    if not isinstance(component_id, str):
        yield Problem(where, f"component ID {component_id!r} is not a string")
        return
    type_, name = _split_id(component_id)
    if not TYPE_RE.match(type_):
        yield Problem(where, f"in {component_id!r} id: invalid type {type_!r}")
    if name is not None and not NAME_RE.match(name):
        yield Problem(where, f"in {component_id!r} id: invalid or empty name")


def _type(component_id: str) -> str:
    return _split_id(component_id)[0]


class _Config:
    def __init__(self, raw: dict[str, Any]) -> None:
        self.sections: dict[str, dict[str, Any]] = {
            kind: raw[kind] if isinstance(raw.get(kind), dict) else {} for kind in KINDS
        }
        service = raw.get("service") or {}
        self.service = service if isinstance(service, dict) else {}
        pipelines = self.service.get("pipelines") or {}
        self.pipelines: dict[str, dict[str, list[Any]]] = (
            {str(pid): (p or {}) for pid, p in pipelines.items()}
            if isinstance(pipelines, dict)
            else {}
        )

    def has(self, kind: str, component_id: str) -> bool:
        return component_id in self.sections.get(kind, {})

    def settings(self, kind: str, component_id: str) -> dict[str, Any]:
        value = self.sections.get(kind, {}).get(component_id)
        return value if isinstance(value, dict) else {}


def _structure(raw: dict[str, Any]) -> Iterator[Problem]:
    for key in raw:
        if key not in (*KINDS, "service"):
            yield Problem(str(key), "unknown top-level key")
    for kind in KINDS:
        if raw.get(kind) is not None and not isinstance(raw[kind], dict):
            yield Problem(kind, "must be a mapping of component IDs to settings")
    if not isinstance(raw.get("service"), dict):
        yield Problem("service", "missing: a config needs a service with pipelines")


def _components(cfg: _Config) -> Iterator[Problem]:
    for kind, section in cfg.sections.items():
        for component_id in section:
            where = f"{kind}::{component_id}"
            problems = list(_check_id(where, component_id))
            yield from problems
            if problems:
                continue
            known = KNOWN[kind].get(_type(component_id))
            if known is None:
                yield Problem(
                    where,
                    f"unknown type {_type(component_id)!r} for {kind} (not a known "
                    f"{SINGULAR[kind]} of otelcol-contrib v{OTELCOL_CONTRIB_VERSION}; "
                    "see collector/components.py)",
                )
            elif known.alias_of:
                yield Problem(
                    where,
                    f"{_type(component_id)!r} is a deprecated alias in "
                    f"v{OTELCOL_CONTRIB_VERSION}: use {known.alias_of!r}",
                )
    for connector_id in cfg.sections["connectors"]:
        for other in ("exporters", "receivers"):
            if cfg.has(other, connector_id):
                yield Problem(
                    f"connectors::{connector_id}",
                    f"ambiguous ID: found both {connector_id!r} {SINGULAR[other]} and "
                    f"{connector_id!r} connector",
                )


def _extensions(cfg: _Config) -> Iterator[Problem]:
    for ref in cfg.service.get("extensions") or []:
        if not cfg.has("extensions", ref):
            yield Problem(
                "service::extensions", f"references extension {ref!r} which is not configured"
            )


def _refs(pipeline: dict[str, Any], field: str) -> list[str]:
    value = pipeline.get(field) or []
    return [str(v) for v in value] if isinstance(value, list) else []


def _pipelines(cfg: _Config) -> Iterator[Problem]:
    if not cfg.pipelines:
        yield Problem("service::pipelines", "service must have at least one pipeline")
    for pipeline_id, pipeline in cfg.pipelines.items():
        where = f"service::pipelines::{pipeline_id}"
        signal, name = _split_id(pipeline_id)
        if signal not in SIGNALS:
            yield Problem(where, f"unknown signal {signal!r} (traces, metrics or logs)")
            continue
        if name is not None and not NAME_RE.match(name):
            yield Problem(where, "invalid or empty pipeline name")
        if not _refs(pipeline, "receivers"):
            yield Problem(where, "must have at least one receiver")
        if not _refs(pipeline, "exporters"):
            yield Problem(where, "must have at least one exporter")
        processors = _refs(pipeline, "processors")
        for ref in {p for p in processors if processors.count(p) > 1}:
            yield Problem(where, f"references processor {ref!r} multiple times")
        for field, kinds in (
            ("receivers", ("receivers", "connectors")),
            ("processors", ("processors",)),
            ("exporters", ("exporters", "connectors")),
        ):
            for ref in _refs(pipeline, field):
                kind = next((k for k in kinds if cfg.has(k, ref)), None)
                if kind is None:
                    yield Problem(
                        where, f"references {SINGULAR[field]} {ref!r} which is not configured"
                    )
                elif kind != "connectors":
                    known = KNOWN[kind].get(_type(ref))
                    if known is not None and signal not in known.signals:
                        yield Problem(where, f"{SINGULAR[kind]} {ref!r} does not support {signal}")


def _connectors(cfg: _Config) -> Iterator[Problem]:
    as_exporter: dict[str, list[str]] = {}
    as_receiver: dict[str, list[str]] = {}
    for pipeline_id, pipeline in cfg.pipelines.items():
        for ref in _refs(pipeline, "exporters"):
            if cfg.has("connectors", ref):
                as_exporter.setdefault(ref, []).append(pipeline_id)
        for ref in _refs(pipeline, "receivers"):
            if cfg.has("connectors", ref):
                as_receiver.setdefault(ref, []).append(pipeline_id)
    edges: dict[str, set[str]] = {}
    for connector_id in set(as_exporter) | set(as_receiver):
        known = KNOWN["connectors"].get(_type(connector_id))
        pairs = known.pairs if known else frozenset()
        exp_signals = {_type(p) for p in as_exporter.get(connector_id, [])}
        rec_signals = {_type(p) for p in as_receiver.get(connector_id, [])}
        where = f"connectors::{connector_id}"
        for signal in sorted(exp_signals):
            if known and not any((signal, r) in pairs for r in rec_signals):
                yield Problem(
                    where,
                    f"used as exporter in {signal} pipeline but not used in any supported "
                    "receiver pipeline",
                )
        for signal in sorted(rec_signals):
            if known and not any((e, signal) in pairs for e in exp_signals):
                yield Problem(
                    where,
                    f"used as receiver in {signal} pipeline but not used in any supported "
                    "exporter pipeline",
                )
        for source in as_exporter.get(connector_id, []):
            for target in as_receiver.get(connector_id, []):
                if (_type(source), _type(target)) in pairs:
                    edges.setdefault(source, set()).add(target)
    yield from _cycles(edges)


def _cycles(edges: dict[str, set[str]]) -> Iterator[Problem]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, node])):
                return found
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node, [])):
            yield Problem("service::pipelines", "cycle detected: " + " -> ".join(cycle))
            return


def _used(cfg: _Config) -> set[str]:
    used: set[str] = set()
    for pipeline in cfg.pipelines.values():
        for field in ("receivers", "processors", "exporters"):
            used.update(_refs(pipeline, field))
    return used


def _settings(cfg: _Config) -> Iterator[Problem]:
    """The settings the collector rejects, for the components our configs use."""
    pipelines_of: dict[str, set[str]] = {}
    for pipeline_id, pipeline in cfg.pipelines.items():
        for ref in _refs(pipeline, "exporters"):
            pipelines_of.setdefault(ref, set()).add(_type(pipeline_id))
    for kind, section in cfg.sections.items():
        for component_id in section:
            type_, where = _type(component_id), f"{kind}::{component_id}"
            settings = cfg.settings(kind, component_id)
            check = _CHECKS.get((kind, type_))
            if check:
                for message in check(settings, pipelines_of.get(component_id, set())):
                    yield Problem(where, message)


def _otlp_receiver(settings: dict[str, Any], _: set[str]) -> Iterable[str]:
    protocols = settings.get("protocols") or {}
    if not ({"grpc", "http"} & set(protocols)):
        yield "must specify at least one protocol when using the OTLP receiver"


def _memory_limiter(settings: dict[str, Any], _: set[str]) -> Iterable[str]:
    if not settings.get("check_interval"):
        yield "'check_interval' must be greater than zero"
    if not (settings.get("limit_mib") or settings.get("limit_percentage")):
        yield "'limit_mib' or 'limit_percentage' must be set"


def _endpoint(settings: dict[str, Any], _: set[str]) -> Iterable[str]:
    if not settings.get("endpoint"):
        yield "requires a non-empty 'endpoint'"


def _load_balancing(settings: dict[str, Any], signals: set[str]) -> Iterable[str]:
    resolvers = {"static", "dns", "k8s", "aws_cloud_map"} & set(settings.get("resolver") or {})
    if len(resolvers) != 1:
        yield "exactly one resolver (static, dns, k8s or aws_cloud_map) must be specified"
    otlp = (settings.get("protocol") or {}).get("otlp") or {}
    if "endpoint" in otlp:
        yield "protocol::otlp::endpoint must not be set: each resolved backend replaces it"
    routing_key = settings.get("routing_key", "traceID")
    if TRACES in signals and routing_key not in ("traceID", "service", "attributes"):
        yield f"unsupported routing_key for traces: {routing_key}"


def _tail_sampling(settings: dict[str, Any], _: set[str]) -> Iterable[str]:
    policies = settings.get("policies") or []
    if not policies:
        yield "at least one policy is required"
    for index, policy in enumerate(policies):
        kind = (policy or {}).get("type")
        if kind not in TAIL_SAMPLING_POLICIES:
            yield f"policies[{index}]: unknown policy type {kind!r}"
        elif kind not in TAIL_SAMPLING_NO_BLOCK and not policy.get(kind):
            yield f"policies[{index}] ({policy.get('name')}): missing its {kind!r} settings"


_CHECKS = {
    ("receivers", "otlp"): _otlp_receiver,
    ("processors", "memory_limiter"): _memory_limiter,
    ("processors", "tail_sampling"): _tail_sampling,
    ("exporters", "otlp_grpc"): _endpoint,
    ("exporters", "prometheus"): _endpoint,
    ("exporters", "load_balancing"): _load_balancing,
}


def validate(raw: Any) -> list[Problem]:
    """Every problem the collector would refuse to start with (empty: valid)."""
    if not isinstance(raw, dict) or not raw:
        return [Problem("config", "empty configuration file")]
    cfg = _Config(raw)
    return [
        *_structure(raw),
        *_components(cfg),
        *_extensions(cfg),
        *_pipelines(cfg),
        *_connectors(cfg),
        *_settings(cfg),
    ]


def unused(raw: dict[str, Any]) -> list[str]:
    """Configured components no pipeline uses (the collector ignores them silently)."""
    cfg = _Config(raw)
    used = _used(cfg)
    return [
        f"{kind}::{cid}"
        for kind in ("receivers", "processors", "exporters", "connectors")
        for cid in cfg.sections[kind]
        if cid not in used
    ]


def validate_file(path: Path) -> list[Problem]:
    return validate(yaml.safe_load(Path(path).read_text()))


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    failed = False
    for path in paths:
        problems = validate_file(path)
        for problem in problems:
            print(f"{path}: {problem}", file=sys.stderr)
        for component in unused(yaml.safe_load(path.read_text()) or {}):
            print(f"{path}: warning: {component} is configured but not used", file=sys.stderr)
        failed = failed or bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

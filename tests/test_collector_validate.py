"""The collector configs pass the validator, and the validator catches each kind of
mistake the collector refuses to start with (one mutation of a valid config each)."""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from collector.components import KNOWN
from collector.validate import main, unused, validate, validate_file

COLLECTOR = Path(__file__).resolve().parent.parent / "collector"
CONFIGS = sorted(COLLECTOR.glob("*.yaml"))
CONFIG_NAMES = ["agent.yaml", "agent-gateway.yaml", "gateway.yaml"]


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((COLLECTOR / name).read_text())


def test_all_configs_are_covered():
    assert [p.name for p in CONFIGS] == sorted(CONFIG_NAMES)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_shipped_configs_are_valid_and_use_everything(name):
    assert validate_file(COLLECTOR / name) == []
    assert unused(load(name)) == []


def test_cli_exit_status(tmp_path, capsys):
    assert main([str(COLLECTOR / n) for n in CONFIG_NAMES]) == 0
    broken = load("agent.yaml")
    broken["service"]["pipelines"]["traces"]["exporters"] = ["otlp_grpc/tempo"]
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    assert main([str(path)]) == 1
    assert (
        "references exporter 'otlp_grpc/tempo' which is not configured" in capsys.readouterr().err
    )


def test_agents_and_gateway_pipelines():
    """The shapes the docs promise: memory_limiter first; traces to Jaeger or to the
    gateways; tail sampling keeps errors, budget breaches, slow traces and a sample."""
    for name in CONFIG_NAMES:
        for pipeline in load(name)["service"]["pipelines"].values():
            assert pipeline["processors"][0] == "memory_limiter"
    agent = load("agent.yaml")
    assert agent["service"]["pipelines"]["traces"]["exporters"] == ["otlp_grpc/jaeger"]
    assert agent["exporters"]["prometheus"]["enable_open_metrics"] is True
    lb = load("agent-gateway.yaml")
    assert lb["exporters"]["load_balancing"]["routing_key"] == "traceID"
    policies = {
        p["type"]: p for p in load("gateway.yaml")["processors"]["tail_sampling"]["policies"]
    }
    assert policies["status_code"]["status_code"]["status_codes"] == ["ERROR"]
    assert policies["boolean_attribute"]["boolean_attribute"] == {
        "key": "inference.budget.exceeded",
        "value": True,
    }
    assert {"latency", "probabilistic"} <= set(policies)


def test_aliases_point_at_known_types():
    for kind, table in KNOWN.items():
        for type_, component in table.items():
            assert component.alias_of is None or component.alias_of in table, (kind, type_)


def _pipeline(cfg, pid="traces"):
    return cfg["service"]["pipelines"][pid]


def _span_metrics(cfg):
    cfg["connectors"] = {"span_metrics": {}}
    _pipeline(cfg)["exporters"].append("span_metrics")
    cfg["service"]["pipelines"]["metrics/spans"] = {
        "receivers": ["span_metrics"],
        "exporters": ["prometheus"],
    }


def test_connector_used_both_ways_is_valid():
    cfg = load("agent.yaml")
    _span_metrics(cfg)
    assert validate(cfg) == []


Mutation = Callable[[dict[str, Any]], None]


def _set(path: list[str], value: Any) -> Mutation:
    def mutate(cfg):
        node = cfg
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def _delete(path: list[str]) -> Mutation:
    def mutate(cfg):
        node = cfg
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return mutate


def _connector_only_as_exporter(cfg):
    cfg["connectors"] = {"span_metrics": {}}
    _pipeline(cfg)["exporters"].append("span_metrics")


def _connector_only_as_receiver(cfg):
    cfg["connectors"] = {"forward": {}}
    _pipeline(cfg)["receivers"].append("forward")


def _connector_wrong_signals(cfg):
    # span_metrics turns traces into metrics: a metrics -> metrics use is not supported.
    cfg["connectors"] = {"span_metrics": {}}
    _pipeline(cfg, "metrics")["exporters"].append("span_metrics")
    cfg["service"]["pipelines"]["metrics/spans"] = {
        "receivers": ["span_metrics"],
        "exporters": ["prometheus"],
    }


def _connector_cycle(cfg):
    cfg["connectors"] = {"forward/a": {}, "forward/b": {}}
    pipelines = cfg["service"]["pipelines"]
    pipelines["traces/a"] = {"receivers": ["forward/b"], "exporters": ["forward/a"]}
    pipelines["traces/b"] = {"receivers": ["forward/a"], "exporters": ["forward/b"]}


def _ambiguous_connector(cfg):
    _span_metrics(cfg)
    cfg["exporters"]["span_metrics"] = {}


MISTAKES: dict[str, tuple[Mutation, str]] = {
    "no receivers": (
        _set(["service", "pipelines", "traces", "receivers"], []),
        "service::pipelines::traces: must have at least one receiver",
    ),
    "no exporters": (
        _delete(["service", "pipelines", "metrics", "exporters"]),
        "service::pipelines::metrics: must have at least one exporter",
    ),
    "undefined receiver": (
        _set(["service", "pipelines", "traces", "receivers"], ["otlp", "jaeger"]),
        "references receiver 'jaeger' which is not configured",
    ),
    "undefined processor": (
        _set(["service", "pipelines", "traces", "processors"], ["memory_limiter", "batch/big"]),
        "references processor 'batch/big' which is not configured",
    ),
    "undefined exporter": (
        _set(["service", "pipelines", "metrics", "exporters"], ["prometheus", "debug"]),
        "references exporter 'debug' which is not configured",
    ),
    "undefined extension": (
        _set(["service", "extensions"], ["health_check", "pprof"]),
        "service::extensions: references extension 'pprof' which is not configured",
    ),
    "duplicate processor": (
        _set(
            ["service", "pipelines", "traces", "processors"], ["memory_limiter", "batch", "batch"]
        ),
        "references processor 'batch' multiple times",
    ),
    "unknown type": (
        _set(["processors", "memory_limitter"], {}),
        "processors::memory_limitter: unknown type 'memory_limitter' for processors",
    ),
    "deprecated alias": (
        _set(["exporters", "otlp/jaeger"], {"endpoint": "jaeger:4317"}),
        "exporters::otlp/jaeger: 'otlp' is a deprecated alias in v0.159.0: use 'otlp_grpc'",
    ),
    "invalid id": (
        _set(["exporters", "debug/"], {}),
        "exporters::debug/: in 'debug/' id: invalid or empty name",
    ),
    "connector only as exporter": (
        _connector_only_as_exporter,
        "connectors::span_metrics: used as exporter in traces pipeline but not used in any "
        "supported receiver pipeline",
    ),
    "connector only as receiver": (
        _connector_only_as_receiver,
        "connectors::forward: used as receiver in traces pipeline but not used in any "
        "supported exporter pipeline",
    ),
    "connector wrong signals": (
        _connector_wrong_signals,
        "connectors::span_metrics: used as exporter in metrics pipeline",
    ),
    "connector cycle": (_connector_cycle, "cycle detected: traces/a -> traces/b -> traces/a"),
    "ambiguous connector id": (
        _ambiguous_connector,
        "connectors::span_metrics: ambiguous ID: found both 'span_metrics' exporter",
    ),
    "signal not supported": (
        _set(["service", "pipelines", "traces", "exporters"], ["prometheus"]),
        "exporter 'prometheus' does not support traces",
    ),
    "no pipelines": (
        _set(["service", "pipelines"], {}),
        "service must have at least one pipeline",
    ),
    "unknown signal": (
        lambda cfg: cfg["service"]["pipelines"].update(spans=_pipeline(cfg)),
        "unknown signal 'spans'",
    ),
    "unknown top-level key": (_set(["pipelines"], {}), "pipelines: unknown top-level key"),
    "otlp receiver without protocols": (
        _set(["receivers", "otlp"], {}),
        "must specify at least one protocol",
    ),
    "memory_limiter without check_interval": (
        _delete(["processors", "memory_limiter", "check_interval"]),
        "'check_interval' must be greater than zero",
    ),
    "prometheus exporter without endpoint": (
        _delete(["exporters", "prometheus", "endpoint"]),
        "exporters::prometheus: requires a non-empty 'endpoint'",
    ),
}

LB_MISTAKES: dict[str, tuple[Mutation, str]] = {
    "two resolvers": (
        _set(["exporters", "load_balancing", "resolver", "static"], {"hostnames": ["g:4317"]}),
        "exactly one resolver",
    ),
    "backend endpoint set": (
        _set(["exporters", "load_balancing", "protocol", "otlp", "endpoint"], "g:4317"),
        "protocol::otlp::endpoint must not be set",
    ),
    "metric routing key for traces": (
        _set(["exporters", "load_balancing", "routing_key"], "metric"),
        "unsupported routing_key for traces: metric",
    ),
}

GATEWAY_MISTAKES: dict[str, tuple[Mutation, str]] = {
    "unknown policy type": (
        lambda cfg: cfg["processors"]["tail_sampling"]["policies"][0].update(type="errors"),
        "policies[0]: unknown policy type 'errors'",
    ),
    "policy without its settings": (
        lambda cfg: cfg["processors"]["tail_sampling"]["policies"][1].pop("boolean_attribute"),
        "policies[1] (budget-breaches): missing its 'boolean_attribute' settings",
    ),
    "tail_sampling in a metrics pipeline": (
        lambda cfg: cfg["service"]["pipelines"].update(
            metrics={
                "receivers": ["otlp"],
                "processors": ["tail_sampling"],
                "exporters": ["otlp_grpc/jaeger"],
            }
        ),
        "processor 'tail_sampling' does not support metrics",
    ),
}


@pytest.mark.parametrize(
    ("name", "mistake"),
    [("agent.yaml", m) for m in MISTAKES.items()]
    + [("agent-gateway.yaml", m) for m in LB_MISTAKES.items()]
    + [("gateway.yaml", m) for m in GATEWAY_MISTAKES.items()],
    ids=lambda v: v[0] if isinstance(v, tuple) else v,
)
def test_validator_catches(name, mistake):
    _label, (mutate, expected) = mistake
    cfg = copy.deepcopy(load(name))
    assert validate(cfg) == []
    mutate(cfg)
    problems = [str(p) for p in validate(cfg)]
    assert any(expected in p for p in problems), problems


def test_empty_config():
    assert [str(p) for p in validate({})] == ["config: empty configuration file"]
    assert [str(p) for p in validate(None)] == ["config: empty configuration file"]


def test_unused_components_are_reported():
    cfg = load("agent.yaml")
    cfg["exporters"]["debug"] = {}
    assert unused(cfg) == ["exporters::debug"]


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_otelcol_contrib_validate(name):
    """The collector's own check, where the binary is installed (never in CI here)."""
    binary = shutil.which("otelcol-contrib")
    if binary is None:
        pytest.skip("otelcol-contrib is not installed (validated by collector.validate only)")
    result = subprocess.run(
        [binary, "validate", f"--config={COLLECTOR / name}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr

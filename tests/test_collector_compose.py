"""examples/compose.yaml cannot run here (no Docker): check that its ports, paths and
names agree with the configs it mounts, so the first `docker compose up` works."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from collector.components import IMAGE
from collector.validate import validate_file
from dashboards import generate

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "examples" / "compose.yaml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services(compose) -> dict[str, Any]:
    return compose["services"]


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> host path (resolved against the compose file's folder)."""
    result = {}
    for volume in service.get("volumes", []):
        host, container, *_ = volume.split(":")
        result[container] = (COMPOSE_FILE.parent / host).resolve()
    return result


def published(service: dict[str, Any]) -> set[int]:
    return {int(str(p).split(":")[-1]) for p in service.get("ports", [])}


def host_port(endpoint: str) -> tuple[str, int]:
    endpoint = endpoint.split("://")[-1]
    if endpoint.startswith("${env:"):  # ${env:VAR:-host:port}
        endpoint = endpoint.split(":-", 1)[1].rstrip("}")
    host, port = endpoint.rsplit(":", 1)
    return host, int(port)


def collector_config(compose) -> tuple[dict[str, Any], Path]:
    collector = services(compose)["collector"]
    (flag,) = [c for c in collector["command"] if c.startswith("--config=")]
    path = mounts(collector)[flag.removeprefix("--config=")]
    return yaml.safe_load(path.read_text()), path


def test_every_mounted_path_exists(compose):
    for name, service in services(compose).items():
        for container, host in mounts(service).items():
            assert host.exists(), f"{name}: {host} (mounted at {container}) does not exist"


def test_depends_on_names_services(compose):
    for name, service in services(compose).items():
        assert set(service.get("depends_on", [])) <= set(services(compose)), name


def test_collector_is_the_pinned_version_and_its_config_is_valid(compose):
    collector = services(compose)["collector"]
    assert collector["image"] == IMAGE
    _, path = collector_config(compose)
    assert path == ROOT / "collector" / "agent.yaml"
    assert validate_file(path) == []


def test_collector_ports_match_its_config(compose):
    config, _ = collector_config(compose)
    ports = {
        host_port(config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])[1],
        host_port(config["receivers"]["otlp"]["protocols"]["http"]["endpoint"])[1],
        host_port(config["exporters"]["prometheus"]["endpoint"])[1],
        host_port(config["extensions"]["health_check"]["endpoint"])[1],
    }
    assert published(services(compose)["collector"]) == ports


def test_app_sends_to_the_collector_grpc_receiver(compose):
    config, _ = collector_config(compose)
    env = services(compose)["app"]["environment"]
    host, port = host_port(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert host == "collector"
    assert port == host_port(config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])[1]
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    assert mounts(services(compose)["app"])["/src/examples/quickstart.py"].exists()


def test_collector_sends_traces_to_jaeger(compose):
    config, _ = collector_config(compose)
    exporter = config["exporters"]["otlp_grpc/jaeger"]
    env = services(compose)["collector"]["environment"]
    # The config's default and the compose override both name the jaeger service.
    assert host_port(exporter["endpoint"]) == ("jaeger", 4317)
    assert host_port(env["JAEGER_OTLP_ENDPOINT"]) == ("jaeger", 4317)
    assert services(compose)["jaeger"]["image"].startswith("jaegertracing/jaeger:2.")


def test_prometheus_scrapes_the_collector_and_loads_the_rules(compose):
    prometheus = services(compose)["prometheus"]
    flags = dict(f.removeprefix("--").split("=", 1) for f in prometheus["command"])
    paths = mounts(prometheus)
    config = yaml.safe_load(paths[flags["config.file"]].read_text())
    (rule_file,) = config["rule_files"]
    assert paths[rule_file] == generate.PROMETHEUS_RULES
    # Exemplars: the collector serves OpenMetrics, Prometheus stores exemplars.
    collector_cfg, _ = collector_config(compose)
    assert collector_cfg["exporters"]["prometheus"]["enable_open_metrics"] is True
    assert flags["enable-feature"] == "exemplar-storage"
    (job,) = config["scrape_configs"]
    assert job["honor_labels"] is True  # keep job = service.name from the exporter
    (targets,) = job["static_configs"]
    port = host_port(collector_cfg["exporters"]["prometheus"]["endpoint"])[1]
    assert targets["targets"] == [f"collector:{port}"]
    assert 9090 in published(prometheus)


def test_grafana_provisioning_and_datasource_urls(compose):
    grafana = services(compose)["grafana"]
    paths = mounts(grafana)
    assert paths["/etc/grafana/provisioning"] == generate.GRAFANA / "provisioning"
    assert paths[generate.GRAFANA_DASHBOARDS_DIR] == generate.DASHBOARD_JSON.parent
    datasources = yaml.safe_load(generate.DATASOURCES.read_text())["datasources"]
    urls = {d["type"]: host_port(d["url"]) for d in datasources}
    assert urls["prometheus"] == ("prometheus", 9090)
    assert urls["jaeger"] == ("jaeger", 16686)
    assert 9090 in published(services(compose)["prometheus"])
    assert 16686 in published(services(compose)["jaeger"])

"""Shared fixtures: in-memory telemetry, and real redis-server / prometheus on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

from otel_inference import get_recorder
from otel_inference.runtime import COLD_START
from tests.servers import PrometheusServer, RedisServer
from tests.telemetry import Telemetry


def _telemetry(sampler, budgets=None) -> Iterator[Telemetry]:
    telemetry = Telemetry(sampler=sampler)
    COLD_START.reset(0)  # tests start warm; cold-start tests reset it themselves
    get_recorder().configure(telemetry.tracer_provider, telemetry.meter_provider, budgets or {})
    try:
        yield telemetry
    finally:
        get_recorder().configure(budgets={})
        telemetry.shutdown()


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    """Every span sampled; the default recorder bound to in-memory providers."""
    yield from _telemetry(ALWAYS_ON)


@pytest.fixture
def unsampled_telemetry() -> Iterator[Telemetry]:
    """No span sampled (the cheap path); metrics still recorded."""
    yield from _telemetry(ALWAYS_OFF)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    """A real redis-server for the whole session."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_server_factory(tmp_path) -> Iterator[type]:
    """Start private redis-servers (e.g. to kill one mid-test); all stopped at the end."""
    started: list[RedisServer] = []

    def start() -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(started)}")
        server.workdir.mkdir()
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def prometheus_server(tmp_path_factory) -> Iterator[PrometheusServer]:
    """A real prometheus (1 s scrapes); point it at an app with ``set_targets``."""
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus")).start()
    yield server
    server.stop()


@pytest.fixture
def otlp_receiver():
    """A real OTLP/gRPC receiver on 127.0.0.1 (``.endpoint``); decoded requests kept."""
    from tests.otlp_receiver import OtlpReceiver  # grpc import only when used

    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()

"""RedisCluster (sync and asyncio) against a real one-node redis-server cluster."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio.cluster
import redis.cluster

from otel_inference.instrumentation.redis import RedisFeatureInstrumentor
from tests.servers import LOCALHOST, free_port, require_binary, wait_until

STAGE = "feature_hydration"


@pytest.fixture(scope="module")
def cluster_node(tmp_path_factory) -> Iterator[tuple[str, int]]:
    """One redis-server in cluster mode owning all 16384 slots."""
    workdir: Path = tmp_path_factory.mktemp("redis-cluster")
    port = free_port()
    # The cluster bus defaults to port + 10000, past 65535 for high free ports.
    bus_port = free_port()
    process = subprocess.Popen(
        [
            require_binary("redis-server"),
            "--port", str(port), "--bind", LOCALHOST, "--save", "", "--appendonly", "no",
            "--dir", str(workdir), "--protected-mode", "no",
            "--cluster-enabled", "yes", "--cluster-config-file", str(workdir / "nodes.conf"),
            "--cluster-port", str(bus_port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        admin = redis.Redis(host=LOCALHOST, port=port)
        wait_until(admin.ping, 10, "cluster node")
        admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        wait_until(lambda: admin.cluster("info")["cluster_state"] == "ok", 10, "cluster_state:ok")
        admin.close()
        yield LOCALHOST, port
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def instrumented(telemetry) -> Iterator[None]:
    RedisFeatureInstrumentor().instrument()
    yield
    RedisFeatureInstrumentor().uninstrument()


def _counts(span) -> tuple[int, int]:
    return span.attributes["inference.cache.hits"], span.attributes["inference.cache.misses"]


def test_cluster_reads_and_pipeline(telemetry, instrumented, cluster_node):
    host, port = cluster_node
    client = redis.cluster.RedisCluster(host=host, port=port)
    ns = uuid.uuid4().hex[:8]
    client.set(f"{{{ns}}}:a", "1")
    assert client.get(f"{{{ns}}}:a") == b"1"
    assert client.mget([f"{{{ns}}}:a", f"{{{ns}}}:b"]) == [b"1", None]  # same slot (hash tag)
    assert client.mget_nonatomic([f"{ns}:x", f"{{{ns}}}:a", f"{ns}:y"]) == [None, b"1", None]
    assert client.exists(f"{{{ns}}}:a", f"{ns}:zz") == 1  # split across slots
    pipe = client.pipeline()
    pipe.get(f"{{{ns}}}:a").set(f"{ns}:w", "2").hgetall(f"{ns}:h")
    assert pipe.execute() == [b"1", True, {}]
    client.close()

    spans = telemetry.spans(STAGE)
    assert [s.attributes["db.operation.name"] for s in spans] == [
        "GET",
        "MGET",
        "MGET",
        "EXISTS",
        "BATCH",
    ]
    assert [_counts(s) for s in spans] == [(1, 0), (1, 1), (1, 2), (1, 1), (1, 1)]
    assert spans[-1].attributes["db.operation.batch.size"] == 3
    assert telemetry.stage_points()[STAGE].count == 5  # no nested stage from redis-py internals


def test_asyncio_cluster(telemetry, instrumented, cluster_node):
    host, port = cluster_node
    ns = uuid.uuid4().hex[:8]

    async def main() -> list:
        client = redis.asyncio.cluster.RedisCluster(host=host, port=port)
        try:
            await client.set(f"{ns}:a", "1")
            return [await client.get(f"{ns}:a"), await client.get(f"{ns}:b")]
        finally:
            await client.aclose()

    assert asyncio.run(main()) == [b"1", None]
    assert [_counts(s) for s in telemetry.spans(STAGE)] == [(1, 0), (0, 1)]

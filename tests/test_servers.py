"""The real-server fixtures other tests rely on: they start, answer, stop and restart."""

from __future__ import annotations

import socket

import pytest


def test_redis_server_fixture_stop_and_restart(redis_server_factory):
    server = redis_server_factory()
    assert server.ping()
    server.stop()
    with pytest.raises(OSError):
        socket.create_connection((server.host, server.port), timeout=0.5).close()
    server.start()  # same port, e.g. for "redis restarted mid-run" tests
    assert server.ping()


def test_prometheus_fixture_answers_queries(prometheus_server):
    result = prometheus_server.query("vector(42)")
    assert float(result[0]["value"][1]) == 42.0
    assert prometheus_server.api("status/buildinfo")["version"]

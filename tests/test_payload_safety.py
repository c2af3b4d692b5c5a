"""No payload in telemetry by default (principle 4), checked on the wire.

An app under opentelemetry-instrument pushes known secrets through Redis keys and
values, tokenizer text, token ids, serialized bodies, queue items and exception
messages; traces, metrics and logs go to a real OTLP receiver, and every byte
received is scanned for the secrets.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.instrumented import OPENTELEMETRY_INSTRUMENT, otlp_env
from tests.servers import wait_until

pytestmark = pytest.mark.e2e

APP = Path(__file__).resolve().parent / "apps" / "payload_app.py"
SECRETS = {
    "key": "KEYs3cr3tzz41",
    "value": "VALUEs3cr3tqq77",
    "text": "TEXTs3cr3tww19 and more",
}


def test_no_secret_reaches_any_exported_byte(otlp_receiver, redis_server):
    env = otlp_env(
        otlp_receiver.endpoint,
        OTEL_SERVICE_NAME="payload-safety",
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_METRICS_EXPORTER="otlp",
        OTEL_LOGS_EXPORTER="otlp",
        OTEL_PYTHON_LOGGING_AUTO_INSTRUMENTATION_ENABLED="true",
        OTEL_BSP_SCHEDULE_DELAY="100",
        PAYLOAD_SECRETS=json.dumps(SECRETS),
        PAYLOAD_REDIS_URL=redis_server.url,
    )
    completed = subprocess.run(
        [OPENTELEMETRY_INSTRUMENT, sys.executable, str(APP)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr

    wait_until(lambda: otlp_receiver.metrics("inference.cache.lookups"), 20, "metrics")
    spans = otlp_receiver.spans()
    stages = {
        attr.value.string_value
        for s in spans
        for attr in s.attributes
        if attr.key == "inference.stage"
    }
    # The secrets really went through every instrumented path...
    assert {
        "feature_hydration",
        "tokenize",
        "queue_wait",
        "model_forward",
        "serialize",
        "parse",
    } <= stages
    assert any(event.name == "exception" for s in spans for event in s.events)
    assert otlp_receiver.log_requests, "the app's log line should have been exported"
    # ...and none of them, nor the token ids, left the process.
    wire = b"".join(
        request.SerializeToString()
        for request in (
            *otlp_receiver.trace_requests,
            *otlp_receiver.metric_requests,
            *otlp_receiver.log_requests,
        )
    )
    for name, secret in SECRETS.items():
        for fragment in {secret, secret.split()[0]}:
            assert fragment.encode() not in wire, f"the {name} secret leaked"

"""Every OTEL_INFERENCE_* variable given garbage: one clear message naming it, and the
application still starts and serves (issue 10: bad configuration never crashes a request)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tests.instrumented import OPENTELEMETRY_INSTRUMENT

APP = Path(__file__).resolve().parent / "apps" / "bad_config_app.py"

# Variables whose every value is meaningful (a free-form list, a relative file path),
# so no value is garbage.
FREE_FORM = {"OTEL_INFERENCE_QUEUES_EXCLUDED_MODULES", "OTEL_INFERENCE_SPANS_FILE"}
GARBAGE = "¿garbage, =5 parsecs!"


def our_variables() -> list[str]:
    names = set()
    for entry_point in entry_points(group="opentelemetry_environment_variables"):
        if entry_point.value.startswith("otel_inference"):
            module = entry_point.load()
            names.update(name for name in dir(module) if name.startswith("OTEL_INFERENCE_"))
    return sorted(names)


def test_every_variable_is_registered_as_a_flag():
    assert len(our_variables()) >= 10


@pytest.mark.parametrize("variable", [v for v in our_variables() if v not in FREE_FORM])
def test_garbage_value_is_named_once_and_the_app_still_serves(variable, tmp_path):
    completed = subprocess.run(
        [OPENTELEMETRY_INSTRUMENT, sys.executable, str(APP)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,  # whatever a setting makes the app write stays out of the repo
        env={
            **os.environ,
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
            variable: GARBAGE,
        },
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == {"ok": True}
    mentions = [line for line in completed.stderr.splitlines() if variable in line]
    assert len(mentions) == 1, completed.stderr
    assert "Traceback" not in completed.stderr, completed.stderr

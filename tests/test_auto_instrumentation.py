"""otel-inference under the real ``opentelemetry-instrument`` command."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import tomllib

from tests.instrumented import OPENTELEMETRY_INSTRUMENT

ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"

# Instrumentors whose library is torch: skipped when torch is missing.
TORCH_INSTRUMENTORS = {"inference_torch"}
# Every third-party library some instrumentor wraps (the pyproject's instruments-any).
INSTRUMENTED_LIBRARIES = "torch,redis,tokenizers,transformers,orjson,msgpack,ray,litserve"
# Serving-framework instrumentors, in optional extras: each loads only where its
# framework is installed (their own tests skip without it).
FRAMEWORK_INSTRUMENTORS = {"inference_ray_serve": "ray", "inference_litserve": "litserve"}
# Standard library only (queue, json, gc): these load whatever else is installed.
STDLIB_INSTRUMENTORS = {"inference_queues", "inference_runtime", "inference_serializers"}


def declared_instrumentors() -> set[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(pyproject["project"]["entry-points"].get("opentelemetry_instrumentor", {}))


def expected_instrumentors() -> set[str]:
    """Declared, less the framework instrumentors whose framework is not installed here."""
    missing = {
        name
        for name, module in FRAMEWORK_INSTRUMENTORS.items()
        if importlib.util.find_spec(module) is None
    }
    return declared_instrumentors() - missing


def run_instrumented(*args: str, python: str = sys.executable, env: dict | None = None) -> dict:
    environment = {
        **os.environ,
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        **(env or {}),
    }
    completed = subprocess.run(
        [OPENTELEMETRY_INSTRUMENT, *args, python, str(APPS / "report_instrumentors.py")],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return {**json.loads(completed.stdout.strip().splitlines()[-1]), "stderr": completed.stderr}


def test_every_declared_instrumentor_loads():
    result = run_instrumented()
    declared = declared_instrumentors()
    assert declared, "pyproject declares no opentelemetry_instrumentor entry points"
    assert set(result["instrumented"]) == declared
    loaded = {name for name, value in result["instrumented"].items() if value is True}
    assert loaded == expected_instrumentors(), result


@pytest.fixture
def python_hiding(tmp_path) -> str:
    """A throwaway venv that sees this environment's packages, minus those named
    in ``HIDE_PACKAGES`` (torch unless the test says otherwise)."""
    env_dir = tmp_path / "hiding"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    site_packages = Path(
        sysconfig.get_path("purelib", vars={"base": str(env_dir), "platbase": str(env_dir)})
    )
    ours = sysconfig.get_path("purelib")
    (site_packages / "hide_packages.py").write_text((APPS / "hide_packages.py").read_text())
    # .pth lines: a path is appended to sys.path; an "import" line is executed.
    (site_packages / "zz_parent_env.pth").write_text(f"{ours}\n{ROOT}\nimport hide_packages\n")
    return str(env_dir / "bin" / "python")


def test_missing_torch_disables_only_the_torch_instrumentor(python_hiding):
    result = run_instrumented(python=python_hiding)
    assert result["torch_found"] is False
    expected = expected_instrumentors() - TORCH_INSTRUMENTORS
    assert expected, "need at least one non-torch instrumentor to prove the point"
    loaded = {name for name, value in result["instrumented"].items() if value is True}
    assert loaded == expected, result
    for name in TORCH_INSTRUMENTORS & declared_instrumentors():
        assert result["instrumented"][name] is not True


def test_stdlib_instrumentors_load_without_any_instrumented_library(python_hiding):
    """opentelemetry-instrument checks the whole distribution's instruments-any
    before loading any of its instrumentors: with none of those libraries present,
    the queue, json and gc instrumentors must still load."""
    result = run_instrumented(python=python_hiding, env={"HIDE_PACKAGES": INSTRUMENTED_LIBRARIES})
    assert result["torch_found"] is False
    loaded = {name for name, value in result["instrumented"].items() if value is True}
    assert loaded == STDLIB_INSTRUMENTORS, result


def test_env_vars_are_opentelemetry_instrument_flags():
    help_text = subprocess.run(
        [OPENTELEMETRY_INSTRUMENT, "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in (
        "--inference_budgets",
        "--inference_budgets_file",
        "--inference_root_stages",
        "--inference_exception_messages",
        "--inference_redis_commands",
        "--inference_serializers_parse",
        "--inference_queues_scope",
    ):
        assert flag in help_text
    result = run_instrumented("--inference_budgets", "tokenize=3ms")
    assert result["budgets_env"] == "tokenize=3ms"


def test_malformed_budget_logs_error_and_app_still_starts():
    result = run_instrumented(env={"OTEL_INFERENCE_BUDGETS": "tokenize=3 parsecs"})
    assert "OTEL_INFERENCE_BUDGETS" in result["stderr"]
    assert "unknown unit 'parsecs'" in result["stderr"]
    assert result["budgets_env"] == "tokenize=3 parsecs"


def test_bad_instrumentor_setting_skips_only_that_instrumentor():
    result = run_instrumented(env={"OTEL_INFERENCE_REDIS_COMMANDS": "GET,not a command!"})
    assert "OTEL_INFERENCE_REDIS_COMMANDS" in result["stderr"]
    assert "RedisFeatureInstrumentor not enabled" in result["stderr"]
    assert result["instrumented"]["inference_redis"] is False
    others = {
        name: value for name, value in result["instrumented"].items() if name != "inference_redis"
    }
    assert all(value is True for value in others.values()), result


def test_programmatic_instrument_raises_configuration_error(monkeypatch):
    from otel_inference import ConfigurationError
    from otel_inference.instrumentation.redis import RedisFeatureInstrumentor

    monkeypatch.setenv("OTEL_INFERENCE_REDIS_COMMANDS", "GET,not a command!")
    instrumentor = RedisFeatureInstrumentor()
    with pytest.raises(ConfigurationError, match="OTEL_INFERENCE_REDIS_COMMANDS"):
        instrumentor.instrument()
    assert not instrumentor.is_instrumented_by_opentelemetry

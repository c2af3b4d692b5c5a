"""promtool: the generated rules are valid, their unit tests pass (over-budget stage
fires, a stage just under a budget on a bucket boundary does not, the ``for:`` delay,
the end-to-end budget), and those unit tests fail on a broken rule."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dashboards.generate import PROMETHEUS_RULES
from tests.servers import require_binary

RULE_TESTS = PROMETHEUS_RULES.parent / "inference-rules.test.yaml"
PROMETHEUS_CONFIG = PROMETHEUS_RULES.parent / "prometheus.yaml"


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("promtool"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_check_rules():
    result = promtool("check", "rules", str(PROMETHEUS_RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


def test_unit_tests_pass():
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_compose_prometheus_config_is_valid(tmp_path):
    # The compose config loads the rules from their path inside the container.
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["rule_files"] = [str(PROMETHEUS_RULES)]
    path = tmp_path / "prometheus.yaml"
    path.write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def _broken_copy(tmp_path: Path, old: str, new: str) -> Path:
    text = PROMETHEUS_RULES.read_text()
    assert old in text
    (tmp_path / PROMETHEUS_RULES.name).write_text(text.replace(old, new))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    return tmp_path / RULE_TESTS.name


@pytest.mark.parametrize(
    ("old", "new", "caught_by"),
    [
        # A budget ratio threshold off by 2x: the over-budget stage no longer fires.
        (") > 1\n", ") > 2\n", "over-budget stage fires"),
        # No `for:` delay: the alert fires while it should still be pending.
        ("for: 5m", "for: 0s", "for delay"),
        # p99 instead of p95: model_forward's (just-under-budget) p95 is checked exactly.
        (
            "histogram_quantile(0.95, sum by (le, job, inference_stage)",
            "histogram_quantile(0.99, sum by (le, job, inference_stage)",
            "over-budget stage fires",
        ),
        # The request excluded from the stage alerts no more.
        ('{inference_stage!="request"}', "", "request over its end-to-end budget"),
    ],
)
def test_unit_tests_catch_a_broken_rule(tmp_path, old, new, caught_by):
    result = promtool("test", "rules", str(_broken_copy(tmp_path, old, new)))
    assert result.returncode != 0
    assert caught_by in result.stdout + result.stderr

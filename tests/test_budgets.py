"""Budget parsing: every malformed input gets one clear error naming the bad entry."""

from __future__ import annotations

import itertools
import logging

import pytest

from otel_inference import ConfigurationError, configure
from otel_inference.budgets import (
    budgets_from_env,
    coerce_budgets,
    load_budgets_file,
    parse_budgets,
)
from otel_inference.distro import validate_environment
from otel_inference.metrics import DEFAULT_DURATION_BOUNDARIES, duration_boundaries


def test_parse_units():
    budgets = parse_budgets("tokenize=5ms, model_forward=14ms,request=0.2s,queue_wait=750us,x=3µs")
    assert dict(budgets) == {
        "tokenize": 0.005,
        "model_forward": 0.014,
        "request": 0.2,
        "queue_wait": 0.00075,
        "x": 0.000003,
    }


def test_parsed_values_equal_float_literals_exactly():
    # 14 * 0.001 != 0.014 in binary floating point; the parser must give 0.014.
    assert parse_budgets("a=14ms")["a"] == 0.014
    assert parse_budgets("a=0.37ms")["a"] == 0.00037


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("tokenize=5", "no unit"),
        ("tokenize=5min", "unknown unit 'min'"),
        ("tokenize=-5ms", "must be positive"),
        ("tokenize=0ms", "must be positive"),
        ("tokenize=5ms,tokenize=6ms", "'tokenize' is given more than once"),
        ("tokenize", "not of the form stage=duration"),
        ("=5ms", "is not a valid stage name"),
        ("to ke=5ms", "is not a valid stage name"),
        ("tokenize=fast", "unknown unit 'fast'"),
        ("tokenize=1.2.3ms", "invalid number"),
        ("tokenize=nanms", "unknown unit 'nanms'"),
        ("tokenize=ms", "has no number"),
        ("tokenize=5 ms", None),
    ],
)
def test_malformed_budgets_name_the_entry(text, fragment):
    if fragment is None:  # whitespace between number and unit is fine
        assert parse_budgets(text)["tokenize"] == 0.005
        return
    with pytest.raises(ConfigurationError) as raised:
        parse_budgets(text)
    message = str(raised.value)
    assert message.startswith("OTEL_INFERENCE_BUDGETS")
    assert fragment in message


def test_yaml_file(tmp_path):
    path = tmp_path / "budgets.yaml"
    path.write_text("budgets:\n  tokenize: 5ms\n  model_forward: 14ms\n")
    assert dict(load_budgets_file(path)) == {"tokenize": 0.005, "model_forward": 0.014}


def test_toml_file_top_level(tmp_path):
    path = tmp_path / "budgets.toml"
    path.write_text('tokenize = "5ms"\nrequest = "200ms"\n')
    assert dict(load_budgets_file(path)) == {"tokenize": 0.005, "request": 0.2}


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("b.yaml", "tokenize: 5\n", "must be a string with a unit"),
        ("b.yaml", "tokenize: [5ms]\n", "must be a string with a unit"),
        ("b.yaml", "- tokenize\n", "expected a mapping"),
        ("b.yaml", "tokenize: 5ms\n  bad: indent\n", "is not valid YAML"),
        ("b.toml", "tokenize = \n", "is not valid TOML"),
        ("b.json", "{}", "must end in .yaml, .yml or .toml"),
        ("b.yaml", "tokenize: 5ms\ntokenize: 6ms\n", None),
    ],
)
def test_malformed_files(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_text(content)
    if fragment is None:
        # YAML itself keeps the last duplicate key; nothing for us to detect.
        assert dict(load_budgets_file(path)) == {"tokenize": 0.006}
        return
    with pytest.raises(ConfigurationError) as raised:
        load_budgets_file(path)
    assert "OTEL_INFERENCE_BUDGETS_FILE" in str(raised.value)
    assert fragment in str(raised.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigurationError, match=r"cannot read .*nope\.yaml"):
        load_budgets_file(tmp_path / "nope.yaml")


def test_env_overrides_file(tmp_path):
    path = tmp_path / "b.yml"
    path.write_text("tokenize: 5ms\nserialize: 1ms\n")
    env = {"OTEL_INFERENCE_BUDGETS_FILE": str(path), "OTEL_INFERENCE_BUDGETS": "tokenize=7ms"}
    assert dict(budgets_from_env(env)) == {"tokenize": 0.007, "serialize": 0.001}


def test_programmatic_mapping_accepts_seconds_and_strings():
    assert dict(coerce_budgets({"a": 0.005, "b": "2ms"})) == {"a": 0.005, "b": 0.002}
    with pytest.raises(ConfigurationError, match="positive finite number"):
        coerce_budgets({"a": -1})
    with pytest.raises(ConfigurationError, match="not a valid stage name"):
        coerce_budgets({"": "1ms"})


def test_programmatic_configure_raises_on_bad_env(monkeypatch):
    monkeypatch.setenv("OTEL_INFERENCE_BUDGETS", "tokenize=5parsecs")
    with pytest.raises(ConfigurationError, match="unknown unit 'parsecs'"):
        configure()
    monkeypatch.delenv("OTEL_INFERENCE_BUDGETS")
    monkeypatch.setenv("OTEL_INFERENCE_ROOT_STAGES", "sometimes")
    with pytest.raises(ConfigurationError, match="OTEL_INFERENCE_ROOT_STAGES='sometimes'"):
        configure()


def test_auto_instrumentation_path_logs_and_continues(monkeypatch, caplog):
    monkeypatch.setenv("OTEL_INFERENCE_BUDGETS", "tokenize=5ms,serialize=oops")
    with caplog.at_level(logging.ERROR):
        problems = validate_environment()
    assert len(problems) == 1 and "'serialize=oops'" in problems[0]


def test_boundaries_cover_range_finely():
    bounds = DEFAULT_DURATION_BOUNDARIES
    assert bounds[0] == 0.0001 and bounds[-1] == 60.0
    assert list(bounds) == sorted(set(bounds))
    assert max(b / a for a, b in itertools.pairwise(bounds)) <= 1.5


def test_boundaries_include_every_budget_exactly():
    bounds = duration_boundaries([0.014, 0.00037, 0.005])
    assert {0.014, 0.00037, 0.005} <= set(bounds)
    assert list(bounds) == sorted(set(bounds))

"""Per-stage latency budgets.

One budget config drives everything: the ``inference.budget.exceeded`` span
attribute on breach, the ``inference.stage.budget.breaches`` counter, the
``inference.stage.budget`` gauge the alert rules join on, and the histogram
bucket boundaries (every budget is a boundary, so p95-vs-budget is exact).

Usage::

    export OTEL_INFERENCE_BUDGETS="tokenize=5ms,model_forward=14ms,request=200ms"

or, in a file named by ``OTEL_INFERENCE_BUDGETS_FILE`` (YAML or TOML)::

    budgets:
      tokenize: 5ms
      model_forward: 14ms

or programmatically::

    from otel_inference import configure
    configure(budgets="tokenize=5ms,model_forward=14ms")
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType

from otel_inference.config import ConfigurationError
from otel_inference.environment_variables import (
    OTEL_INFERENCE_BUDGETS,
    OTEL_INFERENCE_BUDGETS_FILE,
)

Budgets = Mapping[str, float]
"""Stage name -> budget in seconds."""

NO_BUDGETS: Budgets = MappingProxyType({})

_UNIT_SCALE = {
    "us": Decimal("0.000001"),
    "µs": Decimal("0.000001"),
    "ms": Decimal("0.001"),
    "s": Decimal(1),
}
_DURATION = re.compile(r"^\s*(?P<number>.*?)\s*(?P<unit>[a-zµ]*)\s*$", re.IGNORECASE)
_STAGE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")


def parse_duration(text: object, *, entry: str, source: str) -> float:
    """Parse ``"5ms"``-style text into seconds; the error names ``source`` and ``entry``."""
    if isinstance(text, bool) or not isinstance(text, str):
        raise ConfigurationError(
            f"{source}: budget {entry!r} must be a string with a unit (us, ms or s), "
            f"for example '5ms'; got {text!r}"
        )
    match = _DURATION.match(text)
    if not match or not match["unit"]:
        raise ConfigurationError(
            f"{source}: budget {entry!r} has no unit; write a number and one of us, ms, s "
            f"(for example '5ms'); got {text!r}"
        )
    unit = match["unit"].lower()
    if unit not in _UNIT_SCALE:
        raise ConfigurationError(
            f"{source}: budget {entry!r} has unknown unit {match['unit']!r}; use us, ms or s"
        )
    if not match["number"]:
        raise ConfigurationError(f"{source}: budget {entry!r} has no number; got {text!r}")
    try:
        number = Decimal(match["number"])
    except InvalidOperation:
        raise ConfigurationError(
            f"{source}: budget {entry!r} has an invalid number {match['number']!r}"
        ) from None
    if not number.is_finite():
        raise ConfigurationError(f"{source}: budget {entry!r} must be finite; got {text!r}")
    if number <= 0:
        raise ConfigurationError(f"{source}: budget {entry!r} must be positive; got {text!r}")
    # Decimal keeps "14ms" exactly 0.014 (not 14 * 0.001), so the budget equals
    # its histogram bucket boundary bit for bit.
    return float(number * _UNIT_SCALE[unit])


def _check_stage(stage: object, *, source: str) -> str:
    if not isinstance(stage, str) or not _STAGE_NAME.match(stage):
        raise ConfigurationError(
            f"{source}: {stage!r} is not a valid stage name "
            "(letters, digits, '_', '.', '-'; starting with a letter or '_')"
        )
    return stage


def parse_budgets(text: str, *, source: str = OTEL_INFERENCE_BUDGETS) -> Budgets:
    """Parse ``"tokenize=5ms,model_forward=14ms"`` into ``{stage: seconds}``."""
    budgets: dict[str, float] = {}
    for raw_entry in text.split(","):
        entry = raw_entry.strip()
        if not entry:
            continue
        stage, sep, value = entry.partition("=")
        if not sep:
            raise ConfigurationError(
                f"{source}: entry {entry!r} is not of the form stage=duration (e.g. tokenize=5ms)"
            )
        stage = _check_stage(stage.strip(), source=source)
        if stage in budgets:
            raise ConfigurationError(f"{source}: stage {stage!r} is given more than once")
        budgets[stage] = parse_duration(value, entry=entry, source=source)
    return MappingProxyType(budgets)


def _read_budgets_file(path: Path) -> object:
    suffix = path.suffix.lower()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"{OTEL_INFERENCE_BUDGETS_FILE}: cannot read {str(path)!r}: {exc.strerror}"
        ) from None
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(raw)
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            return tomllib.loads(raw.decode("utf-8"))
    except Exception as exc:  # any parser error: report it as configuration
        raise ConfigurationError(
            f"{OTEL_INFERENCE_BUDGETS_FILE}: {str(path)!r} is not valid {suffix[1:].upper()}: {exc}"
        ) from None
    raise ConfigurationError(
        f"{OTEL_INFERENCE_BUDGETS_FILE}: {str(path)!r} must end in .yaml, .yml or .toml"
    )


def load_budgets_file(path: str | os.PathLike[str]) -> Budgets:
    """Load budgets from a YAML or TOML file: ``{stage: "5ms"}``, optionally under ``budgets``."""
    path = Path(path)
    source = f"{OTEL_INFERENCE_BUDGETS_FILE} ({path})"
    document = _read_budgets_file(path)
    if isinstance(document, Mapping) and set(document) == {"budgets"}:
        document = document["budgets"]
    if document is None:
        return NO_BUDGETS
    if not isinstance(document, Mapping):
        raise ConfigurationError(
            f"{source}: expected a mapping of stage to duration, got {type(document).__name__}"
        )
    budgets = {}
    for stage, value in document.items():
        _check_stage(stage, source=source)
        budgets[stage] = parse_duration(value, entry=f"{stage}: {value!r}", source=source)
    return MappingProxyType(budgets)


def budgets_from_env(environ: Mapping[str, str] | None = None) -> Budgets:
    """Budgets from :envvar:`OTEL_INFERENCE_BUDGETS_FILE` then :envvar:`OTEL_INFERENCE_BUDGETS`.

    Entries of the variable override the file's. Raises :class:`ConfigurationError`.
    """
    environ = os.environ if environ is None else environ
    merged: dict[str, float] = {}
    file_path = environ.get(OTEL_INFERENCE_BUDGETS_FILE, "").strip()
    if file_path:
        merged.update(load_budgets_file(file_path))
    text = environ.get(OTEL_INFERENCE_BUDGETS, "")
    if text.strip():
        merged.update(parse_budgets(text))
    return MappingProxyType(merged)


def coerce_budgets(budgets: Mapping[str, object] | str | None) -> Budgets:
    """Accept programmatic budgets: a ``"stage=5ms,..."`` string or a mapping.

    Mapping values may be duration strings (``"5ms"``) or numbers in seconds.
    """
    if budgets is None:
        return NO_BUDGETS
    if isinstance(budgets, str):
        return parse_budgets(budgets, source="budgets")
    result = {}
    for stage, value in budgets.items():
        _check_stage(stage, source="budgets")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not value > 0 or value == float("inf"):
                raise ConfigurationError(
                    f"budgets: budget for {stage!r} must be a positive finite number of "
                    f"seconds; got {value!r}"
                )
            result[stage] = float(value)
        else:
            result[stage] = parse_duration(value, entry=f"{stage}={value}", source="budgets")
    return MappingProxyType(result)

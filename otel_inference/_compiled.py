"""The optional compiled hot path (``_speedups.c``), loaded once for the package.

``otel_inference._speedups`` is built at install time when a C compiler and the
Python headers are there (``setup.py``: ``optional=True``, so an install without them
still succeeds). It compiles a stage scope's enter and exit (``StageCore``, see
:mod:`otel_inference.stages`) with a first call's new tally, the interval-union
arithmetic of :mod:`otel_inference.accounting`, and a request's end: each stage's
figures (``tally_rows``) and their histogram updates on the fast path
(``record_rows``, :mod:`otel_inference.fastpath`). The pure-Python code it mirrors
stays the reference and the fallback, with the same behaviour.

Usage::

    from otel_inference._compiled import SPEEDUPS

    merge = SPEEDUPS.merge_intervals if SPEEDUPS is not None else merge_intervals_py
"""

from __future__ import annotations

import logging
from time import perf_counter_ns
from types import ModuleType

from otel_inference.config import ConfigurationError, speedups_enabled

_logger = logging.getLogger(__name__)


def _load() -> ModuleType | None:
    """``_speedups``, or None: turned off (``OTEL_INFERENCE_SPEEDUPS=false``), not
    built, or its clock is not ``time.perf_counter_ns``'s."""
    try:
        if not speedups_enabled():
            return None
    except ConfigurationError:
        # The default stays. Not logged here: this module is imported by
        # opentelemetry-instrument's launcher too (for the variables' CLI flags);
        # the distro's validate_environment() names the bad value once, in the app.
        pass
    try:
        from otel_inference import _speedups
    except ImportError:
        _logger.debug("otel-inference: the compiled hot path is not built; using Python")
        return None
    before = perf_counter_ns()
    reading = _speedups.now_ns()
    if not before <= reading <= perf_counter_ns():
        _logger.warning(
            "otel-inference: the compiled hot path's clock is not perf_counter_ns here; "
            "using Python"
        )
        return None
    return _speedups


SPEEDUPS: ModuleType | None = _load()

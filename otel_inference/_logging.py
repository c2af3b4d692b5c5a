"""``log_once``: an instrumentation problem is logged once per process.

Usage::

    from otel_inference._logging import log_once

    log_once("redis-parse", "otel-inference: could not parse a reply", level=logging.ERROR)
"""

from __future__ import annotations

import logging

# The stages module's logger, where these lines have always been logged.
_logger = logging.getLogger("otel_inference.stages")

_logged_once: set[str] = set()


def log_once(
    key: str,
    message: str,
    *args: object,
    level: int = logging.WARNING,
    exc_info: bool | None = None,
) -> None:
    """Log an instrumentation problem once per process: never flood, never raise.

    ERROR logs carry the traceback (a bug of ours) unless ``exc_info=False``
    (a configuration problem: the message says it all)."""
    if key in _logged_once:
        return
    _logged_once.add(key)
    _logger.log(
        level, message, *args, exc_info=level >= logging.ERROR if exc_info is None else exc_info
    )

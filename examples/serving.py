"""Run an example service's FastAPI app with uvicorn, the way both demos need it.

from examples.serving import serve

def main(argv=None):
    serve(create_app, "my service", default_port=8000, logger=logger, argv=argv)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Any

import uvicorn


def serve(
    create_app: Callable[[], Any],
    description: str,
    *,
    default_port: int,
    logger: logging.Logger,
    argv: list[str] | None = None,
) -> None:
    """Parse ``--host`` / ``--port``, then serve ``create_app()`` until SIGTERM or Ctrl-C."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal; with the
    # default handler the process would die there, skipping atexit hooks (buffered
    # logs, telemetry exporters). Exit normally instead.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: uvicorn already shut down
        uvicorn.run(
            create_app(), host=args.host, port=args.port, log_level="warning", access_log=False
        )


def _exit_cleanly(signum: int, _frame: object) -> None:
    raise SystemExit(0)

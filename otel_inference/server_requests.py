"""Request boundaries for zero-code services: the web framework's SERVER span is the request.

Under ``opentelemetry-instrument`` a FastAPI/Starlette (any ASGI) service has no
``request()``: contrib's ASGI middleware opens the SERVER span. To account its
stages per request (each stage recorded once with the request's time in it, its
call count, its budget judged once, spans compressed and capped), the app that
the middleware wraps is itself wrapped, so every HTTP request runs inside an
adopted request (:meth:`otel_inference.stages.StageRecorder.adopt_request`),
inside the SERVER span, which is still open when the request's stages are
recorded.

The runtime instrumentor installs it; by hand::

    from otel_inference.server_requests import adopt_server_requests

    adopt_server_requests()     # before the app serves its first request
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import ModuleType
from typing import Any

from otel_inference.instrumentation._patch import Patches
from otel_inference.stages import StageRecorder, get_recorder, log_once

_ASGI_MODULE = "opentelemetry.instrumentation.asgi"
_patches = Patches("server-requests")
_adopted_by: StageRecorder | None = None


class AdoptingASGIApp:
    """The application inside contrib's ASGI middleware, run as an adopted request."""

    def __init__(self, app: Callable[..., Any], recorder: StageRecorder) -> None:
        self.app = app
        self._recorder = recorder

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or _adopted_by is None:
            await self.app(scope, receive, send)
            return
        async with self._recorder.adopt_request():
            await self.app(scope, receive, send)

    def __getattr__(self, name: str) -> Any:  # the wrapped app's attributes stay reachable
        return getattr(self.app, name)


def _middleware_init(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    result = wrapped(*args, **kwargs)
    recorder = _adopted_by
    try:
        if recorder is not None and not isinstance(instance.app, AdoptingASGIApp):
            instance.app = AdoptingASGIApp(instance.app, recorder)
    except Exception:
        log_once(
            "adopt-asgi",
            "otel-inference: could not wrap an ASGI app; its stages are recorded per call",
            level=logging.ERROR,
        )
    return result


def _wrap_asgi(module: ModuleType) -> None:
    _patches.wrap(module.OpenTelemetryMiddleware, "__init__", _middleware_init)


def adopt_server_requests(recorder: StageRecorder | None = None) -> None:
    """Account stages per request under contrib's ASGI middleware (FastAPI, Starlette...),
    now or when ``opentelemetry.instrumentation.asgi`` is imported. Idempotent."""
    global _adopted_by
    first = _adopted_by is None
    _adopted_by = recorder or get_recorder()
    if first:
        _patches.when_imported(_ASGI_MODULE, _wrap_asgi)


def release_server_requests() -> None:
    """Undo :func:`adopt_server_requests`; apps built meanwhile pass requests straight through."""
    global _adopted_by
    _adopted_by = None
    _patches.unwrap_all()

"""Instrument response serialisation (``serialize`` stage) and request-body decoding
(``parse`` stage): ``json``, ``orjson``, ``msgpack``, Starlette and FastAPI.

A top-level call inside a request records the ``inference.stage.duration``
histogram (every call) and, on a sampled request, a stage span with the format
(``json`` | ``msgpack``), the library and the payload size in bytes. Serialize
calls also record the ``inference.serialize.size`` histogram (bytes, attribute
``inference.serialize.format``). Calls nested in another stage, calls outside a
request and calls made by OpenTelemetry's exporters record nothing (see
:mod:`otel_inference.instrumentation.serializers._wrappers`).

Instrumented, each only when installed (wrapped when first imported):

* serialize: ``json.dumps``, ``orjson.dumps``, ``msgpack.packb`` / ``dumps``,
  ``starlette.responses.JSONResponse.render``, FastAPI's ``ORJSONResponse`` /
  ``UJSONResponse.render`` and ``fastapi.routing.serialize_response``: one stage
  per FastAPI response, from ``serialize_response`` to the end of the response's
  render (``starlette.responses.Response.__init__``), never two;
* parse (unless ``OTEL_INFERENCE_SERIALIZERS_PARSE=false`` or ``parse=False``):
  ``json.loads`` (so ``json.load`` and Starlette's ``Request.json()``),
  ``orjson.loads``, ``msgpack.unpackb`` / ``loads``.

Names imported before instrumenting (``from orjson import dumps``) keep the
original function, as with every wrapper-based instrumentation.

Usage
-----

.. code-block:: python

    from otel_inference import request
    from otel_inference.instrumentation.serializers import SerializersInstrumentor
    import orjson

    SerializersInstrumentor().instrument()

    with request():
        body = orjson.dumps({"embedding": vector})  # one serialize stage

Under ``opentelemetry-instrument`` it loads through the ``inference_serializers``
entry point.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from types import ModuleType
from typing import Any

from opentelemetry.instrumentation.dependencies import get_dependency_conflicts

from otel_inference import semconv
from otel_inference.instrumentation._base import InferenceInstrumentor
from otel_inference.instrumentation._patch import Patches
from otel_inference.instrumentation.serializers._wrappers import (
    Target,
    fastapi_serialize_response_wrapper,
    response_init_wrapper,
    stage_wrapper,
)
from otel_inference.instrumentation.serializers.environment_variables import (
    OTEL_INFERENCE_SERIALIZERS_PARSE,
)
from otel_inference.instrumentation.serializers.package import _instruments, _optional
from otel_inference.stages import StageRecorder, log_once

__all__ = ["SerializersInstrumentor"]

# module -> [(class name or None for a module function, attribute, target, wrapper factory)]
_Factory = Callable[[StageRecorder, Target], Callable[..., Any]]
_Spec = tuple[str | None, str, Target, _Factory]
_SERIALIZE: dict[str, list[_Spec]] = {
    "json": [(None, "dumps", Target(semconv.SERIALIZE, "json", "json"), stage_wrapper)],
    "orjson": [(None, "dumps", Target(semconv.SERIALIZE, "json", "orjson"), stage_wrapper)],
    "msgpack": [
        (None, "packb", Target(semconv.SERIALIZE, "msgpack", "msgpack"), stage_wrapper),
        (None, "dumps", Target(semconv.SERIALIZE, "msgpack", "msgpack"), stage_wrapper),
    ],
    "starlette.responses": [
        ("JSONResponse", "render", Target(semconv.SERIALIZE, "json", "starlette"), stage_wrapper),
        # Closes the stage serialize_response began: one stage over FastAPI's two steps.
        (
            "Response",
            "__init__",
            Target(semconv.SERIALIZE, "json", "fastapi"),
            response_init_wrapper,
        ),
    ],
    "fastapi.responses": [
        ("ORJSONResponse", "render", Target(semconv.SERIALIZE, "json", "orjson"), stage_wrapper),
        ("UJSONResponse", "render", Target(semconv.SERIALIZE, "json", "ujson"), stage_wrapper),
    ],
    "fastapi.routing": [
        (
            None,
            "serialize_response",
            Target(semconv.SERIALIZE, "json", "fastapi"),
            fastapi_serialize_response_wrapper,
        )
    ],
}
_PARSE: dict[str, list[_Spec]] = {
    "json": [(None, "loads", Target(semconv.PARSE, "json", "json"), stage_wrapper)],
    "orjson": [(None, "loads", Target(semconv.PARSE, "json", "orjson"), stage_wrapper)],
    "msgpack": [
        (None, "unpackb", Target(semconv.PARSE, "msgpack", "msgpack"), stage_wrapper),
        (None, "loads", Target(semconv.PARSE, "msgpack", "msgpack"), stage_wrapper),
    ],
}

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def parse_enabled(value: bool | None = None) -> bool:
    """The ``parse=`` argument, else :envvar:`OTEL_INFERENCE_SERIALIZERS_PARSE` (default on)."""
    if value is not None:
        return bool(value)
    raw = os.environ.get(OTEL_INFERENCE_SERIALIZERS_PARSE, "").strip().lower()
    if not raw or raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    log_once(
        "serializers-parse-env",
        "otel-inference: %s=%r is not true or false; recording parse stages",
        OTEL_INFERENCE_SERIALIZERS_PARSE,
        raw,
    )
    return True


class SerializersInstrumentor(InferenceInstrumentor):
    """``serialize`` and ``parse`` stages for json, orjson, msgpack, Starlette and FastAPI."""

    # One per class: BaseInstrumentor is a singleton whose __init__ runs on every call.
    _patches = Patches("serializers")

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument_library(self, recorder: StageRecorder, **kwargs: Any) -> None:
        specs: dict[str, list[_Spec]] = {name: list(items) for name, items in _SERIALIZE.items()}
        if parse_enabled(kwargs.get("parse")):
            for name, items in _PARSE.items():
                specs.setdefault(name, []).extend(items)
        for module_name, items in specs.items():
            self._patches.when_imported(module_name, self._applier(recorder, module_name, items))

    def _applier(
        self, recorder: StageRecorder, module_name: str, items: list[_Spec]
    ) -> Callable[[ModuleType], None]:
        patches = self._patches

        def apply(module: ModuleType) -> None:
            requirement = _optional.get(module_name.partition(".")[0])
            if requirement is not None:
                conflict = get_dependency_conflicts((requirement,))
                if conflict is not None:
                    log_once(f"serializers-version-{module_name}", "otel-inference: %s", conflict)
                    return
            for class_name, attribute, target, factory in items:
                owner = module if class_name is None else getattr(module, class_name, None)
                if owner is None:
                    continue
                patches.wrap(owner, attribute, factory(recorder, target))

        return apply

    def _uninstrument(self, **kwargs: Any) -> None:
        self._patches.unwrap_all()

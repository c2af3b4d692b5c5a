"""The serialize and parse stages: json, orjson, msgpack, Starlette and FastAPI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import (
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from otel_inference import request, semconv, stage
from otel_inference.instrumentation.serializers import SerializersInstrumentor
from otel_inference.instrumentation.serializers.environment_variables import (
    OTEL_INFERENCE_SERIALIZERS_PARSE,
)

orjson = pytest.importorskip("orjson")
msgpack = pytest.importorskip("msgpack")

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = {"id": "req-1", "embedding": [0.25, -1.5, 3.0] * 10, "model": "minilm"}


@pytest.fixture
def instrumented(telemetry) -> Iterator[SerializersInstrumentor]:
    instrumentor = SerializersInstrumentor()
    instrumentor.instrument()
    yield instrumentor
    instrumentor.uninstrument()


@pytest.fixture
def instrumented_unsampled(unsampled_telemetry) -> Iterator[SerializersInstrumentor]:
    instrumentor = SerializersInstrumentor()
    instrumentor.instrument()
    yield instrumentor
    instrumentor.uninstrument()


def size_points(telemetry) -> dict[str, tuple[int, int]]:
    """format -> (count, sum of bytes) of ``inference.serialize.size``."""
    return {
        point.attributes[semconv.INFERENCE_SERIALIZE_FORMAT]: (point.count, point.sum)
        for point in telemetry.metric_points(semconv.SERIALIZE_SIZE)
    }


def stage_counts(telemetry) -> dict[str, int]:
    return {name: point.count for name, point in telemetry.stage_points().items()}


SERIALIZERS = {
    "orjson": (lambda value: orjson.dumps(value), "json"),
    "json": (lambda value: json.dumps(value), "json"),
    "msgpack": (lambda value: msgpack.packb(value), "msgpack"),
}


@pytest.mark.parametrize("library", sorted(SERIALIZERS))
def test_serialize_stage_per_library(instrumented, telemetry, library):
    dumps, format_ = SERIALIZERS[library]
    with suppress_instrumentation():
        expected = dumps(PAYLOAD)
    with request():
        out = dumps(PAYLOAD)
    assert out == expected
    (span,) = telemetry.spans(semconv.SERIALIZE)
    assert dict(span.attributes) == {
        semconv.INFERENCE_STAGE: semconv.SERIALIZE,
        semconv.INFERENCE_SERIALIZE_FORMAT: format_,
        semconv.INFERENCE_SERIALIZE_LIBRARY: library,
        semconv.INFERENCE_SERIALIZE_BYTES: len(out),
    }
    assert size_points(telemetry) == {format_: (1, len(out))}
    assert stage_counts(telemetry)["serialize"] == 1


def test_msgpack_dumps_alias_and_non_ascii_json_bytes(instrumented, telemetry):
    text = {"city": "Zürich", "emoji": "🙂"}
    with request():
        out = json.dumps(text, ensure_ascii=False)
    with request():  # its own request: two calls in one would share a compressed span
        packed = msgpack.dumps(text)
    spans = telemetry.spans(semconv.SERIALIZE)
    assert [s.attributes[semconv.INFERENCE_SERIALIZE_BYTES] for s in spans] == [
        len(out.encode("utf-8")),
        len(packed),
    ]
    assert len(out.encode("utf-8")) > len(out)  # bytes, not characters


# Looked up at call time: a reference taken before instrument() stays uninstrumented.
PARSERS = {
    "orjson": (lambda body: orjson.loads(body), orjson.dumps(PAYLOAD), "json"),
    "json": (lambda body: json.loads(body), json.dumps(PAYLOAD), "json"),
    "msgpack": (lambda body: msgpack.unpackb(body), msgpack.packb(PAYLOAD), "msgpack"),
}


@pytest.mark.parametrize("library", sorted(PARSERS))
def test_parse_stage_per_library(instrumented, telemetry, library):
    loads, body, format_ = PARSERS[library]
    with request():
        value = loads(body)
    assert value == PAYLOAD
    (span,) = telemetry.spans(semconv.PARSE)
    assert span.attributes[semconv.INFERENCE_PARSE_FORMAT] == format_
    assert span.attributes[semconv.INFERENCE_PARSE_LIBRARY] == library
    assert span.attributes[semconv.INFERENCE_PARSE_BYTES] == len(body)
    assert stage_counts(telemetry)["parse"] == 1
    assert size_points(telemetry) == {}  # the size metric is for responses


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_parse_can_be_turned_off(telemetry, monkeypatch, how):
    instrumentor = SerializersInstrumentor()
    if how == "environment":
        monkeypatch.setenv(OTEL_INFERENCE_SERIALIZERS_PARSE, "false")
        instrumentor.instrument()
    else:
        instrumentor.instrument(parse=False)
    try:
        with request():
            json.loads(json.dumps(PAYLOAD))
    finally:
        instrumentor.uninstrument()
    assert telemetry.spans(semconv.PARSE) == []
    assert len(telemetry.spans(semconv.SERIALIZE)) == 1


def test_exceptions_propagate_unchanged(instrumented, telemetry):
    with request():
        with pytest.raises(orjson.JSONEncodeError) as raised:
            orjson.dumps({"x": object()})
        with pytest.raises(json.JSONDecodeError):
            json.loads("{not json")
    with pytest.raises(orjson.JSONEncodeError) as bare:
        orjson.dumps({"x": object()})  # outside a request: uninstrumented path
    assert str(raised.value) == str(bare.value)
    points = stage_counts(telemetry)
    assert points["serialize!TypeError"] == 1  # orjson.JSONEncodeError is TypeError
    assert points["parse!JSONDecodeError"] == 1
    assert size_points(telemetry) == {}


def test_outside_a_request_records_nothing(instrumented, telemetry):
    orjson.dumps(PAYLOAD)
    json.loads(json.dumps(PAYLOAD))
    assert telemetry.spans() == []  # never a root span per json.dumps
    assert telemetry.metric_points(semconv.STAGE_DURATION) == []
    assert size_points(telemetry) == {}


def test_nested_in_another_stage_is_not_a_stage(instrumented, telemetry):
    with request():
        with stage(semconv.FEATURE_HYDRATION):
            json.dumps(PAYLOAD)  # e.g. a feature client's own encoding
        with stage(semconv.POSTPROCESS):
            orjson.loads(orjson.dumps(PAYLOAD))
    assert telemetry.spans(semconv.SERIALIZE) == []
    assert telemetry.spans(semconv.PARSE) == []
    assert set(stage_counts(telemetry)) == {
        "feature_hydration",
        "postprocess",
        "request",
        "unattributed",
    }


def test_suppressed_instrumentation_records_nothing(instrumented, telemetry):
    with request(), suppress_instrumentation():
        json.loads(json.dumps(PAYLOAD))
    assert telemetry.spans(semconv.SERIALIZE) == telemetry.spans(semconv.PARSE) == []


def test_unsampled_tiny_payload_gets_histogram_never_span(
    instrumented_unsampled, unsampled_telemetry
):
    with request():
        for _ in range(5):
            orjson.dumps({"ok": True})
    assert unsampled_telemetry.spans() == []
    # One request: its five calls are one serialize value and one size (their bytes).
    assert stage_counts(unsampled_telemetry)["serialize"] == 1
    assert size_points(unsampled_telemetry) == {"json": (1, 5 * len(b'{"ok":true}'))}


def test_console_exporter_does_not_produce_serialize_stages(instrumented, telemetry):
    """ConsoleSpanExporter json.dumps every span: the SDK suppresses instrumentation
    around export, so exporting our serialize span produces no further stage."""
    out = io.StringIO()
    telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=out)))
    with request():
        # A postprocess span ending inside the request: its export runs json.dumps
        # in the request's context; only the SDK's suppression keeps it out.
        with stage(semconv.POSTPROCESS):
            pass
        orjson.dumps(PAYLOAD)
    assert out.getvalue().count('"name": "postprocess"') == 1
    assert out.getvalue().count('"name": "serialize"') == 1
    assert len(telemetry.spans(semconv.SERIALIZE)) == 1
    assert stage_counts(telemetry)["serialize"] == 1


class _JsonExporter(SpanExporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def export(self, spans: list[ReadableSpan]) -> SpanExportResult:
        self.lines.extend(json.dumps({"name": span.name}) for span in spans)
        return SpanExportResult.SUCCESS


class _UnsuppressedProcessor(SpanProcessor):
    """A processor that exports synchronously WITHOUT suppressing instrumentation."""

    def __init__(self, exporter: SpanExporter) -> None:
        self.exporter = exporter

    def on_end(self, span: ReadableSpan) -> None:
        self.exporter.export([span])


def test_exporter_without_suppression_still_produces_no_stage(instrumented, telemetry):
    """Defence beyond the SDK's suppression: exporting our own serialize span, or
    the request span after it ended, runs json.dumps without producing a stage."""
    exporter = _JsonExporter()
    telemetry.tracer_provider.add_span_processor(_UnsuppressedProcessor(exporter))
    with request():
        msgpack.packb(PAYLOAD)
    # Exporting the serialize span ran json.dumps while it was being recorded:
    # no stage for it (and no recursion through span end -> export -> dumps).
    assert exporter.lines == ['{"name": "serialize"}', '{"name": "inference.request"}']
    assert len(telemetry.spans(semconv.SERIALIZE)) == 1
    assert stage_counts(telemetry)["serialize"] == 1


# --- Starlette / FastAPI --------------------------------------------------------------


def test_starlette_json_response_render(instrumented, telemetry):
    responses = pytest.importorskip("starlette.responses")
    with request():
        response = responses.JSONResponse(PAYLOAD)
    with suppress_instrumentation():
        expected = responses.JSONResponse(PAYLOAD).body
    assert response.body == expected
    (span,) = telemetry.spans(semconv.SERIALIZE)  # render's json.dumps is inside it
    assert span.attributes[semconv.INFERENCE_SERIALIZE_LIBRARY] == "starlette"
    assert span.attributes[semconv.INFERENCE_SERIALIZE_BYTES] == len(response.body)


def test_fastapi_orjson_response_is_one_stage(instrumented, telemetry):
    responses = pytest.importorskip("fastapi.responses")
    with warnings.catch_warnings(), request():
        warnings.simplefilter("ignore")  # deprecated in recent FastAPI, still served
        response = responses.ORJSONResponse(PAYLOAD)
    assert response.body == orjson.dumps(PAYLOAD)
    (span,) = telemetry.spans(semconv.SERIALIZE)
    assert span.attributes[semconv.INFERENCE_SERIALIZE_LIBRARY] == "orjson"
    assert span.attributes[semconv.INFERENCE_SERIALIZE_BYTES] == len(response.body)


try:
    from pydantic import BaseModel
except ImportError:  # pragma: no cover - FastAPI brings pydantic
    BaseModel = object


# Module level: FastAPI resolves the endpoint's (string) annotations in module globals.
class Query(BaseModel):
    texts: list[str]


class Embeddings(BaseModel):
    vectors: list[list[float]]


class RequestMiddleware:
    """Opens ``request()`` around each HTTP request (as the SERVER span would)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with request():
            await self.app(scope, receive, send)


def test_fastapi_app_parse_and_serialize(instrumented, telemetry):
    fastapi = pytest.importorskip("fastapi")
    testclient = pytest.importorskip("fastapi.testclient")
    app = fastapi.FastAPI()

    @app.post("/embed", response_model=Embeddings)
    async def embed(query: Query) -> Embeddings:
        return Embeddings(vectors=[[float(len(t)), 0.5] for t in query.texts])

    app.add_middleware(RequestMiddleware)
    body = json.dumps({"texts": ["hello", "world!"]}).encode()
    with testclient.TestClient(app) as client:
        telemetry.span_exporter.clear()
        response = client.post("/embed", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200
    assert response.json() == {"vectors": [[5.0, 0.5], [6.0, 0.5]]}

    (parse,) = telemetry.spans(semconv.PARSE)  # Request.json() -> json.loads
    assert parse.attributes[semconv.INFERENCE_PARSE_BYTES] == len(body)
    # The response model path renders through pydantic, not JSONResponse: still one stage.
    (serialize,) = telemetry.spans(semconv.SERIALIZE)
    assert serialize.attributes[semconv.INFERENCE_SERIALIZE_LIBRARY] == "fastapi"
    assert serialize.attributes[semconv.INFERENCE_SERIALIZE_BYTES] == len(response.content)
    (request_span,) = telemetry.spans("inference.request")
    assert serialize.parent.span_id == request_span.context.span_id


def _fastapi_serialize_stages(telemetry, endpoint_kwargs, returns, requests=3):
    """Serve ``returns()`` from a FastAPI route built with ``endpoint_kwargs``;
    return (responses, serialize spans, the serialize histogram point)."""
    fastapi = pytest.importorskip("fastapi")
    testclient = pytest.importorskip("fastapi.testclient")
    app = fastapi.FastAPI()

    @app.get("/vectors", **endpoint_kwargs)
    async def vectors():
        return returns()

    app.add_middleware(RequestMiddleware)
    with testclient.TestClient(app) as client:
        telemetry.span_exporter.clear()
        responses = [client.get("/vectors") for _ in range(requests)]
    assert all(r.status_code == 200 for r in responses)
    return responses, telemetry.spans(semconv.SERIALIZE), telemetry.stage_points()["serialize"]


class SlowToRender(BaseModel):
    """Rendering a list of these costs a measurable encode (jsonable_encoder) step."""

    values: list[float]


@pytest.mark.parametrize(
    ("case", "endpoint_kwargs"),
    [
        ("no response model (jsonable_encoder, then JSONResponse.render)", {}),
        (
            "response model with ORJSONResponse (model dump, then render)",
            {"response_model": list[SlowToRender], "response_class": "orjson"},
        ),
        (
            "response model (pydantic straight to JSON bytes)",
            {"response_model": list[SlowToRender]},
        ),
        ("a response class we do not wrap", {"response_class": "custom"}),
    ],
    ids=["no-model", "model+orjson", "model", "custom-class"],
)
def test_fastapi_records_one_serialize_stage_per_request(
    instrumented, telemetry, case, endpoint_kwargs
):
    """FastAPI turns the endpoint's result into plain data, then the response class
    renders it: one serialize stage per request covers both steps, whatever the route."""
    fastapi_responses = pytest.importorskip("fastapi.responses")

    render_started: list[int] = []

    class SlowTextResponse(fastapi_responses.Response):
        """A response class we do not wrap, whose render takes a known 20 ms."""

        media_type = "text/plain"

        def render(self, content) -> bytes:
            render_started.append(time.time_ns())
            time.sleep(0.02)
            return repr(content).encode()

    kwargs = dict(endpoint_kwargs)
    kwargs["response_class"] = {
        None: fastapi_responses.JSONResponse,
        "orjson": fastapi_responses.ORJSONResponse,
        "custom": SlowTextResponse,
    }[kwargs.get("response_class")]
    if kwargs["response_class"] is fastapi_responses.JSONResponse and "response_model" in kwargs:
        del kwargs["response_class"]  # the default: FastAPI's dump_json fast path
    payload = [SlowToRender(values=[i / 7 for i in range(400)]) for _ in range(20)]
    responses, spans, point = _fastapi_serialize_stages(telemetry, kwargs, lambda: payload)
    assert len(spans) == len(responses), case
    assert point.count == len(responses), case
    request_spans = {s.context.span_id for s in telemetry.spans("inference.request")}
    spans.sort(key=lambda span: span.start_time)
    for span, response in zip(spans, responses, strict=True):
        assert span.attributes[semconv.INFERENCE_SERIALIZE_BYTES] == len(response.content)
        assert span.parent.span_id in request_spans
    if render_started:
        # The stage opened at FastAPI's first step and closed after the render.
        for span, started in zip(spans, render_started, strict=True):
            assert span.start_time < started
            assert span.end_time - started >= 20_000_000
        assert point.min >= 0.02


def test_fastapi_first_step_no_response_claims_is_recorded_alone(instrumented, telemetry):
    """A first step (plain data) that no Response.__init__ follows is recorded on its
    own when the next one starts; the next one is claimed by its response as usual."""
    import asyncio

    routing = pytest.importorskip("fastapi.routing")
    responses = pytest.importorskip("starlette.responses")

    async def serve() -> bytes:
        with request():
            await routing.serialize_response(response_content={"a": 1})  # never rendered
            content = await routing.serialize_response(response_content={"b": [1, 2]})
            return responses.JSONResponse(content).body

    body = asyncio.run(serve())
    first, second = sorted(telemetry.spans(semconv.SERIALIZE), key=lambda span: span.start_time)
    assert semconv.INFERENCE_SERIALIZE_BYTES not in first.attributes  # no bytes: not rendered
    assert second.attributes[semconv.INFERENCE_SERIALIZE_BYTES] == len(body)
    assert first.end_time <= second.start_time
    assert telemetry.stage_points()["serialize"].count == 1  # one request


def test_uninstrument_restores_originals(telemetry):
    starlette_responses = pytest.importorskip("starlette.responses")
    fastapi_responses = pytest.importorskip("fastapi.responses")
    originals = {
        (json, "dumps"): json.dumps,
        (json, "loads"): json.loads,
        (orjson, "dumps"): orjson.dumps,
        (orjson, "loads"): orjson.loads,
        (msgpack, "packb"): msgpack.packb,
        (msgpack, "dumps"): msgpack.dumps,
        (msgpack, "unpackb"): msgpack.unpackb,
        (starlette_responses.JSONResponse, "render"): vars(starlette_responses.JSONResponse)[
            "render"
        ],
        (fastapi_responses.ORJSONResponse, "render"): vars(fastapi_responses.ORJSONResponse)[
            "render"
        ],
        (starlette_responses.Response, "__init__"): vars(starlette_responses.Response)["__init__"],
    }
    instrumentor = SerializersInstrumentor()
    instrumentor.instrument()
    assert all(vars(owner)[name] is not original for (owner, name), original in originals.items())
    instrumentor.uninstrument()
    assert all(vars(owner)[name] is original for (owner, name), original in originals.items())
    with request():
        orjson.dumps(PAYLOAD)
    assert telemetry.spans(semconv.SERIALIZE) == []


def test_loads_with_stdlib_json_only(tmp_path):
    """instrumentation_dependencies() is empty: with orjson, msgpack, starlette and
    fastapi all missing, the instrumentor still loads and instruments json."""
    code = """
import importlib.machinery, json, sys
HIDDEN = ("orjson", "msgpack", "starlette", "fastapi")
class Hide:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(name, name=name)
sys.meta_path.insert(0, Hide())
from tests.telemetry import Telemetry
from otel_inference import get_recorder, request
from otel_inference.instrumentation.serializers import SerializersInstrumentor
telemetry = Telemetry()
get_recorder().configure(telemetry.tracer_provider, telemetry.meter_provider, {})
instrumentor = SerializersInstrumentor()
assert list(instrumentor.instrumentation_dependencies()) == []
instrumentor.instrument(raise_exception_on_conflict=True)
with request():
    json.dumps({"a": 1})
print(json.dumps({"serialize": len(telemetry.spans("serialize")),
                  "orjson": "orjson" in sys.modules}))
"""
    completed = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ),
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == {
        "serialize": 1,
        "orjson": False,
    }

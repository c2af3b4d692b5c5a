"""Redis reads as feature_hydration stages, against a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.commands.core
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import StatusCode
from redis.backoff import NoBackoff
from redis.retry import Retry

from otel_inference import ConfigurationError, request
from otel_inference.instrumentation.redis import RedisFeatureInstrumentor
from otel_inference.instrumentation.redis import _wrappers as wrappers
from tests.servers import free_port

STAGE = "feature_hydration"
NO_RETRY = Retry(NoBackoff(), 0)


@pytest.fixture
def instrument() -> Iterator[Any]:
    """Call it (with instrument() kwargs) to instrument; always uninstrumented after."""
    instrumentor = RedisFeatureInstrumentor()

    def start(**kwargs: Any) -> RedisFeatureInstrumentor:
        instrumentor.instrument(**kwargs)
        return instrumentor

    yield start
    instrumentor.uninstrument()


@pytest.fixture
def client(redis_server) -> Iterator[redis.Redis]:
    client = redis.Redis(host=redis_server.host, port=redis_server.port, retry=NO_RETRY)
    yield client
    client.close()


@pytest.fixture
def ns() -> str:
    """A unique key namespace: tests share the session server."""
    return uuid.uuid4().hex[:12]


def stage_spans(telemetry) -> list[Any]:
    return telemetry.spans(STAGE)


def lookups(telemetry) -> dict[tuple[str, ...], int]:
    points = telemetry.metric_points("inference.cache.lookups")
    return {tuple(sorted(dict(p.attributes).values())): p.value for p in points}


def stage_count(telemetry, key: str = STAGE) -> int:
    point = telemetry.stage_points().get(key)
    return 0 if point is None else point.count


# --- single commands -------------------------------------------------------------


def test_get_hit_and_miss_sampled(telemetry, instrument, client, redis_server, ns):
    client.set(f"{ns}:a", b"1")
    instrument()

    assert client.get(f"{ns}:a") == b"1"
    assert client.get(f"{ns}:missing") is None

    hit, miss = stage_spans(telemetry)
    assert hit.attributes["inference.cache.hits"] == 1
    assert hit.attributes["inference.cache.misses"] == 0
    assert hit.attributes["inference.cache.hit_ratio"] == 1.0
    assert miss.attributes["inference.cache.hits"] == 0
    assert miss.attributes["inference.cache.misses"] == 1
    assert miss.attributes["inference.cache.hit_ratio"] == 0.0
    attributes = hit.attributes
    assert attributes["inference.stage"] == STAGE
    assert attributes["db.system.name"] == "redis"
    assert attributes["db.operation.name"] == "GET"
    assert attributes["db.namespace"] == "0"
    assert attributes["server.address"] == redis_server.host
    assert attributes["server.port"] == redis_server.port
    assert "db.operation.batch.size" not in attributes
    assert stage_count(telemetry) == 2
    assert lookups(telemetry) == {("hit",): 1, ("miss",): 1}


def test_multi_key_reads_count_per_key(telemetry, instrument, client, ns):
    client.mset({f"{ns}:k0": "a", f"{ns}:k2": "b", f"{ns}:k4": "c"})
    client.hset(f"{ns}:h", mapping={"f1": "1", "f2": "2"})
    instrument()

    assert client.mget([f"{ns}:k{i}" for i in range(5)]) == [b"a", None, b"b", None, b"c"]
    assert client.hmget(f"{ns}:h", ["f1", "nope", "f2"]) == [b"1", None, b"2"]
    assert client.exists(f"{ns}:k0", f"{ns}:k1", f"{ns}:h") == 2
    assert client.hgetall(f"{ns}:h") == {b"f1": b"1", b"f2": b"2"}
    assert client.hgetall(f"{ns}:nothing") == {}  # empty: a miss
    assert client.hget(f"{ns}:h", "f1") == b"1"

    counts = {
        s.attributes["db.operation.name"]: (
            s.attributes["inference.cache.hits"],
            s.attributes["inference.cache.misses"],
        )
        for s in stage_spans(telemetry)[:4]
    }
    assert counts == {"MGET": (3, 2), "HMGET": (2, 1), "EXISTS": (2, 1), "HGETALL": (1, 0)}
    hgetall_miss = stage_spans(telemetry)[4]
    assert hgetall_miss.attributes["inference.cache.misses"] == 1
    assert stage_count(telemetry) == 6
    assert lookups(telemetry) == {("hit",): 3 + 2 + 2 + 1 + 0 + 1, ("miss",): 2 + 1 + 1 + 0 + 1}


def test_writes_are_not_stages(telemetry, instrument, client, ns):
    instrument()
    client.set(f"{ns}:a", "1")
    client.hset(f"{ns}:h", "f", "v")
    client.delete(f"{ns}:a")
    client.incr(f"{ns}:n")
    assert stage_spans(telemetry) == []
    assert stage_count(telemetry) == 0
    assert lookups(telemetry) == {}


def test_no_keys_or_values_in_telemetry(telemetry, instrument, client):
    key, value = "secretkey-4c1d", "secretvalue-9e7a"
    client.set(key, value)
    client.hset("secrethash-77", "secretfield-55", value)
    instrument(key_prefix=True)
    client.get(key)
    client.mget([key, "secretmissing-1b"])
    client.hmget("secrethash-77", ["secretfield-55"])
    with client.pipeline() as pipe:
        pipe.get(key).hgetall("secrethash-77")
        pipe.execute()
    # Error messages that name keys: a failing pipeline command, an echoed argument.
    with pytest.raises(redis.ResponseError, match="secrethash-77"), client.pipeline() as pipe:
        pipe.get("secrethash-77")
        pipe.execute()
    # Without the JSON module the server echoes the key in "unknown command".
    with contextlib.suppress(redis.ResponseError):
        client.json().get("secretdoc-31")

    dumped = [span.to_json() for span in telemetry.spans()]
    data = telemetry.metric_reader.get_metrics_data()
    dumped.append(data.to_json())
    assert len(stage_spans(telemetry)) >= 5
    assert "WRONGTYPE" in dumped[4]  # the error itself is still recorded
    for needle in ("secret",):
        assert not any(needle in text for text in dumped), needle


def test_unsampled_records_histogram_and_counters_only(unsampled_telemetry, instrument, client, ns):
    client.set(f"{ns}:a", "1")
    instrument()
    with request():  # an unsampled request: the cheap path
        assert client.mget([f"{ns}:a", f"{ns}:b"]) == [b"1", None]
        with client.pipeline() as pipe:
            pipe.get(f"{ns}:a").get(f"{ns}:b")
            assert pipe.execute() == [b"1", None]

    assert unsampled_telemetry.spans() == []
    # Two reads (the MGET, the pipeline) in one request: one feature_hydration value.
    assert stage_count(unsampled_telemetry) == 1
    (calls,) = unsampled_telemetry.metric_points("inference.stage.calls")
    assert calls.sum == 2
    assert lookups(unsampled_telemetry) == {("hit",): 2, ("miss",): 2}


def test_stage_inside_request_is_its_child(telemetry, instrument, client, ns):
    instrument()
    with request():
        client.get(f"{ns}:a")
    (stage,) = stage_spans(telemetry)
    (req,) = telemetry.spans("inference.request")
    assert stage.parent.span_id == req.context.span_id
    assert stage_count(telemetry) == 1


def test_suppressed_instrumentation_records_nothing(telemetry, instrument, client, ns):
    instrument()
    with suppress_instrumentation():
        client.get(f"{ns}:a")
        with client.pipeline() as pipe:
            pipe.get(f"{ns}:a")
            pipe.execute()
    assert telemetry.spans() == []
    assert stage_count(telemetry) == 0


# --- pipelines ------------------------------------------------------------------


@pytest.mark.parametrize("transaction", [False, True])
def test_pipeline_is_one_stage_with_summed_counts(telemetry, instrument, client, ns, transaction):
    client.mset({f"{ns}:a": "1", f"{ns}:b": "2"})
    instrument()
    with client.pipeline(transaction=transaction) as pipe:
        pipe.get(f"{ns}:a")
        pipe.set(f"{ns}:w", "x")
        pipe.mget([f"{ns}:a", f"{ns}:b", f"{ns}:c"])
        pipe.hgetall(f"{ns}:none")
        assert pipe.execute() == [b"1", True, [b"1", b"2", None], {}]

    (span,) = stage_spans(telemetry)
    assert span.attributes["db.operation.batch.size"] == 4
    assert span.attributes["db.operation.name"] == "BATCH"
    assert span.attributes["inference.cache.hits"] == 3
    assert span.attributes["inference.cache.misses"] == 2
    assert span.attributes["inference.cache.hit_ratio"] == pytest.approx(0.6)
    assert stage_count(telemetry) == 1
    assert lookups(telemetry) == {("hit",): 3, ("miss",): 2}


def test_pipeline_of_one_command_kind(telemetry, instrument, client, ns):
    instrument()
    with client.pipeline() as pipe:
        pipe.get(f"{ns}:a").get(f"{ns}:b")
        pipe.execute()
    with client.pipeline() as pipe:
        pipe.get(f"{ns}:a")
        pipe.execute()
    batch, single = stage_spans(telemetry)
    assert batch.attributes["db.operation.name"] == "BATCH GET"
    assert batch.attributes["db.operation.batch.size"] == 2
    assert single.attributes["db.operation.name"] == "GET"
    assert "db.operation.batch.size" not in single.attributes


def test_write_only_pipeline_is_untouched(telemetry, instrument, client, ns):
    instrument()
    pipe = client.pipeline()
    pipe.set(f"{ns}:a", "1").incr(f"{ns}:n")
    assert "execute" not in pipe.__dict__
    assert pipe.execute() == [True, 1]
    assert stage_spans(telemetry) == []
    assert stage_count(telemetry) == 0


def test_pipeline_hook_is_one_shot_and_reusable(telemetry, instrument, client, ns):
    instrument()
    pipe = client.pipeline(transaction=False)
    pipe.get(f"{ns}:a")
    assert "execute" in pipe.__dict__  # installed by the queued read
    pipe.execute()
    assert "execute" not in pipe.__dict__  # removed: no lasting pipeline <-> hook cycle
    pipe.get(f"{ns}:b")
    pipe.execute()
    assert len(stage_spans(telemetry)) == 2


def test_watched_read_runs_now_and_is_a_stage(telemetry, instrument, client, ns):
    client.set(f"{ns}:balance", "10")
    instrument()
    with client.pipeline() as pipe:
        pipe.watch(f"{ns}:balance")
        assert pipe.get(f"{ns}:balance") == b"10"  # immediate, before MULTI
        pipe.multi()
        pipe.set(f"{ns}:balance", "9")
        assert pipe.execute() == [True]  # writes only: not a stage
    (span,) = stage_spans(telemetry)
    assert span.attributes["db.operation.name"] == "GET"
    assert span.attributes["inference.cache.hits"] == 1


def test_pipeline_errors_in_results_are_not_lookups(telemetry, instrument, client, ns):
    client.hset(f"{ns}:h", "f", "v")
    client.set(f"{ns}:a", "1")
    instrument()
    with client.pipeline(transaction=False) as pipe:
        pipe.get(f"{ns}:h")  # WRONGTYPE
        pipe.get(f"{ns}:a")
        results = pipe.execute(raise_on_error=False)
    assert isinstance(results[0], redis.ResponseError)
    (span,) = stage_spans(telemetry)
    assert (span.attributes["inference.cache.hits"], span.attributes["inference.cache.misses"]) == (
        1,
        0,
    )
    assert span.status.status_code is StatusCode.UNSET


# --- asyncio ----------------------------------------------------------------------


def test_asyncio_client_and_pipeline(telemetry, instrument, redis_server, ns):
    instrument()

    async def main() -> list[Any]:
        client = redis.asyncio.Redis(host=redis_server.host, port=redis_server.port)
        try:
            await client.set(f"{ns}:a", "1")  # a write: not a stage
            got = [await client.get(f"{ns}:a"), await client.mget(f"{ns}:a", f"{ns}:b")]
            async with client.pipeline(transaction=True) as pipe:
                pipe.get(f"{ns}:a").hget(f"{ns}:h", "f").set(f"{ns}:c", "3")
                got.append(await pipe.execute())
            return got
        finally:
            await client.aclose()

    assert asyncio.run(main()) == [b"1", [b"1", None], [b"1", None, True]]
    get, mget, pipeline = stage_spans(telemetry)
    assert (get.attributes["db.operation.name"], get.attributes["inference.cache.hits"]) == (
        "GET",
        1,
    )
    assert mget.attributes["inference.cache.misses"] == 1
    assert pipeline.attributes["db.operation.batch.size"] == 3
    assert (
        pipeline.attributes["inference.cache.hits"],
        pipeline.attributes["inference.cache.misses"],
    ) == (1, 1)
    assert get.attributes["server.port"] == redis_server.port
    assert stage_count(telemetry) == 3
    assert lookups(telemetry) == {("hit",): 3, ("miss",): 2}


def test_asyncio_connection_refused(telemetry, instrument):
    instrument()

    async def main() -> None:
        client = redis.asyncio.Redis(host="127.0.0.1", port=free_port(), retry=NO_RETRY)
        try:
            await client.get("a")
        finally:
            await client.aclose()

    with pytest.raises(redis.ConnectionError):
        asyncio.run(main())
    (span,) = stage_spans(telemetry)
    assert span.attributes["error.type"] == "ConnectionError"
    assert stage_count(telemetry, f"{STAGE}!ConnectionError") == 1


# --- errors -----------------------------------------------------------------------


def _raised(call) -> BaseException:
    try:
        call()
    except BaseException as exc:  # what the caller sees
        return exc
    raise AssertionError("expected an exception")


def test_connection_refused_reaches_caller_unchanged(telemetry, instrument):
    port = free_port()
    plain = redis.Redis(host="127.0.0.1", port=port, retry=NO_RETRY)
    expected = _raised(lambda: plain.get("a"))
    instrument()
    client = redis.Redis(host="127.0.0.1", port=port, retry=NO_RETRY)
    seen = _raised(lambda: client.get("a"))
    assert type(seen) is type(expected) is redis.ConnectionError
    assert str(seen) == str(expected)

    (span,) = stage_spans(telemetry)
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "ConnectionError"
    assert "inference.cache.hits" in span.attributes
    assert stage_count(telemetry, f"{STAGE}!ConnectionError") == 1
    assert lookups(telemetry) == {}


def test_server_stopped_mid_test(telemetry, instrument, redis_server_factory):
    server = redis_server_factory()
    client = redis.Redis(host=server.host, port=server.port, retry=NO_RETRY)
    client.set("k:1", "v")
    instrument()
    assert client.get("k:1") == b"v"
    server.stop()
    with pytest.raises(redis.ConnectionError):
        client.get("k:1")
    with pytest.raises(redis.ConnectionError), client.pipeline() as pipe:
        pipe.get("k:1").get("k:2")
        pipe.execute()
    server.start()  # same port, empty data
    assert client.get("k:1") is None

    spans = stage_spans(telemetry)
    assert [s.attributes.get("error.type") for s in spans] == [
        None,
        "ConnectionError",
        "ConnectionError",
        None,
    ]
    assert spans[2].attributes["db.operation.batch.size"] == 2
    assert stage_count(telemetry) == 2
    assert stage_count(telemetry, f"{STAGE}!ConnectionError") == 2
    assert lookups(telemetry) == {("hit",): 1, ("miss",): 1}
    client.close()


def test_wrongtype_reaches_caller_unchanged(telemetry, instrument, client, ns):
    client.hset(f"{ns}:h", "f", "v")
    instrument()
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        client.get(f"{ns}:h")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"), client.pipeline() as pipe:
        pipe.get(f"{ns}:h")
        pipe.execute()
    for span in stage_spans(telemetry):
        assert span.attributes["error.type"] == "ResponseError"
        assert span.attributes["db.response.status_code"] == "WRONGTYPE"
        assert span.status.status_code is StatusCode.ERROR
    assert len(stage_spans(telemetry)) == 2
    assert stage_count(telemetry, f"{STAGE}!ResponseError") == 2


def test_json_get_is_a_stage(telemetry, instrument, client, ns):
    instrument()
    try:
        value = client.json().get(f"{ns}:doc")
    except redis.ResponseError:  # redis-server without the JSON module
        (span,) = stage_spans(telemetry)
        assert span.attributes["db.operation.name"] == "JSON.GET"
        assert span.attributes["error.type"] == "ResponseError"
        return
    assert value is None
    (span,) = stage_spans(telemetry)
    assert span.attributes["inference.cache.misses"] == 1


def test_instrumentation_error_never_breaks_the_call(
    telemetry, instrument, client, ns, monkeypatch, caplog
):
    def broken(result: Any, nkeys: int) -> tuple[int, int]:
        raise RuntimeError("bug in counting")

    monkeypatch.setattr(wrappers, "_count_one", broken)
    monkeypatch.setitem(
        wrappers._COMMANDS, "GET", wrappers.Command("GET", lambda r, n: broken(r, n))
    )
    client.set(f"{ns}:a", "1")
    instrument()
    with caplog.at_level(logging.WARNING, logger="otel_inference.stages"):
        assert client.get(f"{ns}:a") == b"1"
        assert client.get(f"{ns}:a") == b"1"
    assert stage_count(telemetry) == 2  # the stage is still recorded
    messages = [r.getMessage() for r in caplog.records if "count Redis" in r.getMessage()]
    assert len(messages) <= 1  # logged once per process


# --- configuration and lifecycle ------------------------------------------------------


def test_uninstrument_restores_originals(telemetry, client, ns):
    originals = {
        (owner, name): owner.__dict__[name]
        for owner, name, _ in wrappers.resolve_methods(("GET", "MGET", "EXISTS", "JSON.GET"))
    }
    instrumentor = RedisFeatureInstrumentor()
    instrumentor.instrument()
    assert all(owner.__dict__[name] is not fn for (owner, name), fn in originals.items())
    instrumentor.uninstrument()
    assert all(owner.__dict__[name] is fn for (owner, name), fn in originals.items())
    client.get(f"{ns}:a")
    assert telemetry.spans() == []


def test_commands_setting_from_env(telemetry, instrument, client, ns, monkeypatch):
    monkeypatch.setenv("OTEL_INFERENCE_REDIS_COMMANDS", "+ZSCORE,-MGET")
    client.zadd(f"{ns}:z", {"m": 1.5})
    instrument()
    assert client.zscore(f"{ns}:z", "m") == 1.5
    client.mget([f"{ns}:a"])
    client.get(f"{ns}:a")
    assert [s.attributes["db.operation.name"] for s in stage_spans(telemetry)] == ["ZSCORE", "GET"]


def test_commands_argument_wins(telemetry, instrument, client, ns, monkeypatch):
    monkeypatch.setenv("OTEL_INFERENCE_REDIS_COMMANDS", "GET")
    instrument(commands=["hget"])
    client.get(f"{ns}:a")
    client.hget(f"{ns}:h", "f")
    assert [s.attributes["db.operation.name"] for s in stage_spans(telemetry)] == ["HGET"]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_INFERENCE_REDIS_COMMANDS", "GET;FLUSHALL"),
        ("OTEL_INFERENCE_REDIS_COMMANDS", "GET,+ZSCORE"),
        ("OTEL_INFERENCE_REDIS_COMMANDS", "NOSUCHCOMMAND"),
        ("OTEL_INFERENCE_REDIS_KEY_PREFIX", "maybe"),
        ("OTEL_INFERENCE_REDIS_KEY_PREFIX_LIMIT", "0"),
    ],
)
def test_bad_setting_raises_naming_the_variable(telemetry, monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    original = redis.commands.core.BasicKeyCommands.__dict__["get"]
    instrumentor = RedisFeatureInstrumentor()
    with pytest.raises(ConfigurationError, match=variable):
        instrumentor.instrument()
    try:
        assert redis.commands.core.BasicKeyCommands.__dict__["get"] is original
    finally:
        instrumentor.uninstrument()


def test_key_prefix_groups_are_opt_in_and_bounded(telemetry, instrument, client, ns):
    client.mset({f"user:{ns}": "1", f"item:{ns}": "2"})
    instrument(key_prefix=True, key_prefix_limit=2)
    client.mget([f"user:{ns}", f"user:{ns}x", f"item:{ns}"])
    client.get(f"ctx:{ns}")  # third prefix: over the limit
    client.get(f"plainkey{ns}")  # no prefix
    client.get(f"{'x' * 40}:{ns}")  # too long to be a group name
    assert lookups(telemetry) == {
        ("hit", "user"): 1,
        ("miss", "user"): 1,
        ("hit", "item"): 1,
        ("_other", "miss"): 2,
        ("_none", "miss"): 1,
    }
    assert stage_spans(telemetry)[0].attributes["inference.cache.feature_groups"] == (
        "item",
        "user",
    )


def test_key_prefix_off_by_default(telemetry, instrument, client, ns):
    instrument()
    client.get(f"user:{ns}")
    assert lookups(telemetry) == {("miss",): 1}
    assert "inference.cache.feature_groups" not in stage_spans(telemetry)[0].attributes


# --- packaging ----------------------------------------------------------------------


def test_entry_point_loads_the_instrumentor():
    from importlib.metadata import entry_points

    (entry_point,) = [
        e for e in entry_points(group="opentelemetry_instrumentor") if e.name == "inference_redis"
    ]
    assert entry_point.load() is RedisFeatureInstrumentor


def test_without_redis_only_instrument_fails_with_module_not_found():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['redis'] = None\n"
        "from otel_inference.instrumentation.redis import RedisFeatureInstrumentor\n"
        "try:\n"
        "    RedisFeatureInstrumentor().instrument()\n"
        "except ModuleNotFoundError as exc:\n"
        "    print('ModuleNotFoundError', exc.name)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ModuleNotFoundError redis"

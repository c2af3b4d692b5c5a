"""Wrappers that turn Redis reads into ``feature_hydration`` stages.

Where we wrap, and why:

* Single reads: the redis-py command METHODS (``get``, ``mget``, ``hgetall``...,
  on the command mixins the sync, asyncio and cluster clients share), not
  ``execute_command``. Writes are never touched (zero cost), and the contrib
  ``RedisInstrumentor`` (which wraps ``execute_command``) always runs INSIDE our
  stage, whatever order the two were instrumented in.
* Pipelines: a queued read installs a one-shot ``execute`` on that pipeline
  instance. Instance attributes win over class attributes, so our stage again
  encloses contrib's (class-level) pipeline span in either order; it removes
  itself when called, so there is no lasting reference cycle. Pipelines that
  queue no read (writes only) are never touched.

Hits and misses: ``None`` and empty containers (``HGETALL`` of a missing key)
are misses; ``MGET``/``HMGET``/``JSON.MGET`` count per key (field); ``EXISTS``
counts the keys that exist. A failed call counts nothing.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.client
import redis.asyncio.cluster
import redis.client
import redis.cluster
from opentelemetry.instrumentation.utils import is_instrumentation_enabled, unwrap
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.semconv.attributes.db_attributes import (
    DB_NAMESPACE,
    DB_OPERATION_BATCH_SIZE,
    DB_OPERATION_NAME,
    DB_RESPONSE_STATUS_CODE,
    DB_SYSTEM_NAME,
)
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS, SERVER_PORT
from wrapt import wrap_function_wrapper

from otel_inference import semconv
from otel_inference._fork import after_fork_in_child
from otel_inference.config import ConfigurationError
from otel_inference.instrumentation.redis._config import RedisSettings
from otel_inference.instrumentation.redis.environment_variables import (
    OTEL_INFERENCE_REDIS_COMMANDS,
)
from otel_inference.stages import StageRecorder, StageScope, log_once

try:  # redis-py >= 4.0 ships the JSON module commands
    from redis.commands.json.commands import JSONCommands
except ImportError:  # pragma: no cover - very old redis-py
    JSONCommands = None  # type: ignore[assignment,misc]

_REDIS = "redis"
_NO_GROUP = "_none"
_OTHER_GROUP = "_other"
_GROUP_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,32}$")
_MAX_CACHED_PREFIXES = 4096
_CONTAINERS = (dict, list, set, tuple)

# Every class whose instances run commands; a command method is wrapped on the
# class that defines it for each of these (usually one shared mixin).
_CLIENT_CLASSES: tuple[type, ...] = (
    redis.Redis,
    redis.client.Pipeline,
    redis.cluster.RedisCluster,
    redis.cluster.ClusterPipeline,
    redis.asyncio.Redis,
    redis.asyncio.client.Pipeline,
    redis.asyncio.cluster.RedisCluster,
    redis.asyncio.cluster.ClusterPipeline,
)
# Cluster clients split multi-slot reads across nodes with these.
_EXTRA_METHODS = {"MGET": ("mget_nonatomic",)}


# --- hit / miss counting -------------------------------------------------------


def _is_miss(value: Any) -> bool:
    return value is None or (isinstance(value, _CONTAINERS) and not value)


def _count_one(result: Any, _nkeys: int) -> tuple[int, int]:
    return (0, 1) if _is_miss(result) else (1, 0)


def _count_each(result: Any, nkeys: int) -> tuple[int, int]:
    if not isinstance(result, list):
        return _count_one(result, nkeys)
    misses = result.count(None)
    return len(result) - misses, misses


def _count_each_json(result: Any, nkeys: int) -> tuple[int, int]:
    if not isinstance(result, list):
        return _count_one(result, nkeys)
    misses = sum(1 for value in result if _is_miss(value))
    return len(result) - misses, misses


def _count_existing(result: Any, nkeys: int) -> tuple[int, int]:
    hits = int(result)
    return hits, max(nkeys - hits, 0)


def _first_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    if args:
        return [args[0]]
    name = kwargs.get("name")
    return [] if name is None else [name]


def _mget_keys(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    keys = args[0] if args else kwargs.get("keys")
    if isinstance(keys, (bytes, str, memoryview)) or not isinstance(keys, Iterable):
        return [keys, *args[1:]]
    return [*keys, *args[1:]]


def _exists_keys(args: tuple[Any, ...], _kwargs: dict[str, Any]) -> list[Any]:
    return list(args)


@dataclass(frozen=True)
class Command:
    """How one read command counts hits, and where its keys are (prefix opt-in)."""

    name: str
    count: Callable[[Any, int], tuple[int, int]] = _count_one
    # Results align with keys (one lookup per key): group each key separately.
    per_key: bool = False
    method_keys: Callable[[tuple[Any, ...], dict[str, Any]], list[Any]] = _first_key
    # Keys within the raw pipeline arguments (command name excluded).
    raw_keys: tuple[int, int | None] = (0, 1)

    def method_nkeys(self, args: tuple[Any, ...]) -> int:
        return len(args)


_COMMANDS: dict[str, Command] = {
    "MGET": Command("MGET", _count_each, True, _mget_keys, (0, None)),
    "HMGET": Command("HMGET", _count_each),
    "JSON.MGET": Command("JSON.MGET", _count_each_json, True, _mget_keys, (0, -1)),
    "EXISTS": Command("EXISTS", _count_existing, False, _exists_keys, (0, 1)),
}


def command_spec(name: str) -> Command:
    return _COMMANDS.get(name) or Command(name)


def resolve_methods(commands: Iterable[str]) -> list[tuple[type, str, Command]]:
    """The (defining class, method name) to wrap for each command, de-duplicated.

    Raises :class:`ConfigurationError` naming the variable for a command that
    redis-py has no method for.
    """
    targets: dict[tuple[type, str], Command] = {}
    for name in commands:
        spec = command_spec(name)
        if name.startswith("JSON."):
            if JSONCommands is None:
                continue
            classes: tuple[type, ...] = (JSONCommands,)
            methods: tuple[str, ...] = (name[5:].lower(),)
        else:
            classes = _CLIENT_CLASSES
            methods = (name.lower(), *_EXTRA_METHODS.get(name, ()))
        if not callable(getattr(classes[0], methods[0], None)):
            raise ConfigurationError(
                f"{OTEL_INFERENCE_REDIS_COMMANDS}: redis-py has no method for command {name!r} "
                f"(looked for {classes[0].__name__}.{methods[0]})"
            )
        for cls in classes:
            for method in methods:
                owner = next((k for k in cls.__mro__ if method in k.__dict__), None)
                if owner is not None and callable(owner.__dict__[method]):
                    targets.setdefault((owner, method), spec)
    return [(owner, method, spec) for (owner, method), spec in targets.items()]


# --- client kinds --------------------------------------------------------------

_OTHER, _SYNC, _ASYNC, _PIPE, _APIPE, _CPIPE, _ACPIPE, _JSON = range(8)
_KINDS: dict[type, int] = {}


def _kind_of_class(cls: type) -> int:
    if issubclass(cls, redis.asyncio.client.Pipeline):
        return _APIPE
    if issubclass(cls, redis.asyncio.cluster.ClusterPipeline):
        return _ACPIPE
    if issubclass(cls, redis.cluster.ClusterPipeline):  # before RedisCluster: a subclass
        return _CPIPE
    if issubclass(cls, redis.client.Pipeline):
        return _PIPE
    if issubclass(cls, (redis.asyncio.Redis, redis.asyncio.RedisCluster)):
        return _ASYNC
    if issubclass(cls, (redis.Redis, redis.cluster.RedisCluster)):
        return _SYNC
    if JSONCommands is not None and issubclass(cls, JSONCommands):
        marker = getattr(cls, "_is_async_client", None)  # redis-py >= 6
        if marker is None:
            return _JSON
        return _ASYNC if marker else _SYNC
    return _OTHER


def _kind(instance: Any) -> int:
    cls = type(instance)
    kind = _KINDS.get(cls)
    if kind is None:
        kind = _KINDS[cls] = _kind_of_class(cls)
    if kind == _JSON:  # older redis-py: one JSON class for both client kinds
        client = getattr(instance, "client", None)
        return (
            _ASYNC
            if isinstance(client, (redis.asyncio.Redis, redis.asyncio.RedisCluster))
            else _SYNC
        )
    return kind


def _runs_now(instance: Any, kind: int) -> bool:
    """Whether a pipeline runs a command immediately (after WATCH, before MULTI)."""
    if kind in (_PIPE, _APIPE):
        return bool(instance.watching) and not instance.explicit_transaction
    strategy = getattr(instance, "_execution_strategy", None)
    return bool(getattr(strategy, "_watching", False)) and not getattr(
        strategy, "_explicit_transaction", False
    )


def _queued_commands(pipeline: Any) -> list[Any]:
    strategy = getattr(pipeline, "_execution_strategy", None)
    if strategy is not None:
        queue = getattr(strategy, "command_queue", None)
        if queue is None:
            queue = getattr(strategy, "_command_queue", None)
        if queue is not None:
            return queue
    stack = getattr(pipeline, "command_stack", None)
    if stack is None:
        stack = getattr(pipeline, "_command_stack", ())
    return stack


def _command_args(entry: Any) -> tuple[Any, ...]:
    args = getattr(entry, "args", None)
    return args if args is not None else entry[0]


def _connection_attributes(instance: Any, attributes: dict[str, Any]) -> None:
    pool = getattr(instance, "connection_pool", None)
    if pool is None:  # JSON commands hold their client
        pool = getattr(getattr(instance, "client", None), "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    if not kwargs:
        return  # cluster: the node is chosen per command inside redis-py
    attributes[DB_NAMESPACE] = str(kwargs.get("db") or 0)
    if "path" in kwargs:
        attributes[SERVER_ADDRESS] = str(kwargs["path"])
    else:
        attributes[SERVER_ADDRESS] = str(kwargs.get("host", "localhost"))
        attributes[SERVER_PORT] = int(kwargs.get("port", 6379))


_PIPELINE_ERROR = re.compile(
    r"^Command # (\d+) \((.*?)\) of pipeline caused error: (.*)$", re.DOTALL
)
_ECHOED_ARGS = ", with args beginning with:"


def _server_message(exc: BaseException) -> str | None:
    """The server's error text with any echoed arguments (keys, values) cut off."""
    if not isinstance(exc, redis.exceptions.RedisError) or not exc.args:
        return None
    message = exc.args[0]
    if not isinstance(message, str):
        return None
    match = _PIPELINE_ERROR.match(message)
    if match is not None:  # redis-py prefixes the failing command, arguments included
        message = match.group(3)
    return message.split(_ECHOED_ARGS, 1)[0]


def _status_code(exc: BaseException) -> str | None:
    """The Redis error prefix (``WRONGTYPE``, ``ERR``) of a server error reply."""
    if not isinstance(exc, redis.exceptions.ResponseError):
        return None
    message = _server_message(exc)
    prefix = (message or "").split(" ", 1)[0]
    return prefix if prefix.isupper() and prefix.isalpha() and len(prefix) <= 32 else None


def _redacted(exc: BaseException) -> BaseException:
    """What the span records for ``exc``: the same type, its message without keys.

    redis-py puts a failing pipeline command's arguments in the message, and the
    server echoes arguments of unknown commands; both may hold keys or values. The
    caller still gets the original exception.
    """
    message = _server_message(exc)
    if message is None or message == exc.args[0]:
        return exc
    match = _PIPELINE_ERROR.match(exc.args[0])
    if match is not None:
        command = match.group(2).split(" ", 1)[0]
        message = f"Command # {match.group(1)} ({command} ...) of pipeline caused error: {message}"
    try:
        redacted = copy.copy(exc)
        redacted.args = (message, *exc.args[1:])
        redacted.__traceback__ = exc.__traceback__
        return redacted
    except Exception:
        return redis.exceptions.RedisError(message)


# --- instruments ---------------------------------------------------------------


class Lookups:
    """The ``inference.cache.lookups`` counter, aggregated in process.

    An SDK ``Counter.add`` costs about as much as the histogram record (attribute
    hashing, exemplar offer), and a read adds up to two of them. Here a read adds
    ints under a lock, and an observable counter reports the cumulative totals at
    each collection: the same monotonic sum, a fraction of the cost.
    """

    def __init__(self, meter: Meter) -> None:
        self._lock = threading.Lock()
        self._totals: dict[tuple[str, str | None], int] = {}
        self._attributes: dict[tuple[str, str | None], dict[str, str]] = {}
        meter.create_observable_counter(
            semconv.CACHE_LOOKUPS,
            callbacks=[self._observe],
            unit="{lookup}",
            description="Feature (cache) lookups by result, hit or miss: one per key",
        )
        after_fork_in_child(self._after_fork_in_child)

    def _after_fork_in_child(self) -> None:
        # The totals so far are the parent's (it reports them): count afresh.
        self._lock = threading.Lock()
        self._totals = {}

    def add(self, hits: int, misses: int, group: str | None = None) -> None:
        with self._lock:
            totals = self._totals
            if hits:
                key = ("hit", group)
                totals[key] = totals.get(key, 0) + hits
            if misses:
                key = ("miss", group)
                totals[key] = totals.get(key, 0) + misses

    def _observe(self, _options: CallbackOptions) -> list[Observation]:
        with self._lock:
            totals = list(self._totals.items())
        return [Observation(value, self._attributes_of(key)) for key, value in totals]

    def _attributes_of(self, key: tuple[str, str | None]) -> dict[str, str]:
        attributes = self._attributes.get(key)
        if attributes is None:
            result, group = key
            attributes = {semconv.CACHE_RESULT: result}
            if group is not None:
                attributes[semconv.CACHE_FEATURE_GROUP] = group
            self._attributes[key] = attributes
        return attributes


# One per meter: a second observable counter of the same name on the same meter
# would be refused by the SDK (and its counts lost) when a recorder is re-bound.
_lookups_lock = threading.Lock()
_lookups_by_meter: weakref.WeakKeyDictionary[Meter, Lookups] = weakref.WeakKeyDictionary()


def lookups_for(meter: Meter) -> Lookups:
    """``StageRecorder.instruments`` factory: the lookups counter of ``meter``."""
    with _lookups_lock:
        lookups = _lookups_by_meter.get(meter)
        if lookups is None:
            lookups = _lookups_by_meter[meter] = Lookups(meter)
        return lookups


# --- the tracker: one per instrument() call --------------------------------------


class Tracker:
    """Records stages through one recorder with one configuration."""

    def __init__(self, recorder: StageRecorder, settings: RedisSettings) -> None:
        self.recorder = recorder
        self.settings = settings
        self.active = True
        self.specs = {name: command_spec(name) for name in settings.commands}
        self.wrapped: list[tuple[type, str, Any]] = []
        self._prefix = settings.key_prefix
        self._groups: dict[str, str] = {}
        self._admitted: set[str] = set()

    # feature groups (opt-in) ---------------------------------------------------

    def group(self, key: Any) -> str:
        if isinstance(key, (bytes, bytearray, memoryview)):
            head, sep, _ = bytes(key).partition(b":")
            prefix = head.decode("utf-8", "replace")
        elif isinstance(key, str):
            prefix, sep, _ = key.partition(":")
        else:
            return _NO_GROUP
        if not sep:
            return _NO_GROUP  # never the whole key
        group = self._groups.get(prefix)
        if group is None:
            admitted = self._admitted
            if prefix in admitted or (
                len(admitted) < self.settings.key_prefix_limit and _GROUP_NAME.match(prefix)
            ):
                admitted.add(prefix)
                group = prefix
            else:
                group = _OTHER_GROUP
            if len(self._groups) < _MAX_CACHED_PREFIXES:
                self._groups[prefix] = group
        return group

    def _grouped_counts(
        self, spec: Command, keys: list[Any], result: Any, nkeys: int
    ) -> dict[str, list[int]]:
        counts: dict[str, list[int]] = {}
        if spec.per_key and isinstance(result, list) and len(result) == len(keys):
            for key, value in zip(keys, result, strict=True):
                tally = counts.setdefault(self.group(key), [0, 0])
                tally[1 if _is_miss(value) else 0] += 1
        else:
            hits, misses = spec.count(result, nkeys)
            counts[self.group(keys[0]) if keys else _NO_GROUP] = [hits, misses]
        return counts

    # recording -----------------------------------------------------------------

    def finish(
        self,
        scope: StageScope,
        start_ns: int,
        exc: BaseException | None,
        instance: Any,
        operation: str,
        batch_size: int,
        hits: int,
        misses: int,
        groups: dict[str, list[int]] | None,
    ) -> None:
        duration_ns = perf_counter_ns() - start_ns
        scope.exit_context()
        try:
            if scope.is_recording:
                attributes: dict[str, Any] = {
                    DB_SYSTEM_NAME: _REDIS,
                    DB_OPERATION_NAME: operation,
                    semconv.CACHE_HITS: hits,
                    semconv.CACHE_MISSES: misses,
                }
                if hits + misses:
                    attributes[semconv.CACHE_HIT_RATIO] = hits / (hits + misses)
                if batch_size > 1:
                    attributes[DB_OPERATION_BATCH_SIZE] = batch_size
                if groups:
                    attributes[semconv.CACHE_FEATURE_GROUPS] = sorted(groups)
                if exc is not None:
                    status = _status_code(exc)
                    if status is not None:
                        attributes[DB_RESPONSE_STATUS_CODE] = status
                _connection_attributes(instance, attributes)
                scope.record(duration_ns, None if exc is None else _redacted(exc), **attributes)
            else:
                scope.record(duration_ns, exc)
            if hits or misses:
                lookups = self.recorder.instruments(lookups_for)
                if groups is None:
                    lookups.add(hits, misses)
                else:
                    for group, (group_hits, group_misses) in groups.items():
                        lookups.add(group_hits, group_misses, group)
        except Exception:
            log_once("redis-record", "otel-inference: failed to record a Redis stage")

    def _tally_call(
        self, spec: Command, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> tuple[int, int, dict[str, list[int]] | None]:
        try:
            if self._prefix:
                groups = self._grouped_counts(
                    spec, spec.method_keys(args, kwargs), result, spec.method_nkeys(args)
                )
                return (
                    sum(c[0] for c in groups.values()),
                    sum(c[1] for c in groups.values()),
                    groups,
                )
            hits, misses = spec.count(result, len(args))
            return hits, misses, None
        except Exception:
            log_once("redis-count", "otel-inference: failed to count Redis hits and misses")
            return 0, 0, None

    def call(
        self, spec: Command, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: Any
    ) -> Any:
        scope = self.recorder.start(semconv.FEATURE_HYDRATION)
        start_ns = perf_counter_ns()
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as exc:
            self.finish(scope, start_ns, exc, instance, spec.name, 1, 0, 0, None)
            raise
        hits, misses, groups = self._tally_call(spec, args, kwargs, result)
        self.finish(scope, start_ns, None, instance, spec.name, 1, hits, misses, groups)
        return result

    async def call_async(
        self, spec: Command, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: Any
    ) -> Any:
        scope = self.recorder.start(semconv.FEATURE_HYDRATION)
        start_ns = perf_counter_ns()
        try:
            result = await wrapped(*args, **kwargs)
        except BaseException as exc:
            self.finish(scope, start_ns, exc, instance, spec.name, 1, 0, 0, None)
            raise
        hits, misses, groups = self._tally_call(spec, args, kwargs, result)
        self.finish(scope, start_ns, None, instance, spec.name, 1, hits, misses, groups)
        return result

    # pipelines -------------------------------------------------------------------

    def hook(self, pipeline: Any, is_async: bool) -> None:
        """Make the next ``pipeline.execute()`` a stage (see the module docstring)."""
        try:
            namespace = pipeline.__dict__
        except AttributeError:
            return
        previous = namespace.get("execute")
        if type(previous) is not _PipelineExecute:
            namespace["execute"] = _PipelineExecute(self, pipeline, previous, is_async)

    def _queued_reads(
        self, pipeline: Any
    ) -> tuple[int, list[tuple[int, Command, tuple[Any, ...]]]]:
        try:
            stack = _queued_commands(pipeline)
            specs = self.specs
            reads = []
            for index, entry in enumerate(stack):
                args = _command_args(entry)
                spec = specs.get(args[0]) if args else None
                if spec is not None:
                    reads.append((index, spec, args))
            return len(stack), reads
        except Exception:
            log_once("redis-queue", "otel-inference: failed to read a Redis pipeline's commands")
            return 0, []

    def _tally_pipeline(
        self, reads: list[tuple[int, Command, tuple[Any, ...]]], results: Any
    ) -> tuple[int, int, dict[str, list[int]] | None]:
        hits = misses = 0
        groups: dict[str, list[int]] | None = {} if self._prefix else None
        try:
            if not isinstance(results, list):
                return 0, 0, groups
            for index, spec, args in reads:
                if index >= len(results):
                    break
                result = results[index]
                if isinstance(result, Exception):  # raise_on_error=False
                    continue
                if groups is not None:
                    start, stop = spec.raw_keys
                    keys = list(args[1:][start:stop])
                    for group, (h, m) in self._grouped_counts(
                        spec, keys, result, len(args) - 1
                    ).items():
                        tally = groups.setdefault(group, [0, 0])
                        tally[0] += h
                        tally[1] += m
                        hits += h
                        misses += m
                else:
                    h, m = spec.count(result, len(args) - 1)
                    hits += h
                    misses += m
        except Exception:
            log_once("redis-count", "otel-inference: failed to count Redis hits and misses")
        return hits, misses, groups

    @staticmethod
    def _batch_operation(batch_size: int, stack: Any) -> str:
        names = {str(_command_args(entry)[0]) for entry in stack}
        if len(names) == 1:
            name = names.pop()
            return name if batch_size == 1 else f"BATCH {name}"
        return "BATCH"

    def _open_pipeline(self, pipeline: Any) -> tuple[Any, ...] | None:
        if not (self.active and is_instrumentation_enabled()):
            return None
        batch_size, reads = self._queued_reads(pipeline)
        if not reads:
            return None  # writes only: not a stage
        try:
            operation = self._batch_operation(batch_size, _queued_commands(pipeline))
        except Exception:
            operation = "BATCH"
        return batch_size, reads, operation

    def execute(self, pipeline: Any, args: tuple[Any, ...], kwargs: Any) -> Any:
        opened = self._open_pipeline(pipeline)
        if opened is None:
            return pipeline.execute(*args, **kwargs)
        batch_size, reads, operation = opened
        scope = self.recorder.start(semconv.FEATURE_HYDRATION)
        start_ns = perf_counter_ns()
        try:
            results = pipeline.execute(*args, **kwargs)
        except BaseException as exc:
            self.finish(scope, start_ns, exc, pipeline, operation, batch_size, 0, 0, None)
            raise
        hits, misses, groups = self._tally_pipeline(reads, results)
        self.finish(scope, start_ns, None, pipeline, operation, batch_size, hits, misses, groups)
        return results

    async def execute_async(self, pipeline: Any, args: tuple[Any, ...], kwargs: Any) -> Any:
        opened = self._open_pipeline(pipeline)
        if opened is None:
            return await pipeline.execute(*args, **kwargs)
        batch_size, reads, operation = opened
        scope = self.recorder.start(semconv.FEATURE_HYDRATION)
        start_ns = perf_counter_ns()
        try:
            results = await pipeline.execute(*args, **kwargs)
        except BaseException as exc:
            self.finish(scope, start_ns, exc, pipeline, operation, batch_size, 0, 0, None)
            raise
        hits, misses, groups = self._tally_pipeline(reads, results)
        self.finish(scope, start_ns, None, pipeline, operation, batch_size, hits, misses, groups)
        return results


class _PipelineExecute:
    """One-shot ``execute`` placed on a pipeline instance that queued a read."""

    __slots__ = ("_is_async", "_pipeline", "_previous", "_tracker")

    def __init__(self, tracker: Tracker, pipeline: Any, previous: Any, is_async: bool) -> None:
        self._tracker = tracker
        self._pipeline = pipeline
        self._previous = previous
        self._is_async = is_async

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        pipeline = self._pipeline
        try:
            # Remove ourselves first: pipeline.execute below is the class's (or
            # another instrumentation's instance-level) execute, and no cycle stays.
            namespace = pipeline.__dict__
            if namespace.get("execute") is self:
                if self._previous is None:
                    del namespace["execute"]
                else:
                    namespace["execute"] = self._previous
        except Exception:
            log_once("redis-unhook", "otel-inference: failed to restore a pipeline's execute")
        if self._is_async:
            return self._tracker.execute_async(pipeline, args, kwargs)
        return self._tracker.execute(pipeline, args, kwargs)


def _command_wrapper(tracker: Tracker, spec: Command) -> Callable[..., Any]:
    def wrapper(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: Any) -> Any:
        if not is_instrumentation_enabled() or not tracker.active:
            return wrapped(*args, **kwargs)
        kind = _KINDS.get(type(instance))
        if kind is None or kind == _JSON:
            try:
                kind = _kind(instance)
            except Exception:
                log_once("redis-kind", "otel-inference: unknown Redis client type")
                kind = _OTHER
        if kind == _SYNC:
            return tracker.call(spec, wrapped, instance, args, kwargs)
        if kind == _ASYNC:
            return tracker.call_async(spec, wrapped, instance, args, kwargs)
        if kind == _OTHER:
            return wrapped(*args, **kwargs)
        is_async = kind in (_APIPE, _ACPIPE)
        try:
            now = _runs_now(instance, kind)
        except Exception:
            now = False
        if now:  # WATCHed read, answered immediately
            if is_async:
                return tracker.call_async(spec, wrapped, instance, args, kwargs)
            return tracker.call(spec, wrapped, instance, args, kwargs)
        result = wrapped(*args, **kwargs)
        tracker.hook(instance, is_async)
        return result

    return wrapper


def instrument(recorder: StageRecorder, settings: RedisSettings) -> Tracker:
    tracker = Tracker(recorder, settings)
    for owner, method, spec in resolve_methods(settings.commands):
        wrapper = _command_wrapper(tracker, spec)
        wrap_function_wrapper(owner, method, wrapper)
        tracker.wrapped.append((owner, method, wrapper))
    return tracker


def uninstrument(tracker: Tracker) -> None:
    tracker.active = False  # live pipeline hooks and any stacked layer pass through
    for owner, method, wrapper in tracker.wrapped:
        current = owner.__dict__.get(method)
        # Only remove our own layer: unwrap() takes off whatever is on top.
        if getattr(current, "_self_wrapper", None) is wrapper:
            unwrap(owner, method)
        else:
            log_once(
                f"redis-unwrap-{owner.__name__}.{method}",
                "otel-inference: %s.%s was wrapped again after us; leaving an inert layer",
                owner.__name__,
                method,
                level=logging.DEBUG,
            )
    tracker.wrapped.clear()

"""
Record Redis reads as ``feature_hydration`` stages, with cache hits and misses.

Every read (``GET``, ``MGET``, ``HGET``, ``HMGET``, ``HGETALL``, ``EXISTS``,
``JSON.GET`` by default) of the redis-py sync, asyncio and cluster clients is a
``feature_hydration`` stage: its duration goes into ``inference.stage.duration``
and its per-key lookups into the ``inference.cache.lookups`` counter
(``inference.cache.result`` = ``hit`` | ``miss``) for every call; a sampled
request also gets a stage span with ``inference.cache.hits``/``misses``/
``hit_ratio`` and the Redis semantic conventions (``db.system.name``,
``db.operation.name``, ``db.namespace``, ``server.address``/``server.port``,
``db.operation.batch.size`` for pipelines, ``error.type`` on failure). A pipeline
that queues reads is one stage with summed counts. Writes are not stages.

Keys and values are never recorded. Opt in to a bounded feature-group label
(the key's text before its first ``:``) with ``key_prefix=True`` or
:envvar:`OTEL_INFERENCE_REDIS_KEY_PREFIX`.

Usage
-----

.. code:: python

    import redis
    from otel_inference.instrumentation.redis import RedisFeatureInstrumentor

    RedisFeatureInstrumentor().instrument()

    client = redis.Redis(host="localhost", port=6379)
    features = client.mget([f"user:{uid}" for uid in user_ids])  # one stage

    with client.pipeline(transaction=False) as pipe:              # one stage
        pipe.hgetall(f"user:{uid}")
        pipe.get(f"item:{iid}")
        user, item = pipe.execute()

Options (``instrument()`` arguments win over the environment):

* ``commands`` / :envvar:`OTEL_INFERENCE_REDIS_COMMANDS`: the read commands,
  e.g. ``"GET,MGET"`` or ``"+ZSCORE,-EXISTS"``.
* ``key_prefix`` / :envvar:`OTEL_INFERENCE_REDIS_KEY_PREFIX` and
  ``key_prefix_limit`` / :envvar:`OTEL_INFERENCE_REDIS_KEY_PREFIX_LIMIT`.
* ``tracer_provider``, ``meter_provider``.

It coexists with ``opentelemetry-instrumentation-redis``: with both enabled,
each contrib ``CLIENT`` span sits inside our stage span, in either instrument
order. Malformed settings raise :class:`~otel_inference.ConfigurationError`
from ``instrument()``, naming the variable.

API
---
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from otel_inference.instrumentation._base import InferenceInstrumentor
from otel_inference.instrumentation.redis._config import DEFAULT_COMMANDS, load_settings
from otel_inference.instrumentation.redis.package import _instruments
from otel_inference.stages import StageRecorder

__all__ = ["DEFAULT_COMMANDS", "RedisFeatureInstrumentor"]


class RedisFeatureInstrumentor(InferenceInstrumentor):
    """Redis reads as ``feature_hydration`` stages (sync, asyncio, cluster, pipelines)."""

    _tracker: Any = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument_library(self, recorder: StageRecorder, **kwargs: Any) -> None:
        # Settings first: a configuration error must leave redis untouched.
        settings = load_settings(
            commands=kwargs.get("commands"),
            key_prefix=kwargs.get("key_prefix"),
            key_prefix_limit=kwargs.get("key_prefix_limit"),
        )
        # Imports redis: without it, ModuleNotFoundError comes from here only.
        from otel_inference.instrumentation.redis import _wrappers

        self._tracker = _wrappers.instrument(recorder, settings)

    def _uninstrument(self, **kwargs: Any) -> None:
        tracker, self._tracker = self._tracker, None
        if tracker is not None:
            from otel_inference.instrumentation.redis import _wrappers

            _wrappers.uninstrument(tracker)

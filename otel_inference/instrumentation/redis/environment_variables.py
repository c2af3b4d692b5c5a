"""Environment variables read by the Redis feature-hydration instrumentor.

Registered through the ``opentelemetry_environment_variables`` entry point.
Malformed values raise :class:`~otel_inference.ConfigurationError` from
``instrument()``, naming the variable.
"""

OTEL_INFERENCE_REDIS_COMMANDS = "OTEL_INFERENCE_REDIS_COMMANDS"
"""
.. envvar:: OTEL_INFERENCE_REDIS_COMMANDS

The Redis read commands recorded as ``feature_hydration`` stages, separated by
commas. A plain list replaces the default set (``GET,MGET,HGET,HMGET,HGETALL,
EXISTS,JSON.GET``); entries prefixed with ``+`` or ``-`` add to or remove from
it: ``+ZSCORE,+SMEMBERS,-EXISTS``. Each command must be a redis-py command
method (``ZSCORE`` -> ``zscore``; ``JSON.*`` -> the JSON commands).
"""

OTEL_INFERENCE_REDIS_KEY_PREFIX = "OTEL_INFERENCE_REDIS_KEY_PREFIX"
"""
.. envvar:: OTEL_INFERENCE_REDIS_KEY_PREFIX

``true`` to label cache lookups with a feature group: the key's text before
its first ``:`` (``user:42`` -> ``user``). Off by default. Keys without ``:``
count as ``_none``; prefixes that are not short identifiers, and any beyond
:envvar:`OTEL_INFERENCE_REDIS_KEY_PREFIX_LIMIT` distinct ones, count as
``_other``. Never the key itself.
"""

OTEL_INFERENCE_REDIS_KEY_PREFIX_LIMIT = "OTEL_INFERENCE_REDIS_KEY_PREFIX_LIMIT"
"""
.. envvar:: OTEL_INFERENCE_REDIS_KEY_PREFIX_LIMIT

The most distinct feature groups recorded (default 20, at most 1000): the
first prefixes seen get their own group, later ones count as ``_other``.
"""

"""Settings of the Redis instrumentor: ``instrument()`` arguments, else environment.

Parsing needs no redis import; resolving command names to redis-py methods is
done by :mod:`._wrappers` (which does import redis).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from otel_inference.config import ConfigurationError
from otel_inference.instrumentation.redis.environment_variables import (
    OTEL_INFERENCE_REDIS_COMMANDS,
    OTEL_INFERENCE_REDIS_KEY_PREFIX,
    OTEL_INFERENCE_REDIS_KEY_PREFIX_LIMIT,
)

DEFAULT_COMMANDS: tuple[str, ...] = (
    "GET",
    "MGET",
    "HGET",
    "HMGET",
    "HGETALL",
    "EXISTS",
    "JSON.GET",
)
DEFAULT_PREFIX_LIMIT = 20
MAX_PREFIX_LIMIT = 1000

_COMMAND = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z][A-Z0-9_]*)?$")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class RedisSettings:
    commands: tuple[str, ...] = DEFAULT_COMMANDS
    key_prefix: bool = False
    key_prefix_limit: int = DEFAULT_PREFIX_LIMIT


def _check_command(entry: str, source: str) -> str:
    name = entry.strip().upper()
    if not _COMMAND.match(name):
        raise ConfigurationError(
            f"{source}: {entry.strip()!r} is not a Redis command name (e.g. GET, HMGET, JSON.GET)"
        )
    return name


def parse_commands(text: str, source: str = OTEL_INFERENCE_REDIS_COMMANDS) -> tuple[str, ...]:
    """``"GET,MGET"`` replaces the default set; ``"+ZSCORE,-EXISTS"`` edits it."""
    entries = [entry.strip() for entry in text.split(",") if entry.strip()]
    if not entries:
        return DEFAULT_COMMANDS
    edits = [entry[0] in "+-" for entry in entries]
    if any(edits) and not all(edits):
        raise ConfigurationError(
            f"{source}: mix of plain and +/- entries in {text!r}; either list the whole set "
            "(GET,MGET) or edit the default one (+ZSCORE,-EXISTS)"
        )
    if not all(edits):
        return tuple(dict.fromkeys(_check_command(entry, source) for entry in entries))
    commands = dict.fromkeys(DEFAULT_COMMANDS)
    for entry in entries:
        name = _check_command(entry[1:], source)
        if entry[0] == "+":
            commands[name] = None
        else:
            commands.pop(name, None)
    return tuple(commands)


def _coerce_commands(commands: str | Iterable[str], source: str) -> tuple[str, ...]:
    if isinstance(commands, str):
        return parse_commands(commands, source)
    return tuple(dict.fromkeys(_check_command(str(entry), source) for entry in commands))


def _parse_bool(text: str, source: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE or not value:
        return False
    raise ConfigurationError(f"{source}={text!r} is not a boolean; use true or false")


def _parse_limit(value: object, source: str) -> int:
    try:
        limit = int(str(value).strip())
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_PREFIX_LIMIT:
        raise ConfigurationError(
            f"{source}={value!r} must be a whole number from 1 to {MAX_PREFIX_LIMIT}"
        )
    return limit


def load_settings(
    commands: str | Iterable[str] | None = None,
    key_prefix: bool | None = None,
    key_prefix_limit: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> RedisSettings:
    """Arguments win over the environment. Raises :class:`ConfigurationError`."""
    environ = os.environ if environ is None else environ
    if commands is None:
        parsed = parse_commands(environ.get(OTEL_INFERENCE_REDIS_COMMANDS, ""))
    else:
        parsed = _coerce_commands(commands, "commands")
    if key_prefix is None:
        key_prefix = _parse_bool(
            environ.get(OTEL_INFERENCE_REDIS_KEY_PREFIX, ""), OTEL_INFERENCE_REDIS_KEY_PREFIX
        )
    if key_prefix_limit is None:
        raw = environ.get(OTEL_INFERENCE_REDIS_KEY_PREFIX_LIMIT, "").strip()
        limit = (
            _parse_limit(raw, OTEL_INFERENCE_REDIS_KEY_PREFIX_LIMIT)
            if raw
            else DEFAULT_PREFIX_LIMIT
        )
    else:
        limit = _parse_limit(key_prefix_limit, "key_prefix_limit")
    return RedisSettings(parsed, bool(key_prefix), limit)

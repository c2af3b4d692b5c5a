"""Wrap library attributes now, or when their module is first imported; unwrap them all.

Importing a heavy optional library (transformers takes about a second, FastAPI
pulls in pydantic) only to instrument it would slow every process started under
``opentelemetry-instrument``, used or not. So an instrumentor wraps a module
that is already imported at once and registers a ``wrapt`` post-import hook for
one that is not: the wrap happens when the application imports it.

Usage (inside an instrumentor)::

    patches = Patches("serializers")
    patches.when_imported("orjson", lambda module: patches.wrap(module, "dumps", wrapper))
    ...
    patches.unwrap_all()          # from _uninstrument
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

import wrapt

from otel_inference.stages import log_once

_MISSING = object()


class Patches:
    """The wrappers one instrumentor installed, so that ``unwrap_all`` restores
    exactly the originals. Post-import hooks cannot be removed from ``wrapt``, so
    each module's hook is registered once and does nothing while inactive."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.RLock()
        self._active = False
        self._appliers: dict[str, Callable[[ModuleType], None]] = {}
        self._hooked: set[str] = set()
        self._applied: set[str] = set()
        # (owner, attribute name, the owner's own attribute before wrapping or _MISSING)
        self._wrapped: list[tuple[Any, str, Any]] = []

    def when_imported(self, module_name: str, apply: Callable[[ModuleType], None]) -> None:
        """Run ``apply(module)`` now if ``module_name`` is imported, else when it is."""
        with self._lock:
            self._active = True
            self._appliers[module_name] = apply
            if module_name not in self._hooked:
                self._hooked.add(module_name)
                # Fires at once when the module is already imported.
                wrapt.register_post_import_hook(
                    lambda module: self._on_import(module_name, module), module_name
                )
            elif module_name in sys.modules:
                self._on_import(module_name, sys.modules[module_name])

    def _on_import(self, module_name: str, module: ModuleType) -> None:
        with self._lock:
            if not self._active or module_name in self._applied:
                return
            self._applied.add(module_name)
            apply = self._appliers.get(module_name)
        if apply is None:
            return
        try:
            apply(module)
        except Exception:  # never break the application's import
            log_once(
                f"{self._name}-wrap-{module_name}",
                "otel-inference: could not instrument %s; it runs uninstrumented",
                module_name,
                level=logging.ERROR,
            )

    def wrap(self, owner: Any, attribute: str, wrapper: Callable[..., Any]) -> bool:
        """Wrap ``owner.attribute`` (a module function or a class's method).
        Returns False (and wraps nothing) when the attribute does not exist."""
        with self._lock:
            if getattr(owner, attribute, None) is None:
                return False
            own = vars(owner).get(attribute, _MISSING)
            wrapt.wrap_function_wrapper(owner, attribute, wrapper)
            self._wrapped.append((owner, attribute, own))
            return True

    def unwrap_all(self) -> None:
        """Restore every wrapped attribute, newest first; hooks go inactive."""
        with self._lock:
            self._active = False
            self._applied.clear()
            wrapped, self._wrapped = self._wrapped, []
        for owner, attribute, own in reversed(wrapped):
            try:
                if own is _MISSING:
                    # The attribute was inherited: drop the wrapper set on the owner.
                    delattr(owner, attribute)
                else:
                    # Put back the exact object the owner held (``unwrap`` would set
                    # ``__wrapped__`` as seen through the descriptor protocol, which
                    # is not always the same object for class attributes).
                    setattr(owner, attribute, own)
            except Exception:
                log_once(
                    f"{self._name}-unwrap",
                    "otel-inference: could not restore %r.%s",
                    owner,
                    attribute,
                    level=logging.ERROR,
                )

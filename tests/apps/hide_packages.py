"""Make packages look uninstalled: ``find_spec`` finds nothing, and no distribution metadata.

The packages are named in ``HIDE_PACKAGES`` (comma-separated import and
distribution names; default ``torch``). Loaded from a .pth file of a throwaway
virtual environment, so it runs at interpreter start, before
opentelemetry-instrument's sitecustomize.
"""

import importlib.machinery
import os

_HIDDEN = frozenset(
    name.strip().lower() for name in os.environ.get("HIDE_PACKAGES", "torch").split(",") if name
)
_PathFinder = importlib.machinery.PathFinder
_original_find_spec = _PathFinder.find_spec
_original_find_distributions = _PathFinder.find_distributions


def _find_spec(fullname, path=None, target=None):
    if fullname.partition(".")[0].lower() in _HIDDEN:
        return None
    return _original_find_spec(fullname, path, target)


def _find_distributions(*args, **kwargs):
    for distribution in _original_find_distributions(*args, **kwargs):
        if (distribution.metadata["Name"] or "").lower() not in _HIDDEN:
            yield distribution


_PathFinder.find_spec = staticmethod(_find_spec)
_PathFinder.find_distributions = staticmethod(_find_distributions)

"""Make torch look uninstalled: ``find_spec`` finds nothing, and no distribution metadata.

Loaded from a .pth file of a throwaway virtual environment, so it runs at
interpreter start, before opentelemetry-instrument's sitecustomize.
"""

import importlib.machinery

_HIDDEN = "torch"
_PathFinder = importlib.machinery.PathFinder
_original_find_spec = _PathFinder.find_spec
_original_find_distributions = _PathFinder.find_distributions


def _find_spec(fullname, path=None, target=None):
    if fullname == _HIDDEN or fullname.startswith(_HIDDEN + "."):
        return None
    return _original_find_spec(fullname, path, target)


def _find_distributions(*args, **kwargs):
    for distribution in _original_find_distributions(*args, **kwargs):
        if (distribution.metadata["Name"] or "").lower() != _HIDDEN:
            yield distribution


_PathFinder.find_spec = staticmethod(_find_spec)
_PathFinder.find_distributions = staticmethod(_find_distributions)

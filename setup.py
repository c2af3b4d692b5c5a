"""The optional compiled hot path of ``otel_inference.stages`` (``_speedups.c``).

Everything else is in pyproject.toml. ``optional=True``: without a C compiler or the
Python headers the package installs anyway and runs the pure-Python core.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("otel_inference._speedups", ["otel_inference/_speedups.c"], optional=True)
    ]
)

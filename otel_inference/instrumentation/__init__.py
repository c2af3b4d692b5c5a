"""Instrumentors, one module or subpackage per library, each a ``BaseInstrumentor``."""

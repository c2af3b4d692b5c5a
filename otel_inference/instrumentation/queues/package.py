"""What the queue instrumentor instruments: ``queue.Queue`` and ``asyncio.Queue``.

Both are standard library, so there is no distribution to check: an empty
``_instruments`` makes ``get_dependency_conflicts(())`` return ``None`` and the
instrumentor always loads (the Python version is bounded by ``requires-python``).
"""

_instruments: tuple[str, ...] = ()

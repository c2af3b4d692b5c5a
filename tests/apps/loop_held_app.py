"""An async service whose event loop is held by a known culprit, with the ground truth.

Each request awaits ``feature_hydration`` (an I/O wait, as a Redis call is) and
runs a short synchronous ``postprocess``. Two culprits hold the loop, and both
record exactly when they held it (wall-clock ns), so a test can compute the
true blocked share of any request:

* ``blocking=True``: every ``block_every``-th request calls
  :func:`load_profile_blocking` on the loop, which ``time.sleep``\\ s (a blocking
  call: the whole loop stops, every other request waits);
* ``hog=True``: a thread named ``cpu-hog`` repeatedly runs a C loop that holds
  the GIL (``sum(range(n))``), so the loop thread is ready but cannot run.

Usage::

    truth = asyncio.run(serve(requests=200, blocking=True))
    truth.held  # [(start_wall_ns, end_wall_ns), ...]
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass, field

from otel_inference import request, stage

HYDRATION_S = 0.004


@dataclass
class Truth:
    held: list[tuple[int, int]] = field(default_factory=list)  # wall ns, culprit's own clock


def load_profile_blocking(truth: Truth, seconds: float) -> None:
    """The culprit: a synchronous call made on the event loop."""
    start = time.time_ns()
    time.sleep(seconds)
    truth.held.append((start, time.time_ns()))


def calibrate_gil_hold(target_s: float) -> int:
    """``n`` such that ``sum(range(n))`` holds the GIL about ``target_s``."""
    n = 200_000
    while True:
        start = time.perf_counter()
        sum(range(n))
        elapsed = time.perf_counter() - start
        if elapsed >= target_s / 4:
            return max(1, int(n * target_s / elapsed))
        n *= 2


def hog(truth: Truth, stop: threading.Event, n: int, pause_s: float) -> None:
    """The other culprit: C code that never releases the GIL while it runs.
    Its pauses vary (0.5x to 1.5x ``pause_s``), as real work does: a fixed
    pause would lock its phase to the monitor's heartbeat."""
    pauses = random.Random(16)
    while not stop.is_set():
        start = time.time_ns()
        sum(range(n))
        truth.held.append((start, time.time_ns()))
        stop.wait(pause_s * pauses.uniform(0.5, 1.5))


async def handle(index: int, truth: Truth, block_every: int, block_s: float) -> None:
    with request("inference.request"):
        async with stage("feature_hydration"):
            await asyncio.sleep(HYDRATION_S)
        if block_every and index % block_every == block_every - 1:
            load_profile_blocking(truth, block_s)
        with stage("postprocess"):
            sum(range(2_000))


async def serve(
    *,
    requests: int = 200,
    concurrency: int = 16,
    blocking: bool = False,
    block_every: int = 10,
    block_s: float = 0.05,
    hog_thread: bool = False,
    hold_s: float = 0.05,
    pause_s: float = 0.08,
) -> Truth:
    truth = Truth()
    stop = threading.Event()
    thread = None
    if hog_thread:
        n = calibrate_gil_hold(hold_s)
        thread = threading.Thread(
            target=hog, args=(truth, stop, n, pause_s), name="cpu-hog", daemon=True
        )
        thread.start()
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int) -> None:
        async with gate:
            await handle(index, truth, block_every if blocking else 0, block_s)

    try:
        await asyncio.gather(*(one(index) for index in range(requests)))
    finally:
        stop.set()
        if thread is not None:
            thread.join(timeout=10)
    return truth

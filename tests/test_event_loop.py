"""Blocked event loops and contention (issue 16): measured, named, attributed, reported.

The ground-truth tests run a real asyncio service (``tests/apps/loop_held_app.py``)
whose loop is held by a known culprit that records exactly when it held it, then
compare the report built from the spans with that truth.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from collections.abc import Iterator

import pytest
from opentelemetry.exporter.otlp.json.file import FileSpanExporter
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from otel_inference import ConfigurationError, request, stage
from otel_inference.event_loop import loop_monitor
from otel_inference.instrumentation.runtime import RuntimeInstrumentor
from otel_inference.report import build_report, load_spans_file, render_table, report_dict
from otel_inference.report._stats import merge_intervals, nearest_rank
from tests.apps import loop_held_app
from tests.apps.loop_held_app import serve

BLOCKED = "inference.event_loop.blocked.duration"
# The target is 3 points: benchmarks/bench_event_loop.py measures the
# error over repeated runs (results.md). A unit test on a shared 2-core machine
# (load averages of 6-12 while this was written) keeps a margin that cannot
# fail on scheduling noise alone, and still fails on a wrong attribution.
POINTS = 0.15


@pytest.fixture
def runtime(telemetry) -> Iterator[None]:
    RuntimeInstrumentor().instrument(cold_start_requests=0, event_loop_threshold=0.02)
    yield
    RuntimeInstrumentor().uninstrument()


def _overlap(lo: int, hi: int, held: list[tuple[int, int]]) -> int:
    return sum(max(0, min(hi, end) - max(lo, start)) for start, end in held)


def ground_truth(spans, held: list[tuple[int, int]], culprit: str) -> dict[str, float]:
    """Tail shares (the report's tail: requests at or above the end-to-end p95):
    ``truth``, the time the culprit held the loop by its own clock;
    ``measured``, the time the monitor blamed on that culprit (the request
    spans' ``event_loop.blocked`` events); ``feature_hydration``, that stage
    without the culprit's holds.

    On a shared machine other processes also starve the loop: real holds the
    monitor names as such ("other processes"), which the culprit's truth does
    not count. So the culprit's share is compared culprit to culprit, and the
    report's ``event_loop`` row (all culprits) must hold at least that much."""
    held = merge_intervals(held)
    requests = {s.context.span_id: s for s in spans if s.name == "inference.request"}
    durations = {key: s.end_time - s.start_time for key, s in requests.items()}
    threshold = nearest_rank(list(durations.values()), 0.95)
    tail = [key for key, d in durations.items() if d >= threshold]
    hydration = {s.parent.span_id: s for s in spans if s.name == "feature_hydration"}
    truth = measured = unblocked = 0.0
    for key in tail:
        r, h = requests[key], hydration[key]
        truth += _overlap(r.start_time, r.end_time, held) / durations[key]
        blamed = [
            (e.timestamp, e.timestamp + round(e.attributes[BLOCKED] * 1e9))
            for e in r.events
            if e.name == "event_loop.blocked"
            and culprit in e.attributes["inference.event_loop.blocked.culprit"]
        ]
        measured += _overlap(r.start_time, r.end_time, blamed) / durations[key]
        stage_ns = h.end_time - h.start_time
        unblocked += (stage_ns - _overlap(h.start_time, h.end_time, held)) / durations[key]
    n = len(tail)
    return {"truth": truth / n, "measured": measured / n, "feature_hydration": unblocked / n}


def run_service(telemetry, tmp_path, culprit, **options):
    path = tmp_path / "spans.jsonl"
    # Exported off the loop, as a service does: a SimpleSpanProcessor writing a
    # file on every span end would hold the loop itself (and be named for it).
    # Nor during the run at all: a batch export's JSON encoding holds the GIL.
    export = BatchSpanProcessor(
        FileSpanExporter(path),
        max_queue_size=100_000,
        max_export_batch_size=100_000,
        schedule_delay_millis=600_000,
    )
    telemetry.tracer_provider.add_span_processor(export)
    # The test process's heap (pytest, torch...) makes full collections hold the
    # loop for ~100 ms: a culprit of its own (named as garbage collection), not
    # the one whose truth we know. Out of the collector's way, as a served model is.
    gc.collect()
    gc.freeze()
    try:
        truth = asyncio.run(serve(**options))
    finally:
        gc.unfreeze()
    telemetry.tracer_provider.force_flush()
    report = build_report(load_spans_file(path))
    return report, ground_truth(telemetry.spans(), truth.held, culprit)


def test_a_blocking_call_on_the_loop_is_named_and_its_share_recovered(telemetry, runtime, tmp_path):
    report, truth = run_service(
        telemetry, tmp_path, "load_profile_blocking", blocking=True, block_every=10
    )
    print(render_table(report))
    print(truth)

    assert truth["truth"] > 0.3  # a real effect, not noise
    assert truth["measured"] == pytest.approx(truth["truth"], abs=POINTS)
    held = report.row("event_loop").tail_share
    assert held >= truth["truth"] - POINTS
    # The awaited stage is charged its own time only, not the time the loop was held.
    hydration = report.row("feature_hydration").tail_share
    assert hydration <= truth["feature_hydration"] + POINTS
    assert hydration + held == pytest.approx(
        truth["feature_hydration"] + truth["truth"], abs=POINTS
    )
    top = report.event_loop_culprits[0]
    assert top.kind == "blocked"
    assert top.culprit.startswith("load_profile_blocking (apps/loop_held_app.py:")
    assert report.verdict.category == "event_loop"
    assert "load_profile_blocking" in report.verdict.text
    assert "async form" in report.verdict.text  # the remedy for a blocking call
    assert report_dict(report)["verdict"]["category"] == "event_loop"


def test_a_thread_hogging_the_gil_is_named_as_starving_the_loop(telemetry, runtime, tmp_path):
    # Load-sensitive: when the machine is throttled (these VMs run 2x slower for
    # minutes under sustained load) a run may not produce the effect the test is about
    # (the ground truth says so: the hog's holds must lead the tail), or the watchdog
    # may not get the GIL once during a hold, which is then judged by CPU clocks alone.
    # Up to three runs; the accuracy figures over many runs are bench_event_loop.py's.
    for attempt in range(3):
        attempt_path = tmp_path / str(attempt)
        attempt_path.mkdir()
        report, truth = run_service(
            telemetry,
            attempt_path,
            "thread 'cpu-hog'",
            hog_thread=True,
            requests=400,
            hold_s=0.1,
            pause_s=0.15,
        )
        produced = truth["truth"] > max(0.3, truth["feature_hydration"])  # the hog leads
        if produced and abs(truth["measured"] - truth["truth"]) <= POINTS:
            break
        telemetry.span_exporter.clear()
    print(render_table(report))
    print(truth)

    if not produced:  # three runs in which the scheduler kept the hog out of the tail
        pytest.skip(f"the hog's holds did not lead the tail in 3 runs (last: {truth})")
    assert truth["measured"] == pytest.approx(truth["truth"], abs=POINTS)
    held = report.row("event_loop").tail_share
    assert held >= truth["truth"] - POINTS
    hydration = report.row("feature_hydration").tail_share
    assert hydration <= truth["feature_hydration"] + POINTS
    top = next(c for c in report.event_loop_culprits if "cpu-hog" in c.culprit)
    assert top.kind == "starved" and top.culprit == "thread 'cpu-hog'"
    assert report.verdict.category == "event_loop"
    assert "fewer threads per process" in report.verdict.text


def test_spans_carry_the_overlap_the_culprit_and_an_event(telemetry, runtime):
    def blocking_call() -> None:
        time.sleep(0.06)

    async def main() -> None:
        async def waiter() -> None:
            with request("waiter"):
                async with stage("feature_hydration"):
                    await asyncio.sleep(0.01)

        async def blocker() -> None:
            with request("blocker"):
                await asyncio.sleep(0.002)
                blocking_call()

        await asyncio.gather(waiter(), blocker())

    asyncio.run(main())
    (hydration,) = telemetry.spans("feature_hydration")
    attributes = hydration.attributes
    # The stage waited 10 ms for a timer; the loop was held for the rest.
    assert 0.045 <= attributes[BLOCKED] <= (hydration.end_time - hydration.start_time) / 1e9
    assert attributes["inference.event_loop.blocked.kind"] == "blocked"
    assert "blocking_call" in attributes["inference.event_loop.blocked.culprit"]
    (event,) = [e for e in hydration.events if e.name == "event_loop.blocked"]
    assert event.attributes["code.function.name"].endswith("blocking_call")
    assert event.attributes["code.file.path"] == __file__
    assert event.attributes["inference.event_loop.blocked.stack"][0].startswith("test_spans_carry")
    (blocker,) = telemetry.spans("blocker")
    assert blocker.attributes[BLOCKED] >= 0.045  # its own hold counts in its own total
    points = telemetry.metric_points("inference.runtime.event_loop.delay")
    assert points and points[0].max >= 0.045


def test_uvloop_is_watched_too(telemetry, runtime):
    uvloop = pytest.importorskip("uvloop")

    def cpu_bound_callback() -> None:
        deadline = time.thread_time() + 0.08
        while time.thread_time() < deadline:
            pass

    async def main() -> None:
        async def waiter() -> None:
            with request("waiter"):
                async with stage("downstream"):
                    await asyncio.sleep(0.01)

        async def busy() -> None:
            with request("busy"):
                await asyncio.sleep(0.002)
                cpu_bound_callback()

        await asyncio.gather(waiter(), busy())

    uvloop.run(main())
    (waiter,) = telemetry.spans("downstream")
    assert waiter.attributes[BLOCKED] >= 0.05
    assert waiter.attributes["inference.event_loop.blocked.kind"] == "busy"
    assert "cpu_bound_callback" in waiter.attributes["inference.event_loop.blocked.culprit"]


def test_sync_stages_record_their_cpu_time(telemetry, runtime):
    def work() -> None:
        with request("sync"):
            with stage("tokenize"):
                deadline = time.thread_time() + 0.02
                while time.thread_time() < deadline:
                    pass
            with stage("model_forward"):
                time.sleep(0.03)  # wall time, no CPU: a waiting (or contended) stage

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    (tokenize,) = telemetry.spans("tokenize")
    (forward,) = telemetry.spans("model_forward")
    assert tokenize.attributes["inference.stage.cpu.duration"] >= 0.02
    assert (
        tokenize.attributes["inference.stage.cpu.duration"]
        <= (tokenize.end_time - tokenize.start_time) / 1e9 + 0.001
    )
    assert forward.attributes["inference.stage.cpu.duration"] < 0.01


def test_no_loop_no_thread_and_uninstrument_stops_the_watchdog(telemetry):
    before = {t.name for t in threading.enumerate()}
    RuntimeInstrumentor().instrument(cold_start_requests=0)
    with request("sync"):
        pass
    assert "otel-inference-loop-watchdog" not in {t.name for t in threading.enumerate()}

    async def one() -> None:
        with request("async"):
            await asyncio.sleep(0)

    asyncio.run(one())
    assert "otel-inference-loop-watchdog" in {t.name for t in threading.enumerate()}
    RuntimeInstrumentor().uninstrument()
    assert {t.name for t in threading.enumerate()} == before
    assert not loop_monitor().started


@pytest.mark.parametrize("value", ["fast", "0ms", "5min"])
def test_bad_threshold_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("OTEL_INFERENCE_EVENT_LOOP_THRESHOLD", value)
    with pytest.raises(ConfigurationError, match="OTEL_INFERENCE_EVENT_LOOP_THRESHOLD"):
        RuntimeInstrumentor().instrument()
    assert not RuntimeInstrumentor().is_instrumented_by_opentelemetry


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_watches_its_own_loops(telemetry, runtime):
    async def hold() -> None:
        with request("child"):
            await asyncio.sleep(0.001)
            loop_held_app.load_profile_blocking(loop_held_app.Truth(), 0.06)
            await asyncio.sleep(0.001)

    asyncio.run(hold())  # the parent's watchdog runs
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        status = 1
        try:
            asyncio.run(hold())
            names = {t.name for t in threading.enumerate()}
            ok = "otel-inference-loop-watchdog" in names and any(
                i.kind == "blocked" for i in loop_monitor().intervals()
            )
            status = 0 if ok else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _held(ms: float, culprit: str, kind: str = "blocked") -> dict:
    return {
        BLOCKED: ms / 1000,
        "inference.event_loop.blocked.kind": kind,
        "inference.event_loop.blocked.culprit": culprit,
    }


def test_report_takes_the_held_time_out_of_the_stages_exactly(tmp_path):
    """Known spans: 9 requests of 10 ms, one of 100 ms whose feature_hydration
    (90 ms) was held 80 ms by the loop, and 5 ms of its gap too (declared by its
    request() span, 85 ms in all). The tail is that one request."""
    from tests.apps.report_spans import GAP, SpanWriter, Step

    writer = SpanWriter(tmp_path / "spans.jsonl")
    for _ in range(9):
        writer.request([("feature_hydration", 8), ("model_forward", 2)])
    writer.request(
        [
            Step("feature_hydration", 90, _held(80, "load_profile_blocking (app.py:40)")),
            ("model_forward", 2),
            (GAP, 8),
        ],
        attributes=_held(85, "load_profile_blocking (app.py:40)"),
    )
    report = build_report(load_spans_file(writer.close()))

    held = report.row("event_loop")
    assert held.tail_share == pytest.approx(0.85)
    assert held.p99 == pytest.approx(0.085) and held.p50 == 0
    assert report.row("feature_hydration").tail_share == pytest.approx(0.10)
    assert report.row("model_forward").tail_share == pytest.approx(0.02)
    assert report.row("unattributed").tail_share == pytest.approx(0.03)  # 8 ms less 5 held
    shares = [report.row(s).tail_share for s in ("feature_hydration", "model_forward")]
    assert sum(shares) + held.tail_share + report.row("unattributed").tail_share == (
        pytest.approx(1.0)
    )
    assert report.verdict.category == "event_loop" and report.verdict.stage == "event_loop"
    assert report.event_loop_culprits[0].culprit == "load_profile_blocking (app.py:40)"
    data = report_dict(report)
    assert data["verdict"]["category"] == "event_loop"
    assert data["event_loop_culprits"][0]["kind"] == "blocked"
    table = render_table(report)
    assert "Event loop held by:" in table and "event_loop" in table


def test_without_the_monitor_the_report_is_unchanged(tmp_path):
    from tests.apps.report_spans import SpanWriter

    writer = SpanWriter(tmp_path / "spans.jsonl")
    for _ in range(5):
        writer.request([("feature_hydration", 8), ("model_forward", 2)])
    report = build_report(load_spans_file(writer.close()))
    assert [row.stage for row in report.rows] == [
        "feature_hydration",
        "model_forward",
        "unattributed",
        "request",
    ]
    assert report.event_loop_culprits == []
    assert "on-CPU" not in render_table(report)

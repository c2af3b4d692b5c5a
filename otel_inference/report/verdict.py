"""The verdict: which stage dominates the tail, and what to change first.

The rules follow how latency problems of inference services are usually
resolved: look around the model before the model.

=========================================  ================  ==========================================
dominant stage(s) of the tail              category          first fix
=========================================  ================  ==========================================
``event_loop`` (the loop was held)         event_loop        what held it: CPU work or a blocking call
                                                             off the loop; fewer threads, more processes
``queue_wait``                             configuration     batch window, batch size, concurrency
``h2d_transfer``, ``d2h_transfer``         runtime           pinned memory, copy/compute overlap, fusion
``feature_hydration``                      cache             hit ratio, batched lookups (cache design)
``unattributed``                           instrumentation   instrument the gap first
``parse``, ``preprocess``, ``tokenize``,   host              the service's own CPU code
``postprocess``, ``serialize``
``downstream``                             downstream        the called service
anything else (custom stages)              custom            that stage's code
``prefill`` (in ``generate``)              prefill           prompt caching, chunked prefill
``decode`` (in ``generate``)               decode            continuous batching, quantisation,
                                                             speculative decoding
``model_forward``, ``batch``               model             only then the model
=========================================  ================  ==========================================

A top-level ``generate`` stage (LLM generation) is split between ``prefill``
and ``decode`` in proportion to their nested rows' mean time, so a slow first
token (prefill-bound) and slow tokens after it (decode-bound) get their own
advice; queueing before the model stays ``configuration`` (queue-bound).

Each top-level stage (and ``unattributed``, and ``event_loop``: the time the
event loop was held, already taken out of the stages) has a weight: its share of tail
latency (spans), or, from Prometheus alone, its p95 over the end-to-end p95.
Weights are summed per category (two transfers together can outweigh the
forward); the heaviest category wins (ties: the order of the table), and the
verdict names its heaviest stage.

Usage::

    from otel_inference.report.verdict import decide

    verdict = decide(report.rows, hit_ratio=0.93, lookups=1200, tail_threshold=0.080)
    print(verdict.text)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from otel_inference import semconv
from otel_inference.report._model import LoopCulprit, StageRow, Verdict

CATEGORIES: dict[str, str] = {
    semconv.QUEUE_WAIT: "configuration",
    semconv.H2D_TRANSFER: "runtime",
    semconv.D2H_TRANSFER: "runtime",
    semconv.FEATURE_HYDRATION: "cache",
    semconv.MODEL_FORWARD: "model",
    # The batcher's shared work: the batched model call (its nested rows say which part).
    semconv.BATCH: "model",
    semconv.UNATTRIBUTED: "instrumentation",
    semconv.PARSE: "host",
    semconv.PREPROCESS: "host",
    semconv.TOKENIZE: "host",
    semconv.POSTPROCESS: "host",
    semconv.SERIALIZE: "host",
    "downstream": "downstream",
    semconv.EVENT_LOOP: "event_loop",
    semconv.PREFILL: "prefill",
    semconv.DECODE: "decode",
}
_PRECEDENCE = (
    "event_loop",
    "configuration",
    "runtime",
    "cache",
    "instrumentation",
    "host",
    "downstream",
    "prefill",
    "decode",
    "custom",
    "model",
)
UNATTRIBUTED_NOTE = 0.25
"""An ``unattributed`` weight at least this large is mentioned even when it does not win."""
EVENT_LOOP_NOTE = 0.10
"""An ``event_loop`` weight at least this large is mentioned even when it does not win."""
_WEIGHED_KINDS = ("stage", "unattributed", "event_loop")


def category_of(stage: str) -> str:
    return CATEGORIES.get(stage, "custom")


def _pct(value: float) -> str:
    return f"{value * 100:.0f}%"


def _ms(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3g} s"
    return f"{seconds * 1000:.3g} ms"


def _advice(category: str, stage: str, hit_ratio: float | None, lookups: int) -> str:
    if category == "configuration":
        return (
            "Fix the configuration first, not the model: requests wait for a batch or a "
            "worker; tune the batch window (max_wait_ms), the batch size and the concurrency "
            "(workers, replicas)."
        )
    if category == "runtime":
        return (
            "Fix the runtime, not the model: pin host memory, overlap copies with compute "
            "(non_blocking copies, streams), fuse small copies and kernels, keep data on the device."
        )
    if category == "cache":
        ratio = (
            f"the cache hit ratio is {_pct(hit_ratio)} over {lookups} lookups; "
            if hit_ratio is not None
            else ""
        )
        return (
            f"Fix the cache design: {ratio}raise the hit ratio (warming, TTLs, a local tier) "
            "and batch the lookups (MGET, pipelines) before touching the model."
        )
    if category == "instrumentation":
        return (
            "Instrument the gap first: that time is in no stage, so wrap the uncovered code in "
            'stage("...") (or enable its instrumentor) and run the report again.'
        )
    if category == "host":
        return (
            f"The service's own CPU work: profile {stage} (a faster tokenizer or serialiser, "
            "less per-request Python, off the event loop) before the model."
        )
    if category == "downstream":
        return "A downstream call: look at the called service, its timeouts and caching."
    if category == "prefill":
        return (
            "Prefill-bound: the prompt's forward pass holds back the first token; shorten or "
            "cache prompts (prefix/prompt caching), use chunked prefill so long prompts do not "
            "stall the others, and check the prompt lengths before the model."
        )
    if category == "decode":
        return (
            "Decode-bound: the steps after the first token dominate; batch decoding across "
            "requests (continuous batching), quantise the weights read at every step, try "
            "speculative decoding, and cap max_new_tokens."
        )
    if category == "model":
        return (
            "Only now the model: the forward pass itself dominates; consider a smaller or "
            "quantised model, compilation, fewer padded tokens, or faster hardware."
        )
    return f"The custom stage {stage} dominates: start with its code."


def _inside(rows: Sequence[StageRow], stage: str) -> str:
    """The nested rows of ``stage`` (a batch's tokenize, model_forward...), slowest first."""
    nested = [r for r in rows if r.parent == stage and r.p50 is not None]
    nested.sort(key=lambda r: -(r.p50 or 0.0))
    return ", ".join(f"{r.stage} {_ms(r.p50 or 0.0)}" for r in nested)


def _held_by(culprits: Sequence[LoopCulprit]) -> str:
    if not culprits:
        return ""
    top = culprits[0]
    return f", mostly {top.kind} ({_pct(top.share)}): {top.culprit}"


def event_loop_advice(culprits: Sequence[LoopCulprit]) -> str:
    """Name what held the loop, and the remedy for that kind of hold."""
    if not culprits:
        return (
            "Find what holds the loop (OTEL_INFERENCE_EVENT_LOOP_THRESHOLD lower): no "
            "culprit was recorded."
        )
    top = culprits[0]
    named = "; ".join(f"{c.kind}: {c.culprit} ({_pct(c.share)})" for c in culprits[:3])
    if top.kind == "starved":
        remedy = (
            "The loop thread was ready but other threads held the GIL or the CPUs: fewer "
            "threads per process (torch.set_num_threads, smaller executors), more processes "
            "(workers), or move that work to a process pool."
        )
    elif top.kind == "busy":
        remedy = (
            "A callback ran on the loop's CPU: move that CPU work off the loop "
            "(loop.run_in_executor / asyncio.to_thread, or a process pool)."
        )
    elif top.kind == "blocked":
        remedy = (
            "A blocking call ran on the loop (time.sleep, synchronous I/O, a lock): use its "
            "async form, or move it off the loop (asyncio.to_thread)."
        )
    else:
        remedy = (
            "The holds were too short to sample: lower OTEL_INFERENCE_EVENT_LOOP_THRESHOLD "
            "to name them."
        )
    return f"Held by {named}. {remedy} The waiting stages are not the problem."


def decide(
    rows: Sequence[StageRow],
    *,
    hit_ratio: float | None = None,
    lookups: int = 0,
    tail_threshold: float | None = None,
    basis: str = "tail",
    loop_culprits: Sequence[LoopCulprit] = (),
) -> Verdict:
    """The verdict from the top-level rows and the ``unattributed`` row.

    ``basis="tail"`` weighs rows by ``tail_share``; ``basis="p95"`` (Prometheus
    input, no traces) by p95 over the ``request`` row's p95.
    """
    weights: dict[str, float] = {}
    if basis == "tail":
        for row in rows:
            if row.kind in _WEIGHED_KINDS and row.tail_share is not None:
                weights[row.stage] = row.tail_share
    else:
        end_to_end = next((r for r in rows if r.kind == "request"), None)
        if end_to_end is not None and end_to_end.p95:
            for row in rows:
                if row.kind in _WEIGHED_KINDS and row.p95 is not None:
                    weights[row.stage] = row.p95 / end_to_end.p95
    _split_generation(weights, rows, basis)
    if not weights or max(weights.values()) <= 0:
        return Verdict(None, "none", None, ("No stage time to judge: no verdict.",))
    by_category: dict[str, float] = defaultdict(float)
    for stage, weight in weights.items():
        by_category[category_of(stage)] += weight
    category = max(by_category, key=lambda c: (by_category[c], -_PRECEDENCE.index(c)))
    stage = max((s for s in weights if category_of(s) == category), key=lambda s: weights[s])
    share = weights[stage]
    if basis == "tail":
        where = "of the time of requests at or above the end-to-end p95"
        if tail_threshold is not None:
            where += f" ({_ms(tail_threshold)})"
    else:
        where = "of the end-to-end p95 (Prometheus: the stage's p95 over the request's p95)"
    first = f"{stage} dominates the tail: {_pct(share)} {where}"
    others = [s for s in weights if category_of(s) == category and s != stage]
    if others:
        first += f"; with {', '.join(sorted(others))}: {_pct(by_category[category])}"
    if category == "event_loop":
        first = f"The event loop was held for {_pct(share)} {where}"
        second = event_loop_advice(loop_culprits)
    else:
        second = _advice(category, stage, hit_ratio, lookups)
        inside = _inside(rows, stage)
        if inside:
            second += f" Inside {stage} (p50): {inside}."
        held = weights.get(semconv.EVENT_LOOP, 0.0)
        if held >= EVENT_LOOP_NOTE:
            second += (
                f" Also, the event loop was held for {_pct(held)} of that time"
                f"{_held_by(loop_culprits)}."
            )
    gap = weights.get(semconv.UNATTRIBUTED, 0.0)
    if category != "instrumentation" and gap >= UNATTRIBUTED_NOTE:
        second += f" Also, {_pct(gap)} is unattributed: instrument that gap."
    return Verdict(stage, category, share, (first + ".", second))


def _split_generation(weights: dict[str, float], rows: Sequence[StageRow], basis: str) -> None:
    """Replace a top-level ``generate`` weight by ``prefill`` and ``decode`` weights in
    proportion to their nested rows (mean time from spans, p95 from Prometheus)."""
    weight = weights.get(semconv.GENERATE)
    if weight is None:
        return
    parts: dict[str, float] = {}
    for row in rows:
        if row.parent == semconv.GENERATE and row.stage in (semconv.PREFILL, semconv.DECODE):
            value = row.mean if basis == "tail" and row.mean is not None else row.p95
            if value:
                parts[row.stage] = value
    total = sum(parts.values())
    if total <= 0:
        return
    del weights[semconv.GENERATE]
    for stage, value in parts.items():
        weights[stage] = weight * value / total

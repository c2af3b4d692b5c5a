"""Padding waste from spans: how much forward-pass compute goes to padding.

The tokenizers instrumentor puts ``inference.tokens.real`` (attention mask 1)
and ``inference.tokens.padded`` (all positions: batch x padded length) on each
``tokenize`` span. A forward computes every position it is given, padding or
not; assuming its time grows with the positions (true of the linear layers;
attention's quadratic term makes padding costlier still), the padding's share
of a forward is ``1 - real / padded`` of the tokens it was given.

A forward is paired with the tokenize calls that fed it by their common parent
span: the batch span when the batcher tokenises and runs the model inside the
batch (the demo), or the request span when both run in the request. For each
such unit, ``padding time = forward time x (1 - real / padded)``; forwards with
no tokenize beside them are left out of the time figures (their padding is
unknown), and the report says how much forward time that is.

Usage::

    from otel_inference.report.padding import padding_summary

    padding = padding_summary(stage_spans, requests=460, rate=0.1 / 3600)
    print(padding.waste, padding.forward_share, padding.advice)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from otel_inference import semconv
from otel_inference.report._model import Padding, SpanKey, SpanRecord

LARGE_WASTE = 0.25
"""At this waste fraction of the padded positions, the report advises length bucketing."""


def _count(span: SpanRecord, key: str) -> int | None:
    value = span.attributes.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return None
    return int(value)


def padding_summary(
    spans: Iterable[SpanRecord], *, requests: int, rate: float | None
) -> Padding | None:
    """Padding figures of ``spans`` (each stage span once); ``None`` when no
    tokenize span carries token counts. ``rate``: dollars per second."""
    from otel_inference.report.analysis import _compressed_ns  # analysis imports this module

    real: dict[SpanKey | None, int] = defaultdict(int)
    padded: dict[SpanKey | None, int] = defaultdict(int)
    forward_ns: dict[SpanKey | None, int] = defaultdict(int)
    calls = 0
    for span in spans:
        stage = span.attributes.get(semconv.INFERENCE_STAGE)
        unit = span.parent_key
        if stage == semconv.TOKENIZE:
            r = _count(span, semconv.INFERENCE_TOKENS_REAL)
            p = _count(span, semconv.INFERENCE_TOKENS_PADDED)
            if r is None or p is None or p < r:
                continue
            real[unit] += r
            padded[unit] += p
            calls += 1
        elif stage == semconv.MODEL_FORWARD:
            # A compressed span stands for several calls: their time, not its extent.
            busy = _compressed_ns(span)
            forward_ns[unit] += span.duration_ns if busy is None else busy
    total_real, total_padded = sum(real.values()), sum(padded.values())
    if not calls or not total_padded:
        return None
    result = Padding(
        real_tokens=total_real,
        padded_tokens=total_padded,
        waste=1 - total_real / total_padded,
        tokenize_calls=calls,
    )
    paired = [unit for unit in forward_ns if padded.get(unit)]
    if paired:
        forward = sum(forward_ns[u] for u in paired) / 1e9
        wasted = sum(forward_ns[u] * (1 - real[u] / padded[u]) for u in paired) / 1e9
        result.forward_seconds = forward
        result.padding_seconds = wasted
        result.forward_share = wasted / forward if forward else None
        result.seconds_per_request = wasted / requests if requests else None
        if rate is not None and requests:
            result.cost_per_request = wasted * rate / requests
    result.advice = padding_advice(result.waste)
    return result


def padding_advice(waste: float | None) -> str | None:
    """The verdict sentence on padding, when the waste is large."""
    if waste is None or waste < LARGE_WASTE:
        return None
    return (
        f"{waste:.0%} of the token positions the model computes are padding: "
        "batch by length (length bucketing: group requests of similar token length, "
        "or sort each batch's texts by length before padding) so that a batch pads "
        "to its own longest text, not to the longest of a mixed batch."
    )


def padding_from_counts(real: float, padding: float, calls: int) -> Padding | None:
    """Padding figures from the ``inference.tokens`` counter (Prometheus): tokens
    and waste only; the time they imply needs spans (the pairing with forwards)."""
    real_tokens, padded_tokens = round(real), round(real + padding)
    if padded_tokens <= 0:
        return None
    waste = 1 - real_tokens / padded_tokens
    return Padding(
        real_tokens=real_tokens,
        padded_tokens=padded_tokens,
        waste=waste,
        tokenize_calls=calls,
        advice=padding_advice(waste),
    )

"""Token counts of a tokenizer's output: real (attention mask 1) and padded positions.

Only counts leave this module, never ids or text. Tensors are summed only when
they live on the CPU (a tokenizer's output always does); anything else is
skipped rather than synchronised.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from otel_inference import semconv

_attention_mask = attrgetter("attention_mask")


@dataclass(slots=True)
class TokenCounts:
    batch_size: int
    padded_length: int  # longest row: every row's length once padded
    real: int  # non-padding positions
    padded: int  # all positions, padding included (batch x padded length when padded)

    @property
    def padding(self) -> int:
        return self.padded - self.real

    @property
    def padding_ratio(self) -> float:
        return 1.0 - self.real / self.padded if self.padded else 0.0

    def attributes(self) -> dict[str, Any]:
        return {
            semconv.INFERENCE_TOKENIZE_BATCH_SIZE: self.batch_size,
            semconv.INFERENCE_TOKENIZE_PADDED_LENGTH: self.padded_length,
            semconv.INFERENCE_TOKENS_REAL: self.real,
            semconv.INFERENCE_TOKENS_PADDED: self.padded,
            semconv.INFERENCE_PADDING_RATIO: self.padding_ratio,
        }


def count_encodings(encodings: Sequence[Any], padding_enabled: bool = True) -> TokenCounts:
    """Counts of ``tokenizers.Encoding`` objects. Reading an attention mask builds a
    Python list (about 1 us per 100 positions), so it is skipped when the tokenizer
    pads nothing: then every position is real."""
    lengths = list(map(len, encodings))
    padded = sum(lengths)
    real = sum(map(sum, map(_attention_mask, encodings))) if padding_enabled else padded
    return TokenCounts(len(lengths), max(lengths, default=0), real, padded)


def count_mask(mask: Any) -> TokenCounts | None:
    """Counts from an attention mask: list (batched or one row), numpy array, or CPU
    torch tensor. None for anything else (a device tensor is never synchronised)."""
    if isinstance(mask, list):
        if not mask:
            return TokenCounts(0, 0, 0, 0)
        if isinstance(mask[0], list):
            lengths = list(map(len, mask))
            return TokenCounts(len(mask), max(lengths), sum(map(sum, mask)), sum(lengths))
        return TokenCounts(1, len(mask), sum(mask), len(mask))
    module = type(mask).__module__
    if module == "numpy":
        total = int(mask.size)
    elif module == "torch":
        if mask.device.type != "cpu":
            return None
        total = mask.numel()
    else:
        return None
    shape = mask.shape
    if not shape:
        return None
    length = int(shape[-1])
    batch = total // length if length else (int(shape[0]) if len(shape) > 1 else 1)
    return TokenCounts(batch, length, int(mask.sum()), total)


def count_batch_encoding(result: Any) -> TokenCounts | None:
    """Counts of a transformers ``BatchEncoding``: from its attention mask, else from
    the fast tokenizer's encodings, else None (no way to tell padding apart)."""
    # BatchEncoding is a UserDict: its plain dict is faster to read than its get().
    data = getattr(result, "data", None)
    getter = data.get if isinstance(data, dict) else getattr(result, "get", None)
    if getter is None:
        return None
    mask = getter("attention_mask")
    if mask is not None:
        counts = count_mask(mask)
        if counts is not None:
            return counts
    encodings = getattr(result, "encodings", None)
    if encodings:
        return count_encodings(encodings)
    return None


def count_ids(ids: Any, pad_token_id: int | None) -> TokenCounts | None:
    """Counts of ``encode()``'s list of ids (one sequence): positions holding the pad
    id are padding. Other return types (tensors) are not counted."""
    if not isinstance(ids, list) or (ids and not isinstance(ids[0], int)):
        return None
    padding = ids.count(pad_token_id) if pad_token_id is not None else 0
    return TokenCounts(1, len(ids), len(ids) - padding, len(ids))


def truncated_encodings(encodings: Iterable[Any]) -> int:
    """Sequences the tokenizer truncated: their cut-off part is in ``overflowing``."""
    return sum(1 for encoding in encodings if encoding.overflowing)


def truncated_in(result: Any) -> int | None:
    """Truncated sequences of a ``BatchEncoding``, or None when it cannot tell (a slow
    tokenizer asked without ``return_overflowing_tokens``)."""
    getter = getattr(result, "get", None)
    if getter is None:
        return None
    mapping = getter("overflow_to_sample_mapping")
    if mapping is not None:
        # Overflowing windows became extra rows: a sample with several was truncated.
        samples = mapping if isinstance(mapping, list) else mapping.tolist()
        return sum(1 for rows in Counter(samples).values() if rows > 1)
    cut = getter("num_truncated_tokens")
    if cut is not None:
        values = cut if isinstance(cut, list) else [cut]
        return sum(1 for value in values if isinstance(value, int) and value > 0)
    encodings = getattr(result, "encodings", None)
    if encodings:
        return truncated_encodings(encodings)
    return None

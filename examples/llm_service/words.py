"""The service's vocabulary and deterministic prompts: made-up two-syllable words
(no corpus, no download), e.g. ``bako``, ``ruteli``."""

from __future__ import annotations

import random

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS]  # 70

WORDS: tuple[str, ...] = tuple(a + b for a in _SYLLABLES for b in _SYLLABLES[:29])  # 2030 words


def make_prompt(rng: random.Random, words: int) -> str:
    """A prompt of ``words`` vocabulary words (each one token)."""
    return " ".join(rng.choice(WORDS) for _ in range(words))

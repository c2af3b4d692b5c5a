"""Synthetic, deterministic request texts: short search queries and longer reviews.

The mix of lengths is what makes dynamic batching pay for padding: a batch is
padded to its longest text, so one review in a batch of queries wastes most of
the positions the model computes (the ``inference.tokens`` padding counter).
"""

from __future__ import annotations

import random

_PRODUCTS = (
    "wireless headphones", "running shoes", "espresso machine", "standing desk",
    "mechanical keyboard", "hiking backpack", "air fryer", "yoga mat", "4k monitor",
    "electric toothbrush", "cast iron pan", "noise cancelling earbuds", "rain jacket",
    "smart watch", "office chair", "water bottle", "camping tent", "bluetooth speaker",
)  # fmt: skip
_QUALIFIERS = (
    "cheap", "best", "lightweight", "waterproof", "for kids", "under 100 dollars",
    "with long battery life", "quiet", "for small apartments", "eco friendly",
    "for travel", "heavy duty", "discount", "2025 model", "refurbished",
)  # fmt: skip
_OPINIONS = (
    "I have been using this for about three weeks now and",
    "Bought it as a gift for my brother and honestly",
    "After returning two other brands I finally settled on this one because",
    "The packaging was damaged on arrival but",
    "Customer support answered within a day and",
    "Compared with the previous version",
)  # fmt: skip
_DETAILS = (
    "the build quality feels solid and nothing rattles",
    "the battery easily lasts a full working day",
    "setup took less than five minutes with the included guide",
    "it is a bit louder than I expected at the highest setting",
    "the colour is slightly different from the photos",
    "it fits perfectly in the space I measured for it",
    "the companion app keeps asking me to create an account",
    "cleaning it is easy since every part comes apart",
    "the price dropped right after I bought it which was annoying",
    "my whole family uses it every day without complaints",
)  # fmt: skip


def make_text(rng: random.Random) -> str:
    """One request text: 70% short queries (3-10 words), 30% reviews (20-90 words)."""
    product = rng.choice(_PRODUCTS)
    if rng.random() < 0.7:
        words = [rng.choice(_QUALIFIERS), product]
        if rng.random() < 0.5:
            words.append(rng.choice(_QUALIFIERS))
        return " ".join(words)
    sentences = [f"{rng.choice(_OPINIONS)} this {product} is worth it:"]
    for _ in range(rng.randint(1, 6)):
        sentences.append(rng.choice(_DETAILS) + ".")
    return " ".join(sentences)


def make_texts(count: int, seed: int = 11) -> list[str]:
    rng = random.Random(seed)
    return [make_text(rng) for _ in range(count)]

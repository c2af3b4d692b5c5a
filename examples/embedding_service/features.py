"""Per-user features kept in Redis: one hash per user, ``user:<id>``.

The service reads them for every request (``HGETALL``) and falls back to
defaults on a miss, as a real feature store client does for new or evicted users.

* ``prefix``: an instruction prepended to the text before tokenisation
  (``"query: "`` for search users, ``""`` for the others);
* ``dims``: how many leading embedding dimensions the user's client stores
  (384, 256 or 128); the vector is truncated and re-normalised after the model;
* ``tier``: ``free`` or ``pro`` (reported back; a real service would rate-limit on it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

KEY_PREFIX = "user:"
MODEL_DIMS = 384
DEFAULT_USERS = 5000
DEFAULT_COVERAGE = 0.9  # ~10% of user ids have no features: a realistic miss fraction


def user_key(user_id: int) -> str:
    return f"{KEY_PREFIX}{user_id}"


@dataclass(frozen=True)
class UserFeatures:
    prefix: str = ""
    dims: int = MODEL_DIMS
    tier: str = "free"
    found: bool = False  # False: defaults, the user had no features

    @classmethod
    def from_hash(cls, values: dict[bytes, bytes] | dict[str, str]) -> UserFeatures:
        """Decode an ``HGETALL`` reply; an empty reply is a miss (defaults)."""
        if not values:
            return cls()
        fields = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in values.items()
        }
        dims = int(fields.get("dims", MODEL_DIMS))
        return cls(
            prefix=fields.get("prefix", ""),
            dims=dims if 1 <= dims <= MODEL_DIMS else MODEL_DIMS,
            tier=fields.get("tier", "free"),
            found=True,
        )

    def to_hash(self) -> dict[str, str]:
        return {"prefix": self.prefix, "dims": str(self.dims), "tier": self.tier}


def seeded_features(
    users: int = DEFAULT_USERS, coverage: float = DEFAULT_COVERAGE, seed: int = 7
) -> dict[int, UserFeatures]:
    """Deterministic features for about ``coverage`` of user ids ``1..users``."""
    rng = random.Random(seed)
    features: dict[int, UserFeatures] = {}
    for user_id in range(1, users + 1):
        if rng.random() >= coverage:
            continue
        pro = rng.random() < 0.3
        features[user_id] = UserFeatures(
            prefix="query: " if rng.random() < 0.5 else "",
            dims=MODEL_DIMS if pro else rng.choice((256, 128)),
            tier="pro" if pro else "free",
            found=True,
        )
    return features

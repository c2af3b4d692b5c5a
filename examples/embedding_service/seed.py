"""Seed per-user features into Redis for the embedding service.

    python -m examples.embedding_service.seed --redis-url redis://127.0.0.1:6379/0

Writes ``user:<id>`` hashes for about 90% of user ids 1..5000 (the rest are misses
at serving time) in pipelined batches, replacing what was there. Deterministic.
"""

from __future__ import annotations

import argparse
import sys

import redis

from examples.embedding_service.features import (
    DEFAULT_COVERAGE,
    DEFAULT_USERS,
    KEY_PREFIX,
    seeded_features,
    user_key,
)


def seed(redis_url: str, users: int = DEFAULT_USERS, coverage: float = DEFAULT_COVERAGE) -> int:
    """Replace every ``user:*`` hash with the seeded features; returns how many were written."""
    client = redis.Redis.from_url(redis_url)
    try:
        stale = list(client.scan_iter(match=f"{KEY_PREFIX}*", count=1000))
        for start in range(0, len(stale), 1000):
            client.delete(*stale[start : start + 1000])
        features = seeded_features(users, coverage)
        pipe = client.pipeline(transaction=False)
        for index, (user_id, values) in enumerate(features.items(), start=1):
            pipe.hset(user_key(user_id), mapping=values.to_hash())
            if index % 1000 == 0:
                pipe.execute()
        pipe.execute()
        return len(features)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True, help="e.g. redis://127.0.0.1:6379/0")
    parser.add_argument("--users", type=int, default=DEFAULT_USERS, help="user ids 1..N")
    parser.add_argument(
        "--coverage", type=float, default=DEFAULT_COVERAGE, help="fraction of users with features"
    )
    args = parser.parse_args(argv)
    if not 0.0 <= args.coverage <= 1.0:
        parser.error("--coverage must be between 0 and 1")
    written = seed(args.redis_url, args.users, args.coverage)
    print(
        f"seeded features for {written} of {args.users} users "
        f"({1 - written / max(args.users, 1):.0%} will miss)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

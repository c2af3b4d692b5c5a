"""Load generator for the LLM service: client-side time to first token, per request.

    python -m examples.llm_service.loadgen --url http://127.0.0.1:8001 \
        --requests 60 --concurrency 3 --max-new-tokens 24

Each client keeps one streamed request in flight (closed loop, ``--concurrency``
clients). For every request it measures, on the client's monotonic clock:

* **TTFT**: from just before the request is sent to the arrival of the first
  ``data:`` event (the first token);
* **TPOT**: from the first token to the last, over the tokens after the first;
* the total time and the token count.

It also measures the **loopback round trip**: the median time of ``GET /healthz``
(one small request and response on 127.0.0.1), the network share of a TTFT.

Prompts have ``--min-words`` to ``--max-words`` words (each one token), drawn
deterministically (``--seed``). Only loopback URLs are accepted. Prints a summary;
``--json`` writes the per-request figures and the summary to a file.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import random
import socket
import sys
import time
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from examples.llm_service.words import make_prompt


@dataclass
class Result:
    ttft: float | None
    total: float
    tokens: int
    prompt_words: int
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.tokens < 2:
            return None
        return (self.total - self.ttft) / (self.tokens - 1)


def nearest_rank(values: list[float], q: float) -> float | None:
    """The ceil(q*n)-th smallest value (the report's percentile method)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(round(q * len(ordered), 9)))
    return ordered[min(rank, len(ordered)) - 1]


def _loopback_only(url: str) -> None:
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise SystemExit(f"cannot resolve {host!r}: {exc}") from None
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise SystemExit(f"{url} is not a loopback address: the load stays on this machine")


async def one(client: httpx.AsyncClient, url: str, prompt: str, max_new: int) -> Result:
    body = json.dumps({"prompt": prompt, "max_new_tokens": max_new}).encode()
    words = len(prompt.split())
    start = time.perf_counter()
    first = None
    tokens = 0
    try:
        async with client.stream("POST", f"{url}/generate", content=body) as response:
            if response.status_code != 200:
                await response.aread()
                return Result(
                    None, time.perf_counter() - start, 0, words, str(response.status_code)
                )
            async for line in response.aiter_lines():
                if line.startswith("data: ") and not line.startswith("data: {"):
                    if first is None:
                        first = time.perf_counter() - start
                    tokens += 1
                elif line.startswith("data: {") and '"error"' in line:
                    return Result(first, time.perf_counter() - start, tokens, words, "generation")
    except httpx.HTTPError as exc:
        return Result(first, time.perf_counter() - start, tokens, words, type(exc).__name__)
    return Result(first, time.perf_counter() - start, tokens, words)


async def loopback_rtt(client: httpx.AsyncClient, url: str, samples: int = 50) -> float:
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        response = await client.get(f"{url}/healthz")
        response.raise_for_status()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    prompts = [
        make_prompt(rng, rng.randint(args.min_words, args.max_words)) for _ in range(args.requests)
    ]
    results: list[Result] = []
    limits = httpx.Limits(max_connections=args.concurrency + 1)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits, trust_env=False) as client:
        rtt_before = await loopback_rtt(client, args.url)
        pending = list(reversed(prompts))
        deadline = time.monotonic() + args.max_seconds

        async def worker() -> None:
            while pending and time.monotonic() < deadline:
                results.append(await one(client, args.url, pending.pop(), args.max_new_tokens))

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        seconds = time.monotonic() - started
        rtt_after = await loopback_rtt(client, args.url)
    ok = [r for r in results if r.error is None and r.ttft is not None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tpots = [t for t in (r.tpot for r in ok) if t is not None]
    summary = {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "skipped": len(pending),
        "seconds": round(seconds, 3),
        "ttft_p50": nearest_rank(ttfts, 0.5),
        "ttft_p95": nearest_rank(ttfts, 0.95),
        "ttft_mean": sum(ttfts) / len(ttfts) if ttfts else None,
        "tpot_p50": nearest_rank(tpots, 0.5),
        "tpot_p95": nearest_rank(tpots, 0.95),
        "tokens": sum(r.tokens for r in ok),
        "loopback_rtt": max(rtt_before, rtt_after),
    }
    return {"summary": summary, "results": [asdict(r) for r in results]}


def describe(summary: dict[str, Any]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.1f} ms"

    return (
        f"client: {summary['requests']} requests ({summary['errors']} errors, "
        f"{summary['skipped']} skipped) in {summary['seconds']:.1f} s; "
        f"TTFT p50 {ms(summary['ttft_p50'])}, p95 {ms(summary['ttft_p95'])}; "
        f"TPOT p50 {ms(summary['tpot_p50'])}; loopback round trip {ms(summary['loopback_rtt'])}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8001")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--min-words", type=int, default=32)
    parser.add_argument("--max-words", type=int, default=256)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="write per-request figures and the summary")
    args = parser.parse_args(argv)
    _loopback_only(args.url)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = asyncio.run(run(args))
    print(describe(data["summary"]), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(data, indent=1))
    return 1 if data["summary"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

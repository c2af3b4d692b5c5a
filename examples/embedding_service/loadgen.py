"""A bounded load generator for the embedding service: a steady phase, then a burst.

    python -m examples.embedding_service.loadgen --url http://127.0.0.1:8000 \
        --steady-requests 300 --rate 15 --burst-requests 120 --burst-concurrency 60

* steady: open-loop arrivals (Poisson, ``--rate`` per second) for ``--steady-requests``;
* burst: ``--burst-requests`` sent with ``--burst-concurrency`` in flight at once, the
  load that fills the batcher's queue.

Bounded in count and in time: the run stops at ``--max-seconds`` whatever is left
(requests not yet sent are skipped and reported). Only loopback addresses are
accepted. User ids are drawn from 1..``--users``, so about 10% of requests miss
the seeded features. Texts and ids are deterministic (``--seed``).

Prints a per-phase summary (client-side latency percentiles) to stderr, and with
``--json`` the same as one JSON object on stdout. Exit status 1 when more than 1%
of the requests sent failed.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import socket
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import httpx
from tqdm import tqdm

from examples.embedding_service.features import DEFAULT_USERS
from examples.embedding_service.texts import make_text


@dataclass
class PhaseResult:
    name: str
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    seconds: float = 0.0

    def add_error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)

        def quantile(q: float) -> float | None:
            if not ordered:
                return None
            return round(ordered[max(0, round(q * len(ordered)) - 1)] * 1000, 2)

        return {
            "phase": self.name,
            "ok": len(ordered),
            "failed": sum(self.errors.values()),
            "errors": self.errors,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 2),
            "p50_ms": quantile(0.5),
            "p95_ms": quantile(0.95),
            "p99_ms": quantile(0.99),
        }


def check_loopback(url: str) -> str:
    """The URL, if its host is a loopback address (127.0.0.0/8, ::1, localhost)."""
    host = urllib.parse.urlsplit(url).hostname
    if not host:
        raise ValueError(f"no host in {url!r}")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {host!r}: {exc}") from exc
    if not addresses or not all(ipaddress.ip_address(a).is_loopback for a in addresses):
        raise ValueError(f"{host!r} is not a loopback address: this load generator stays local")
    return url.rstrip("/")


class LoadGenerator:
    def __init__(self, url: str, users: int, seed: int, deadline: float, bar: tqdm) -> None:
        self.url = url
        self.rng = random.Random(seed)
        self.users = users
        self.deadline = deadline
        self.bar = bar

    def payload(self) -> bytes:
        body = {"user_id": self.rng.randint(1, self.users), "text": make_text(self.rng)}
        return json.dumps(body).encode()

    async def one(self, client: httpx.AsyncClient, body: bytes, result: PhaseResult) -> None:
        start = time.perf_counter()
        try:
            response = await client.post(
                "/embed", content=body, headers={"content-type": "application/json"}
            )
            if response.status_code == 200 and response.json().get("embedding"):
                result.latencies.append(time.perf_counter() - start)
            else:
                result.add_error(f"HTTP {response.status_code}")
        except httpx.HTTPError as exc:
            result.add_error(type(exc).__name__)
        finally:
            self.bar.update(1)

    def out_of_time(self) -> bool:
        return time.monotonic() >= self.deadline

    async def steady(self, client: httpx.AsyncClient, count: int, rate: float) -> PhaseResult:
        result = PhaseResult("steady")
        start = time.monotonic()
        tasks: set[asyncio.Task[None]] = set()
        next_at = start
        for index in range(count):
            next_at += self.rng.expovariate(rate)
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.out_of_time():
                result.skipped = count - index
                break
            task = asyncio.create_task(self.one(client, self.payload(), result))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await self.drain(tasks)
        result.seconds = time.monotonic() - start
        return result

    async def burst(self, client: httpx.AsyncClient, count: int, concurrency: int) -> PhaseResult:
        result = PhaseResult("burst")
        start = time.monotonic()
        bodies = [self.payload() for _ in range(count)]
        gate = asyncio.Semaphore(concurrency)
        sent = 0

        async def limited(body: bytes) -> None:
            nonlocal sent
            async with gate:
                if self.out_of_time():
                    return
                sent += 1
                await self.one(client, body, result)

        tasks = {asyncio.create_task(limited(body)) for body in bodies}
        await self.drain(tasks)
        result.skipped = count - sent
        result.seconds = time.monotonic() - start
        return result

    async def drain(self, tasks: set[asyncio.Task[None]]) -> None:
        if not tasks:
            return
        remaining = max(0.0, self.deadline - time.monotonic()) + 5.0  # in-flight grace
        _done, pending = await asyncio.wait(tasks, timeout=remaining)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    url = check_loopback(args.url)
    total = args.steady_requests + args.burst_requests
    limits = httpx.Limits(max_connections=max(args.burst_concurrency, 8))
    with tqdm(total=total, desc="load", unit="req", disable=args.quiet, file=sys.stderr) as bar:
        generator = LoadGenerator(
            url, args.users, args.seed, time.monotonic() + args.max_seconds, bar
        )
        async with httpx.AsyncClient(
            base_url=url, timeout=args.timeout, limits=limits, trust_env=False
        ) as client:
            results = []
            if args.steady_requests:
                bar.set_description("steady")
                results.append(await generator.steady(client, args.steady_requests, args.rate))
            if args.burst_requests:
                bar.set_description("burst")
                results.append(
                    await generator.burst(client, args.burst_requests, args.burst_concurrency)
                )
    return [result.summary() for result in results]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Bounded load: a steady phase, then a burst.")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="loopback only")
    parser.add_argument("--steady-requests", type=int, default=300)
    parser.add_argument("--rate", type=float, default=15.0, help="steady arrivals per second")
    parser.add_argument("--burst-requests", type=int, default=120)
    parser.add_argument("--burst-concurrency", type=int, default=60)
    parser.add_argument("--users", type=int, default=DEFAULT_USERS, help="user ids 1..N")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="hard time bound")
    parser.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.steady_requests < 0 or args.burst_requests < 0 or args.burst_concurrency < 1:
        parser.error("request counts must be >= 0 and --burst-concurrency >= 1")
    if args.rate <= 0 or args.max_seconds <= 0:
        parser.error("--rate and --max-seconds must be > 0")
    try:
        summaries = asyncio.run(run(args))
    except ValueError as exc:
        parser.error(str(exc))
    for item in summaries:
        print(
            f"{item['phase']:>6}: {item['ok']} ok, {item['failed']} failed, "
            f"{item['skipped']} skipped in {item['seconds']} s; client latency "
            f"p50 {item['p50_ms']} ms, p95 {item['p95_ms']} ms, p99 {item['p99_ms']} ms",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(summaries))
    sent = sum(item["ok"] + item["failed"] for item in summaries)
    failed = sum(item["failed"] for item in summaries)
    return 1 if sent == 0 or failed > 0.01 * sent else 0


if __name__ == "__main__":
    sys.exit(main())

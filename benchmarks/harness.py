"""Same-run interleaved A/B benchmark harness.

Noisy 2-core machines make absolute timings unreliable, so every case of a
benchmark runs in the same process, interleaved round by round (A B C A B C
...), and we report per-operation medians and ratios against a baseline case
measured in the same rounds. Results go to ``benchmarks/results.md``, one
section per benchmark, rewritten in place, with versions and machine.

Usage::

    from benchmarks.harness import Benchmark

    bench = Benchmark("stage() overhead", baseline="bare")
    bench.case("bare", lambda n: run_bare(n))       # each callable runs n operations
    bench.case("stage", lambda n: run_stage(n))
    result = bench.run(ops=20_000, rounds=15)
    result.write("benchmarks/results.md")
"""

from __future__ import annotations

import gc
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

RESULTS_PATH = Path(__file__).with_name("results.md")

# A bare ``perf_counter_ns()`` pair on this machine class when it runs at full speed:
# 0.125-0.139 us in the quiet runs of 2026-12-01. These shared VMs run up to 2x slower
# for minutes at a time with nothing of ours running (the host's contention): the bare
# pair then takes 0.25-0.28 us, a Python loop twice as long, orjson 1.5x. Targets given
# in microseconds are judged on the rounds that ran at full speed
# (``BenchmarkResult.full_speed``); ``at_quiet_speed`` scales a slow run's figure by
# its bare pair, an estimate only (code slows unevenly), printed beside it.
QUIET_PAIR_US = 0.13
# A round whose bare pair took at most this ran at full speed.
FULL_SPEED_PAIR_US = 0.15


def at_quiet_speed(us: float, pair_us: float) -> float:
    """``us``, measured in a run where a bare ``perf_counter_ns()`` pair took
    ``pair_us``, at the speed where a pair takes :data:`QUIET_PAIR_US`."""
    return us * QUIET_PAIR_US / pair_us


def pairs(n: int) -> None:
    """``n`` bare ``perf_counter_ns()`` pairs: the machine's speed, measured in the run."""
    for _ in range(n):
        time.perf_counter_ns()
        time.perf_counter_ns()


_VERSIONED = ("opentelemetry-sdk", "opentelemetry-api", "torch", "redis", "tokenizers", "orjson")


@dataclass
class CaseResult:
    name: str
    per_op_us: list[float]

    @property
    def median_us(self) -> float:
        return statistics.median(self.per_op_us)

    @property
    def spread_us(self) -> float:
        """Interquartile range of the per-round figures: how noisy the run was."""
        if len(self.per_op_us) < 4:
            return 0.0
        q = statistics.quantiles(self.per_op_us, n=4)
        return q[2] - q[0]


@dataclass
class BenchmarkResult:
    title: str
    baseline: str | None
    ops: int
    rounds: int
    cases: dict[str, CaseResult]
    notes: list[str] = field(default_factory=list)

    def ratio(self, name: str, baseline: str | None = None) -> float:
        base = self.cases[baseline or self.baseline]
        return self.cases[name].median_us / base.median_us

    def added_us(self, name: str, baseline: str | None = None) -> float:
        base = self.cases[baseline or self.baseline]
        return self.cases[name].median_us - base.median_us

    def full_speed(
        self, name: str, baseline: str, pair_case: str, pairs_per_op: int = 1
    ) -> tuple[float | None, int]:
        """``name``'s added time over ``baseline`` (median, per op, us) in the rounds
        where the machine ran at full speed (a bare pair of ``pair_case``, which runs
        ``pairs_per_op`` pairs an op, took at most :data:`FULL_SPEED_PAIR_US`), and how
        many rounds those were; ``(None, 0)`` when none was. The cases of one round run
        seconds apart, so a round is judged whole."""
        pair_rounds = self.cases[pair_case].per_op_us
        added = [
            case - base
            for case, base, pair in zip(
                self.cases[name].per_op_us,
                self.cases[baseline].per_op_us,
                pair_rounds,
                strict=True,
            )
            if pair / pairs_per_op <= FULL_SPEED_PAIR_US
        ]
        return (statistics.median(added), len(added)) if added else (None, 0)

    def markdown(self) -> str:
        lines = [
            f"## {self.title}",
            "",
            f"{self.rounds} interleaved rounds x {self.ops} operations per case; "
            f"{environment_line()}",
            "",
            "| case | median per op (us) | IQR (us) |"
            + (f" vs `{self.baseline}` |" if self.baseline else ""),
            "|---|---:|---:|" + ("---:|" if self.baseline else ""),
        ]
        for case in self.cases.values():
            row = f"| {case.name} | {case.median_us:.3f} | {case.spread_us:.3f} |"
            if self.baseline:
                row += f" {self.ratio(case.name):.3f}x ({self.added_us(case.name):+.3f} us) |"
            lines.append(row)
        if self.notes:
            lines.append("")
            lines.extend(f"- {note}" for note in self.notes)
        return "\n".join(lines) + "\n"

    def write(self, path: str | os.PathLike[str] = RESULTS_PATH) -> None:
        """Replace this benchmark's section in ``path`` (or append it)."""
        write_section(self.title, self.markdown(), path)


def write_section(title: str, section: str, path: str | os.PathLike[str] = RESULTS_PATH) -> None:
    """Replace the ``## title`` section of the results file with ``section`` (or append it),
    for benchmarks whose tables are not a :class:`BenchmarkResult`."""
    path = Path(path)
    text = (
        path.read_text()
        if path.exists()
        else "# Benchmark results\n\nGenerated by `make bench`; do not edit by hand.\n"
    )
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def environment_line() -> str:
    versions = []
    for name in _VERSIONED:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return (
        f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        + ", ".join(versions)
    )


class Benchmark:
    """Cases measured in interleaved rounds within one process."""

    def __init__(self, title: str, baseline: str | None = None) -> None:
        self.title = title
        self.baseline = baseline
        self._cases: dict[str, Callable[[int], object]] = {}

    def case(self, name: str, run: Callable[[int], object]) -> None:
        """``run(n)`` performs ``n`` operations of this case (with ``run(...,
        self_timed=True)``, it times itself to leave its setup out and returns the
        elapsed nanoseconds)."""
        self._cases[name] = run

    def run(
        self,
        ops: int = 10_000,
        rounds: int = 15,
        warmup_ops: int | None = None,
        clock: Callable[[], int] = time.perf_counter_ns,
        self_timed: bool = False,
    ) -> BenchmarkResult:
        """Interleaved rounds; ``clock=time.thread_time_ns`` measures the calling
        thread's CPU time, which leaves out a shared machine's scheduling noise when
        the cost under test is CPU on the calling thread."""
        warmup = max(1, ops // 10) if warmup_ops is None else warmup_ops
        for run in self._cases.values():
            run(warmup)
        timings: dict[str, list[float]] = {name: [] for name in self._cases}
        names = list(self._cases)
        for round_index in range(rounds):
            # Rotate the order each round so no case always runs first after a gc.
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for name in order:
                gc.collect()
                start = clock()
                reported = self._cases[name](ops)
                elapsed = reported if self_timed else clock() - start
                timings[name].append(elapsed / ops / 1000)
        cases = {name: CaseResult(name, timings[name]) for name in names}
        return BenchmarkResult(self.title, self.baseline, ops, rounds, cases)

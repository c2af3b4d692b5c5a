"""The stage hot path in CPU instructions (valgrind's callgrind): free of the machine's noise.

These VMs run up to 2x slower for minutes at a time (see harness.py), so the microsecond
figures of ``bench_fastpath`` and ``bench_request_accounting`` are judged on the rounds at
full speed only. An instruction count does not depend on the host: it is how a change to
the hot path is measured here (a change of a few hundred instructions is visible), beside
the timed figures. Each figure is the difference of two runs of the same process, with
and without ``REQUESTS`` unsampled requests, so start-up and imports cancel out:

* one more distinct stage in a request (12 stages minus 6, divided by 6): the issue's
  "first call in a request included", tally and request-end records included;
* one more call of a stage already called (each of 6 stages called twice, minus once);
on the compiled core and on the pure-Python one (``OTEL_INFERENCE_SPEEDUPS=false``).
The cyclic GC is off during the measured requests: where a collection falls would
otherwise move a count by a thousand or two. Skipped, said in one line, where valgrind
is not installed.

    python -m benchmarks.bench_instructions
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import environment_line, write_section

TITLE = "stage hot path in CPU instructions (callgrind)"
REQUESTS = 1_000
ROOT = Path(__file__).resolve().parent.parent
_COLLECTED = re.compile(r"Collected : (\d+)")


def _child(mode: str, requests: int) -> None:
    """The measured process: ``requests`` unsampled requests of ``mode``'s stages."""
    import gc

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    from benchmarks.bench_fastpath import BUDGETS, fast_provider
    from otel_inference import StageRecorder

    names = [f"stage_{i}" for i in range(12)]
    stages = {"6": names[:6], "12": names, "6x2": names[:6] * 2}[mode]
    recorder = StageRecorder(
        TracerProvider(sampler=ALWAYS_OFF), fast_provider()[0], budgets=BUDGETS
    )
    stage = recorder.stage

    def run(count: int) -> None:
        for _ in range(count):
            with recorder.request():
                for name in stages:
                    with stage(name):
                        pass

    run(200)  # warm: series and attribute sets made, as in a serving process
    gc.collect()
    gc.disable()
    run(requests)


def _instructions(valgrind: str, mode: str, requests: int, speedups: bool) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        completed = subprocess.run(
            [
                valgrind,
                "--tool=callgrind",
                f"--callgrind-out-file={scratch}/out",
                sys.executable,
                "-m",
                "benchmarks.bench_instructions",
                "--child",
                mode,
                str(requests),
            ],
            cwd=ROOT,
            env={
                **os.environ,
                "OTEL_INFERENCE_SPEEDUPS": "true" if speedups else "false",
                # String hashes, and so dict probes, the same in every run.
                "PYTHONHASHSEED": "0",
            },
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
    found = _COLLECTED.search(completed.stderr)
    if found is None:
        raise RuntimeError(f"callgrind printed no count: {completed.stderr[-2000:]}")
    return int(found.group(1))


def _added(valgrind: str, mode: str, speedups: bool) -> int:
    """Instructions ``REQUESTS`` requests of ``mode`` add to the same process."""
    return _instructions(valgrind, mode, REQUESTS, speedups) - _instructions(
        valgrind, mode, 0, speedups
    )


def main() -> int:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print(f"{TITLE}: skipped (valgrind is not installed: apt-get install valgrind)")
        return 0
    rows = []
    for core, speedups in (("compiled", True), ("pure Python", False)):
        six, twelve, twice = (_added(valgrind, mode, speedups) for mode in ("6", "12", "6x2"))
        distinct = (twelve - six) / (6 * REQUESTS)
        repeated = (twice - six) / (6 * REQUESTS)
        rows.append(
            f"| {core} | {distinct / 1000:.1f}k | {repeated / 1000:.1f}k | "
            f"{(distinct - repeated) / 1000:.1f}k | {six / REQUESTS / 1000:.0f}k |"
        )
    section = "\n".join(
        [
            f"## {TITLE}",
            "",
            f"Differences of callgrind runs with and without {REQUESTS:,} unsampled requests "
            f"(fast path, budgets set, cyclic GC off while measured, PYTHONHASHSEED=0); "
            f"{environment_line()}.",
            "",
            "| core | one more distinct stage | one more call of a stage already called | "
            "the first call's own part | a request of 6 stages |",
            "|---|---:|---:|---:|---:|",
            *rows,
            "",
            "The first call's own part is the distinct stage minus the repeated call. On the "
            "pure-Python core it is negative: a stage called twice has its two intervals "
            "merged in Python at the request's end, which costs more than a second tally.",
            "",
        ]
    )
    write_section(TITLE, section)
    print(section)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(main())

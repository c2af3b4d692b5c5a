"""Run every ``benchmarks/bench_*.py`` module in turn (each rewrites its section of results.md)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main() -> int:
    names = sorted(path.stem for path in Path(__file__).parent.glob("bench_*.py"))
    selected = [name for name in names if not sys.argv[1:] or name in sys.argv[1:]]
    for name in selected:
        print(f"== benchmarks.{name}", flush=True)
        runpy.run_module(f"benchmarks.{name}", run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())

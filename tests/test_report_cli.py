"""``otel-inference report`` as a user runs it: formats, defaults, bad input, and the
HTML page rendered by headless Chromium."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from tests.apps.report_spans import GAP, SpanWriter
from tests.servers import LOCALHOST, free_port, require_binary

CLI = str(Path(sys.executable).parent / "otel-inference")
QUEUE_COLOUR = (0x4E, 0x79, 0xA7)  # the first stage's colour in the HTML charts


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_INFERENCE_")}
    return subprocess.run(
        [CLI, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, **(env or {})},
        cwd=cwd,
    )


@pytest.fixture
def spans_file(tmp_path: Path) -> Path:
    writer = SpanWriter(tmp_path / "spans.jsonl")
    for wait in [*range(1, 19), 40, 60]:
        writer.request(
            [
                ("queue_wait", wait),
                ("tokenize", 2),
                ("model_forward", 10),
                (GAP, 1),
                ("serialize", 1),
            ]
        )
    writer.batch([30, 10, 5, 1], forward_ms=20, after_ms=1)
    return writer.close()


def test_table_json_and_html(spans_file, tmp_path):
    table = run("report", "--spans", str(spans_file), "--cost-per-hour", "3.6")
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith(f"otel-inference report: 24 requests from {spans_file}")
    assert re.search(r"^queue_wait +24 +", table.stdout, re.MULTILINE)
    assert "$/1M req" in table.stdout and "Verdict: queue_wait dominates the tail" in table.stdout

    as_json = run(
        "report", "--spans", str(spans_file), "--format", "json", "--budgets", "queue_wait=20ms"
    )
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    rows = {row["label"]: row for row in data["rows"]}
    assert rows["queue_wait"]["budget"] == 0.020 and rows["queue_wait"]["status"] == "over"
    assert rows["model_forward"]["count"] == 20 and rows["batch"]["count"] == 4

    page = tmp_path / "report.html"
    html = run("report", "--spans", str(spans_file), "--format", "html", "--output", str(page))
    assert html.returncode == 0, html.stderr
    assert html.stdout == "" and f"wrote {page}" in html.stderr
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "<svg" in text and "queue_wait" in text
    # Self-contained: nothing to fetch.
    for fetch in ("<script", "<link", "<img", "src=", "url(", "@import", "http://", "https://"):
        assert fetch not in text, fetch


def test_budgets_and_span_file_default_from_the_environment(spans_file, tmp_path):
    result = run(
        "report",
        "--format",
        "json",
        env={
            "OTEL_INFERENCE_SPANS_FILE": str(spans_file),
            "OTEL_INFERENCE_BUDGETS": "model_forward=5ms",
        },
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["source"] == str(spans_file)
    rows = {row["label"]: row for row in data["rows"]}
    assert (rows["model_forward"]["budget"], rows["model_forward"]["status"]) == (0.005, "over")

    # Unset: the demo's file, relative to the working directory.
    result = run("report", cwd=tmp_path)
    assert result.returncode == 1
    assert "span file 'build/demo/spans.jsonl' does not exist" in result.stderr


@pytest.fixture
def plain_spans(tmp_path: Path) -> Path:
    writer = SpanWriter(tmp_path / "plain.jsonl")
    writer.plain("GET /", 3)
    return writer.close()


def _bad_inputs(tmp: Path, plain: Path) -> list[tuple[list[str], dict[str, str], int, str]]:
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    dead = f"http://{LOCALHOST}:{free_port()}"
    return [
        (["--spans", str(tmp / "missing.jsonl")], {}, 1, "does not exist"),
        (["--spans", str(empty)], {}, 1, "is empty"),
        (["--spans", str(plain)], {}, 1, "not recorded by otel-inference"),
        (["--jaeger", dead, "--service", "x"], {}, 1, f"cannot reach Jaeger at {dead}"),
        (["--prometheus", dead], {}, 1, f"cannot reach Prometheus at {dead}"),
        (["--jaeger", dead], {}, 1, "--jaeger needs --service"),
        (["--jaeger", "ftp://x", "--service", "x"], {}, 1, "must look like http://host:port"),
        (["--prometheus", dead, "--window", "5 minutes"], {}, 1, "--window '5 minutes'"),
        (["--prometheus", dead, "--cost-per-hour", "2"], {}, 1, "--cost-per-hour needs spans"),
        (["--budgets", "tokenize=5"], {}, 2, "--budgets: budget 'tokenize=5' has no unit"),
        (["--cost-per-hour", "cheap"], {}, 2, "'cheap' is not a number of dollars"),
        (["--cost-per-hour", "-1"], {}, 2, "must be a finite, non-negative number"),
        (["--format", "xml"], {}, 2, "invalid choice: 'xml'"),
        (["--limit", "0"], {}, 2, "'0' must be at least 1"),
        (["--spans", str(plain), "--jaeger", dead], {}, 2, "not allowed with argument"),
        ([], {"OTEL_INFERENCE_BUDGETS": "tokenize"}, 1, "OTEL_INFERENCE_BUDGETS: entry"),
    ]


def test_bad_input_gives_one_message_and_a_failure_status(tmp_path, plain_spans):
    for args, env, status, message in _bad_inputs(tmp_path, plain_spans):
        result = run("report", *args, env=env, cwd=tmp_path)
        assert result.returncode == status, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr, args
        assert result.stdout == "", args
        lines = [line for line in result.stderr.splitlines() if "error:" in line]
        assert len(lines) == 1, (args, result.stderr)


def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Width, height and rows of RGB(A) pixels of an 8-bit PNG (all five filters)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += length + 12
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up = previous[i]
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                corner = previous[i - bpp] if i >= bpp else 0
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                pred = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + pred) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, height, [bytes(r) for r in rows] if bpp == 3 else _rgb(rows)


def _rgb(rows: list[bytes]) -> list[bytes]:
    return [bytes(b for i, b in enumerate(row) if i % 4 != 3) for row in rows]


def chromium_screenshot(chromium: str, page: Path, shot: Path, size: tuple[int, int]) -> Path:
    """``page`` rendered by headless Chromium (no network, a throwaway profile) into ``shot``."""
    result = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={shot.parent / 'profile'}",
            f"--screenshot={shot}",
            f"--window-size={size[0]},{size[1]}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.exists(), result.stderr[-2000:]
    return shot


def test_html_renders_in_headless_chromium(spans_file, tmp_path):
    chromium = require_binary("chromium")
    page = tmp_path / "report.html"
    made = run("report", "--spans", str(spans_file), "--format", "html", "--output", str(page))
    assert made.returncode == 0, made.stderr
    shot = chromium_screenshot(chromium, page, tmp_path / "report.png", (1200, 900))
    width, height, rows = png_pixels(shot)
    assert (width, height) == (1200, 900)
    pixels = [row[i : i + 3] for row in rows for i in range(0, len(row), 3)]
    colours = set(pixels)
    assert len(colours) > 50  # text, bars and table, not a blank or error page

    def near(pixel: bytes, target: tuple[int, int, int]) -> bool:
        return all(abs(a - b) <= 4 for a, b in zip(pixel, target, strict=True))

    # The stacked tail bar: queue_wait holds 78% of a 960 px wide, 40 px high bar.
    painted = sum(1 for pixel in colours if near(pixel, QUEUE_COLOUR))
    bar = sum(1 for pixel in pixels if near(pixel, QUEUE_COLOUR))
    assert painted and bar > 0.5 * 960 * 40, bar

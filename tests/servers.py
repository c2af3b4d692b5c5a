"""Real servers for tests: redis-server and prometheus on 127.0.0.1, free ports.

Tests never talk to anything but 127.0.0.1. Binaries come from Debian packages, which
``make test`` installs when run as root (scripts/bootstrap.sh); a missing binary skips its
tests with the package to install, and fails them under CI.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sysconfig
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, NoReturn

import pytest

LOCALHOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


ROOT = Path(__file__).resolve().parent.parent


def debian_package(command: str) -> str:
    """The Debian package of a command, from the list scripts/bootstrap.sh installs from."""
    for line in (ROOT / "scripts" / "debian-packages.txt").read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if fields and fields[0] == command:
            return fields[1]
    return command


def missing(need: str) -> NoReturn:
    """Skip the test for a missing system package, naming it; under CI, fail it."""
    message = (
        f"{need} is not installed: sudo apt-get install {debian_package(need)} "
        "(`make test` installs it when run as root)"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(name)
    return path


def require_python_headers() -> Path:
    """Python.h of the running interpreter (torch.compile's C++ kernels include it)."""
    header = Path(sysconfig.get_path("include")) / "Python.h"
    if not header.exists():
        missing("Python.h")
    return header


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except Exception as exc:  # the server is still starting
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last_error})")


class RedisServer:
    """A real redis-server process; ``stop()``/``start()`` for fault tests."""

    def __init__(self, workdir: Path) -> None:
        self.binary = require_binary("redis-server")
        self.host = LOCALHOST
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def ping(self) -> bool:
        with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                self.host,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.ping, 10, f"redis-server on {self.host}:{self.port}")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None


class PrometheusServer:
    """A real prometheus scraping targets added at run time (file-based discovery)."""

    def __init__(self, workdir: Path, scrape_interval: str = "1s") -> None:
        self.binary = require_binary("prometheus")
        self.host = LOCALHOST
        self.port = free_port()
        self.workdir = workdir
        self.targets_file = workdir / "targets.json"
        self.targets_file.write_text("[]")
        self.rule_files: list[Path] = []
        self.scrape_interval = scrape_interval
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _write_config(self) -> Path:
        config = {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": "app",
                    "scrape_interval": self.scrape_interval,
                    "file_sd_configs": [
                        {"files": [str(self.targets_file)], "refresh_interval": "1s"}
                    ],
                }
            ],
        }
        path = self.workdir / "prometheus.yml"
        path.write_text(json.dumps(config))  # JSON is valid YAML
        return path

    def start(self) -> PrometheusServer:
        config = self._write_config()
        self.process = subprocess.Popen(
            [
                self.binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address={self.host}:{self.port}",
                "--web.enable-lifecycle",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log_path.open("wb"),
        )
        wait_until(self._ready, 30, f"prometheus on {self.url}")
        return self

    def _ready(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
            return response.status == 200

    def set_targets(self, targets: list[str], labels: dict[str, str] | None = None) -> None:
        self.targets_file.write_text(json.dumps([{"targets": targets, "labels": labels or {}}]))

    def reload(self) -> None:
        self._write_config()
        req = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        urllib.request.urlopen(req, timeout=5).close()

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path} failed: {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        return self.api("query", query=promql)["result"]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

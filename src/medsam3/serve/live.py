"""``medsam3 serve`` as a real child process on 127.0.0.1 (for the browser and load tests, benchmarks)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peak_rss_bytes(pid: int) -> int | None:
    """The process's peak resident memory (Linux VmHWM), or its current RSS elsewhere."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except Exception:
        return None


class LiveServer:
    """Start ``medsam3 serve`` on a free port, wait until it answers, stop it gracefully (SIGINT).

    The server's stdout and stderr go to ``log_path``; ``tmpdir`` becomes its TMPDIR, so a test can
    check that the server left no temporary files behind.
    """

    def __init__(
        self,
        model: str,
        *,
        args: tuple[str, ...] = (),
        log_path: str | Path | None = None,
        tmpdir: str | Path | None = None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 180.0,
    ):
        self.model = model
        self.args = tuple(args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._own_log = log_path is None  # a log made here is removed on stop (its text is kept)
        self.log_path = (
            Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="medsam3-serve-", suffix=".log")[1])
        )
        self._final_log: str | None = None
        self.tmpdir = None if tmpdir is None else Path(tmpdir)
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.peak_rss: int | None = None
        self.health: dict | None = None

    def __enter__(self) -> LiveServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **self.env}
        if self.tmpdir is not None:
            self.tmpdir.mkdir(parents=True, exist_ok=True)
            env["TMPDIR"] = str(self.tmpdir)
        command = [sys.executable, "-m", "medsam3.cli", "serve", "--model", self.model, "--device", "cpu",
                   "--host", "127.0.0.1", "--port", str(self.port), *self.args]  # fmt: skip
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"medsam3 serve exited with {self.process.returncode}:\n{self.log_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/api/health", timeout=2) as response:
                    self.health = json.loads(response.read())
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            f"medsam3 serve did not answer within {self.startup_timeout:g} s:\n{self.log_text()[-3000:]}"
        )

    def rss_now(self) -> int | None:
        return None if self.process is None else peak_rss_bytes(self.process.pid)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGINT (uvicorn's graceful shutdown), then terminate/kill if needed; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.peak_rss = peak_rss_bytes(self.process.pid)
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                try:
                    self.process.wait(5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(5)
        self._log.close()
        if self._own_log and self._final_log is None:
            self._final_log = self.log_text()
            self.log_path.unlink(missing_ok=True)
        return self.process.returncode

    def log_text(self) -> str:
        if self._final_log is not None:
            return self._final_log
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

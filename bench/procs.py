"""The processes a run starts: the SMTP sink, the floor's server, gateway replicas.

Each is a real subprocess on a free loopback port, stopped with SIGTERM (then
SIGKILL) by its own pid. `RssSampler` watches a process's resident memory.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2
import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """A subprocess with its output in a log file."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_http(process: Process, url: str, timeout: float = 60.0) -> None:
    """Until `url` answers (any status): the server is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.check_alive()
        try:
            httpx2.get(url, timeout=1)
            return
        except httpx2.HTTPError:
            time.sleep(0.05)
    process.stop()
    raise RuntimeError(f"{process.name} did not answer at {url} within {timeout:.0f}s")


def wait_port(process: Process, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.check_alive()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    process.stop()
    raise RuntimeError(f"{process.name} did not listen on {port} within {timeout:.0f}s")


class Sink:
    """`python -m bench.sink` on a free port; `stop()` returns how many messages it accepted."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.process = Process(
            "smtp sink", [sys.executable, "-m", "bench.sink", str(self.port)], workdir / "sink.log", _env()
        )
        wait_port(self.process, self.port)

    def stop(self) -> int:
        self.process.stop()
        for line in reversed(self.process.log.read_text().splitlines()):
            if line.startswith("accepted "):
                return int(line.split()[1])
        return -1


class NoopServer:
    """The floor's MCP server (`python -m bench.noop_server`)."""

    def __init__(self, workdir: Path, sink_port: int) -> None:
        self.port = free_port()
        self.process = Process(
            "no-op MCP server",
            [sys.executable, "-m", "bench.noop_server", str(self.port), str(sink_port)],
            workdir / "noop.log",
            _env(),
        )
        wait_http(self.process, f"http://127.0.0.1:{self.port}/")

    @property
    def mcp_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def stop(self) -> None:
        self.process.stop()


class Gateway:
    """`escalation-comms serve --config CONFIG --port PORT` (through `python -m gateway`)."""

    def __init__(self, name: str, config: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(self.port)]
        self.process = Process(name, cmd, config.parent / f"{name}.log", _env(env))
        wait_http(self.process, f"{self.url}/healthz")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mcp_url(self) -> str:
        return f"{self.url}/mcp"

    def stop(self) -> None:
        self.process.stop()


#: the contract's variables: a developer's shell must not change what the benchmark measures
_CONTRACT_VARIABLES = (
    "PROFILE HOST PORT EMAIL_TRANSPORT SENDER_EMAIL SUPPORT_TEAM_EMAIL AZURE_COMMUNICATION_CONNECTION_STRING "
    "ACS_CA_BUNDLE SMTP_HOST SMTP_PORT SMTP_USERNAME SMTP_PASSWORD SMTP_SECURITY FILE_SINK_DIR DATABASE_URL "
    "EMAIL_RETRY_COUNT EMAIL_TIMEOUT_SECONDS LOG_LEVEL MCP_AUTH_TOKEN ESCALATION_CONFIG"
).split()


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CONTRACT_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


class CpuMeter:
    """CPU seconds (user + system, all threads) that each named process, and this one (the
    driver), spend between `start()` and `stop()`: where an escalation's work goes."""

    def __init__(self, **pids: int) -> None:
        self._processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._processes["driver"] = psutil.Process()
        self._started: dict[str, float] = {}

    @staticmethod
    def _cpu(process: psutil.Process) -> float:
        times = process.cpu_times()
        return float(times.user + times.system)

    def start(self) -> None:
        self._started = {name: self._cpu(p) for name, p in self._processes.items()}

    def stop(self) -> dict[str, float]:
        return {name: self._cpu(p) - self._started[name] for name, p in self._processes.items()}


class RssSampler:
    """Samples a process's resident set size every `interval` seconds in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self._process = psutil.Process(pid)
        self._interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._process.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(self._interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak

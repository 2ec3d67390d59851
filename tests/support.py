"""Shared test helpers: config trees, free ports, a real gateway process, reading .eml files."""

from __future__ import annotations

import copy
import email
import email.policy
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx2
import yaml

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT.parent / "shared" / "spec" / "EscalationComms.md"

SAMPLE_CALL = {
    "ticket_id": "TKT-2025-001234",
    "customer_id": "CUST-001",
    "customer_email": "customer@example.com",
    "query": "What is the interest rate for mortgage loans?",
    "use_case": "UC2",
    "reason": "Out of scope - Mortgages not in knowledge base",
}


#: a raw MCP initialize request and its headers, for tests that speak HTTP to /mcp directly
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "security-test", "version": "1"},
    },
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def deep_merge(base: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def write_config(
    directory: Path, patch: Mapping[str, Any] | None = None, *, copy_templates: bool = True
) -> Path:
    """A copy of the repository's config.yaml (and templates/) in `directory`, with `patch` merged in."""
    directory.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((ROOT / "config.yaml").read_text())
    base = deep_merge(
        base,
        {
            "store": {"database_url": f"sqlite:///{directory / 'gateway.db'}"},
            "transports": {"file": {"dir": str(directory / "outbox")}},
        },
    )
    data = deep_merge(base, patch or {})
    if copy_templates and not (directory / "templates").exists():
        shutil.copytree(ROOT / "templates", directory / "templates")
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


#: environment variables of the contract, cleared so the developer's shell cannot leak into tests
CONTRACT_VARIABLES = (
    "PROFILE",
    "HOST",
    "PORT",
    "EMAIL_TRANSPORT",
    "SENDER_EMAIL",
    "SUPPORT_TEAM_EMAIL",
    "AZURE_COMMUNICATION_CONNECTION_STRING",
    "ACS_CA_BUNDLE",
    "SMTP_HOST",
    "SMTP_PORT",
    "SMTP_USERNAME",
    "SMTP_PASSWORD",
    "SMTP_SECURITY",
    "FILE_SINK_DIR",
    "DATABASE_URL",
    "EMAIL_RETRY_COUNT",
    "EMAIL_TIMEOUT_SECONDS",
    "LOG_LEVEL",
    "MCP_AUTH_TOKEN",
    "ESCALATION_CONFIG",
)


#: prefixes of the transports' own variables (SMTP_POOL_SIZE, ACS_ENDPOINT, ...)
TRANSPORT_PREFIXES = ("SMTP_", "ACS_", "FILE_SINK_", "FILE_", "AZURE_COMMUNICATION_")


def is_gateway_variable(name: str) -> bool:
    return name in CONTRACT_VARIABLES or name.startswith(TRANSPORT_PREFIXES)


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The process environment without anything the gateway reads, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not is_gateway_variable(k)}
    env.update(extra or {})
    return env


def read_eml(path: Path) -> EmailMessage:
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(message: EmailMessage) -> tuple[str, str]:
    """(text/plain, text/html) bodies of a multipart/alternative message."""
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None and html is not None, "expected text/plain and text/html parts"
    return text.get_content(), html.get_content()  # type: ignore[attr-defined]


def outbox(directory: Path) -> list[EmailMessage]:
    return [read_eml(p) for p in sorted(directory.glob("*.eml"))]


def wait_for(
    predicate: Any, timeout: float = 10.0, interval: float = 0.05, message: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


#: every gateway log a test run wrote: conftest scans them all for customer addresses at the end
GATEWAY_LOGS: list[Path] = []

#: domains of the bank's own (configured) addresses, which logs show in full
BANK_DOMAINS = ("bankx.com", "bank.example", "bank.internal")
_ADDRESS = re.compile(r"[A-Za-z0-9._%+'-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")


def full_customer_addresses(text: str) -> set[str]:
    """Addresses in `text` that are neither masked (c***@...) nor the bank's own."""
    return {a for a in _ADDRESS.findall(text) if not a.lower().endswith(BANK_DOMAINS)}


@dataclass
class GatewayProcess:
    """`escalation-comms serve` in a subprocess on a free port (a new one if it was taken meanwhile).

    Its stderr (the log) goes to `log_path`, its stdout to `stdout_path`: under `serve`, stdout
    stays empty.
    """

    config: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0  # 0: any free port
    args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def __post_init__(self) -> None:
        self._auto_port = self.port == 0
        if self._auto_port:
            self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mcp_url(self) -> str:
        return f"{self.url}/mcp"

    @property
    def stdout_path(self) -> Path:
        assert self.log_path is not None
        return self.log_path.with_suffix(".stdout")

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        for _ in range(3):
            if self._launch(timeout):
                return self
            # Another process took the free port between our probe and the bind: take a new one.
            self.port, self.log_path = free_port(), None
        raise AssertionError(f"gateway could not bind a free port:\n{self.logs()}")

    def _launch(self, timeout: float) -> bool:
        self.log_path = self.log_path or self.config.parent / f"gateway-{self.port}.log"
        GATEWAY_LOGS.append(self.log_path)
        cmd = [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(self.config),
            "--port",
            str(self.port),
            *self.args,
        ]
        with self.log_path.open("ab") as log, self.stdout_path.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, env=clean_env(self.env), stdout=out, stderr=log, cwd=self.config.parent
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if self._auto_port and "address already in use" in self.logs():
                    return False
                raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx2.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return True
            except httpx2.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"gateway did not become healthy:\n{self.logs()}")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

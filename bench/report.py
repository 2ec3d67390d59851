"""The results table, the ratios, the judged criteria and the environment, as Markdown."""

from __future__ import annotations

import math
import os
import platform
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata

from bench.load import Result

PACKAGES = (
    "escalation-comms",
    "mcp",
    "aiosmtplib",
    "aiosmtpd",
    "sqlalchemy",
    "uvicorn",
    "apprise",
)


@dataclass
class Row:
    what: str
    clients: str
    result: Result
    #: throughput is not meaningful (latency-only rows)
    latency_only: bool = False
    note: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    ratios: list[tuple[str, float]] = field(default_factory=list)
    criteria: list[tuple[str, float, float, bool]] = field(default_factory=list)  # what, value, bound, >=
    notes: list[str] = field(default_factory=list)
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    seconds: float = 0.0

    def add(
        self, what: str, clients: str, result: Result, *, latency_only: bool = False, note: str = ""
    ) -> None:
        self.rows.append(Row(what, clients, result, latency_only, note))

    def ratio(self, what: str, value: float) -> float:
        self.ratios.append((what, value))
        return value

    def criterion(self, what: str, value: float, bound: float, *, at_least: bool) -> None:
        self.criteria.append((what, value, bound, at_least))

    def markdown(self) -> str:
        lines = [
            f"# EscalationComms benchmark, {self.started:%Y-%m-%d %H:%M} UTC",
            "",
            *environment(),
            "",
            "Reproduce: `make bench` (or `.venv/bin/python -m bench`). Every number below comes from one",
            "run, against the same SMTP sink process. Latencies are per escalation (both emails).",
            "",
            "| measurement | clients | escalations/s | p50 ms | p99 ms | note |",
            "| --- | --- | ---: | ---: | ---: | --- |",
        ]
        for row in self.rows:
            r = row.result
            rate = "" if row.latency_only else f"{r.throughput:.1f}"
            errors = f" ({r.errors} errors: {r.first_error})" if r.errors else ""
            cells = [row.what, row.clients, rate, _ms(r.p(50)), _ms(r.p(99)), row.note + errors]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "## Ratios (same run)", ""]
        lines += [f"- {what}: **{value:.2f}x**" for what, value in self.ratios]
        if self.criteria:
            lines += ["", "## Judged criteria", ""]
            for what, value, bound, at_least in self.criteria:
                ok = value >= bound if at_least else value <= bound
                sign = ">=" if at_least else "<="
                # Three decimals: 0.597 printed as 0.60 beside FAIL would read as a contradiction.
                lines.append(f"- [{'PASS' if ok else 'FAIL'}] {what}: {value:.3f} (needs {sign} {bound:g})")
        if self.notes:
            lines += ["", "## Notes", ""]
            lines += [f"- {note}" for note in self.notes]
        lines += ["", f"Whole run: {self.seconds:.0f} s.", ""]
        return "\n".join(lines)


def _ms(seconds: float) -> str:
    return "" if math.isnan(seconds) else f"{seconds * 1000:.2f}"


def environment() -> list[str]:
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    return [
        f"- Machine: {os.cpu_count()} CPUs ({_cpu_model()}), {platform.system()} {platform.release()}, "
        f"{_memory()} RAM",
        f"- Python {platform.python_version()} ({sys.implementation.name})",
        f"- Versions: {', '.join(versions)}",
        "- The benchmark driver (MCP clients, peers' threads), the server under test and the SMTP sink "
        f"share these CPUs; load average when the run started: {_load()}.",
    ]


def _load() -> str:
    try:
        return " / ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _memory() -> str:
    import psutil

    return f"{psutil.virtual_memory().total / 2**30:.1f} GiB"

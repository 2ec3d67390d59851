"""Logs: JSON lines in prod, readable lines in dev, LOG_LEVEL, masked addresses, quiet third parties.

The format tests read the stderr of a real server process that served real MCP calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.core.pipeline import PipelineContext, PipelineRequest
from azure.core.pipeline.policies import HttpLoggingPolicy
from azure.core.rest import HttpRequest
from mcp import Client

from gateway import logs
from tests.support import SAMPLE_CALL, GatewayProcess

CUSTOMER = "ana.lopez@customer-mail.example"
MASKED = "a***@customer-mail.example"
QUERY = "Can I move my fixed-rate mortgage to BankX without a penalty?"
CALL = {**SAMPLE_CALL, "customer_email": CUSTOMER, "query": QUERY}
CONTEXT = ("ticket_id", "email_id", "use_case", "transport", "attempt", "duration_ms")


async def serve_a_few_calls(gateway: GatewayProcess) -> None:
    """An escalation, its replay and a rejected call; then stop, so shutdown lines are written too."""
    async with Client(gateway.mcp_url) as client:
        assert not (await client.call_tool("sendemail", CALL)).is_error
        assert (await client.call_tool("sendemail", CALL)).structured_content["replay"] is True
        rejected = await client.call_tool(
            "sendemail", {**CALL, "ticket_id": "TKT-2", "customer_email": "ana@"}
        )
        assert rejected.is_error
    gateway.stop()


@pytest.fixture
def run_server(config_factory: Callable[..., Path]) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def start(**env: str) -> GatewayProcess:
        gateway = GatewayProcess(config_factory(), env={"EMAIL_TRANSPORT": "file", **env})
        started.append(gateway)
        return gateway.start()

    yield start
    for gateway in started:
        gateway.stop()


def json_lines(text: str) -> list[dict[str, Any]]:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"line {number} is not JSON: {line!r}\n--- whole log ---\n{text}")
        assert isinstance(entry, dict), line
        assert {"ts", "level", "logger", "message"} <= entry.keys(), line
        entries.append(entry)
    return entries


def one(entries: list[dict[str, Any]], message: str) -> dict[str, Any]:
    found = [e for e in entries if e["message"] == message]
    assert len(found) == 1, f"expected one line {message!r}, got {found}"
    return found[0]


@pytest.mark.anyio
async def test_prod_profile_every_stderr_line_is_one_json_object_with_context(
    run_server: Callable[..., GatewayProcess],
) -> None:
    gateway = run_server(PROFILE="prod")
    await serve_a_few_calls(gateway)
    text = gateway.logs()
    entries = json_lines(text)

    # uvicorn's own lines go through the same handler (log_config=None), start-up and shutdown alike
    uvicorn_messages = [e["message"] for e in entries if e["logger"].startswith("uvicorn")]
    assert any(m.startswith("Uvicorn running on") for m in uvicorn_messages), uvicorn_messages
    assert "Application shutdown complete." in uvicorn_messages

    sending = one(entries, "Sending email for ticket TKT-2025-001234 (UC2)")  # not again for the replay
    assert sending["ticket_id"] == "TKT-2025-001234" and sending["use_case"] == "UC2"
    assert sending["email_id"].startswith("EMAIL-UC2-")
    customer = one(entries, f"Email sent to customer: {MASKED}")
    team = one(entries, "Email sent to support team: support@bankx.com")
    for entry in (customer, team):
        assert set(CONTEXT) <= entry.keys(), entry
        assert entry["ticket_id"] == "TKT-2025-001234"
        assert entry["email_id"].startswith("EMAIL-UC2-")
        assert entry["use_case"] == "UC2" and entry["transport"] == "file" and entry["attempt"] == 1
        assert isinstance(entry["duration_ms"], int | float) and entry["duration_ms"] >= 0
    assert customer["recipient"] == MASKED

    assert CUSTOMER not in text and "ana.lopez" not in text, "a full customer address reached the log"
    assert QUERY not in text, "the customer's query reached the log"


@pytest.mark.anyio
async def test_dev_profile_writes_readable_lines_with_context_appended(
    run_server: Callable[..., GatewayProcess],
) -> None:
    gateway = run_server()
    await serve_a_few_calls(gateway)
    lines = gateway.logs().splitlines()
    assert lines
    for line in lines:
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)
    sending = [
        line for line in lines if "gateway.service: Sending email for ticket TKT-2025-001234 (UC2)" in line
    ]
    assert len(sending) == 1
    assert " INFO " in sending[0]
    assert "(UC2)  ticket_id=TKT-2025-001234 email_id=EMAIL-UC2-" in sending[0]
    assert sending[0].endswith(" use_case=UC2")
    [customer] = [line for line in lines if f"Email sent to customer: {MASKED}" in line]
    assert "transport=file attempt=1 duration_ms=" in customer
    assert CUSTOMER not in "\n".join(lines)


@pytest.mark.anyio
async def test_log_level_warning_leaves_only_warnings_and_errors(
    run_server: Callable[..., GatewayProcess],
) -> None:
    gateway = run_server(PROFILE="prod", LOG_LEVEL="warning")
    await serve_a_few_calls(gateway)
    entries = json_lines(gateway.logs())
    assert all(e["level"] in {"WARNING", "ERROR", "CRITICAL"} for e in entries), entries
    assert not [e for e in entries if e["message"].startswith("Sending email")]


@pytest.mark.anyio
async def test_log_level_debug_keeps_sdk_request_dumps_out_of_the_log(
    run_server: Callable[..., GatewayProcess],
) -> None:
    gateway = run_server(PROFILE="prod", LOG_LEVEL="DEBUG")
    await serve_a_few_calls(gateway)
    text = gateway.logs()
    entries = json_lines(text)
    assert any(e["message"].startswith("Sending email") for e in entries)
    chatty = ("mcp", "httpx", "httpx2", "httpcore", "azure", "sqlalchemy", "aiosqlite", "uvicorn.access")
    for entry in entries:
        if entry["logger"].split(".")[0] in chatty or entry["logger"] == "uvicorn.access":
            assert entry["level"] != "DEBUG", entry
    assert CUSTOMER not in text and QUERY not in text


@pytest.fixture
def logging_state() -> Iterator[None]:
    """Let a test call `logs.configure` and put the process's logging back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in logs.QUIET_LOGGERS}
    hook = sys.excepthook
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, old in levels.items():
        logging.getLogger(name).setLevel(old)
    sys.excepthook = hook
    logging.captureWarnings(False)


def azure_request_logged(capsys: pytest.CaptureFixture[str]) -> str:
    """Run azure-core's HTTP logging policy on one request, as every ACS call does; return stderr."""
    capsys.readouterr()
    request = HttpRequest("POST", "https://bankx.communication.azure.com/emails:send?api-version=2023-03-31")
    HttpLoggingPolicy().on_request(PipelineRequest(request, PipelineContext(None)))
    return capsys.readouterr().err


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_azure_core_per_request_info_logging_is_turned_down(
    level: str, logging_state: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure(level, json_lines=True)
    assert azure_request_logged(capsys) == ""

    # the same call does log once that logger is let through: the silence above is the configuration's
    logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(logging.INFO)
    [line] = azure_request_logged(capsys).splitlines()
    assert "Request URL" in json.loads(line)["message"]


def test_json_lines_keep_a_traceback_on_one_line_and_mask_addresses_in_it(
    logging_state: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure("INFO", json_lines=True)
    logs.show_in_full("support@bankx.com")
    log = logging.getLogger("gateway.test")
    try:
        raise RuntimeError(f"550 5.1.1 <{CUSTOMER}>: Recipient address rejected")
    except RuntimeError:
        log.exception(
            "delivery to %s failed", CUSTOMER, extra={"ticket_id": "TKT-1", "error": f"<{CUSTOMER}>"}
        )
    log.info("Email sent to support team: %s", "support@bankx.com")
    first, second = capsys.readouterr().err.splitlines()
    entry = json.loads(first)
    assert entry["message"] == f"delivery to {MASKED} failed"
    assert entry["error"] == f"<{MASKED}>"
    assert entry["ticket_id"] == "TKT-1" and entry["level"] == "ERROR"
    assert "RuntimeError: 550 5.1.1 <a***@customer-mail.example>" in entry["exc_info"]
    assert CUSTOMER not in first
    assert json.loads(second)["message"] == "Email sent to support team: support@bankx.com"


def test_readable_lines_put_context_after_the_message_and_mask_addresses(
    logging_state: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure("INFO", json_lines=False)
    logging.getLogger("gateway.test").warning(
        "bounce from %s", CUSTOMER, extra={"email_id": "EMAIL-UC2-20251107-001", "attempt": 2}
    )
    [line] = capsys.readouterr().err.splitlines()
    assert line.endswith(
        f"WARNING gateway.test: bounce from {MASKED}  email_id=EMAIL-UC2-20251107-001 attempt=2"
    )


@pytest.mark.parametrize(
    ("address", "shown"),
    [
        ("customer@example.com", "c***@example.com"),
        ("a@b.co", "a***@b.co"),
        ("not-an-address", "***"),
        ("", "***"),
        (None, "***"),
    ],
)
def test_mask_address_keeps_first_letter_and_domain_only(address: str | None, shown: str) -> None:
    assert logs.mask_address(address) == shown


@pytest.mark.anyio
async def test_a_delivery_sent_later_by_the_background_dispatcher_logs_its_ticket_and_use_case(
    running_gateway: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    from gateway.plugins import registered
    from tests.test_operability_metrics import _FlakyPlugin

    caplog.set_level(logging.INFO)
    patch = {
        "email": {"transport": "flaky", "retry_count": 1},  # the first failure leaves it queued
        "transports": {"flaky": {}},
        "dispatcher": {"poll_interval_seconds": 0.05, "max_backoff_seconds": 0.1},
    }
    with registered(_FlakyPlugin(), "flaky-test-transport"):
        async with running_gateway(patch) as gateway:
            result = await gateway.service.sendemail(**{**CALL, "use_case": "UC3"})
            assert result.status == "queued"
            for _ in range(200):
                if (await gateway.service.status(result.email_id)).status == "sent":
                    break
                await asyncio.sleep(0.05)
    sent = [r for r in caplog.records if r.getMessage() == f"Email sent to customer: {MASKED}"]
    assert len(sent) == 1, [r.getMessage() for r in caplog.records]
    record = sent[0]
    assert getattr(record, "ticket_id", None) == CALL["ticket_id"]
    assert getattr(record, "use_case", None) == "UC3"
    assert getattr(record, "email_id", None) == result.email_id
    assert getattr(record, "transport", None) == "flaky"
    assert getattr(record, "attempt", None) == 2  # the delivery's second attempt overall

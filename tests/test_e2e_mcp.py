"""End to end: the real server, the real MCP client over HTTP and stdio, the .eml files it writes."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters

from tests.support import SAMPLE_CALL, GatewayProcess, clean_env, outbox, parts, wait_for

GOLDEN = Path(__file__).parent / "golden"
UC3_CALL = {
    **SAMPLE_CALL,
    "ticket_id": "TKT-2025-001235",
    "query": "I need help with complex financial planning across multiple areas...",
    "use_case": "UC3",
    "reason": "Complex multi-topic requiring human advisor",
}
EMAIL_ID = re.compile(r"^EMAIL-(UC\d)-(\d{8})-(\d{3,})$")

pytestmark = pytest.mark.anyio


@pytest.fixture
def site(config_factory: Callable[..., Path]) -> Path:
    return config_factory(
        {
            "use_cases": {
                "UC4": {
                    "title": "Credit Cards",
                    "customer": {
                        "wording": {
                            "subject_prefix": "Card Support Request",
                            "service_name": "BankX Card Services",
                            "query_heading": "Your Question",
                            "promise": "A card specialist will reply within 24 hours.",
                            "signature": "BankX Card Team",
                        }
                    },
                }
            }
        }
    )


@pytest.fixture
def server(site: Path) -> Iterator[GatewayProcess]:
    with GatewayProcess(site) as process:
        yield process


def by_subject(directory: Path) -> dict[str, Any]:
    return {str(m["Subject"]): m for m in outbox(directory)}


async def call(url_or_params: Any, tool: str, args: dict[str, Any]) -> Any:
    async with Client(url_or_params) as client:
        return await client.call_tool(tool, args)


async def test_tools_describe_themselves_to_agents(server: GatewayProcess) -> None:
    async with Client(server.mcp_url) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    send, status = tools["sendemail"], tools["get_email_status"]
    assert set(send.input_schema["required"]) == {
        "ticket_id",
        "customer_id",
        "customer_email",
        "query",
        "use_case",
        "reason",
    }
    assert send.output_schema is not None and {
        "email_id",
        "status",
        "sent_at",
        "recipients",
        "replay",
        "deliveries",
    } <= set(send.output_schema["properties"])
    hints = send.annotations
    assert hints is not None
    assert (hints.read_only_hint, hints.destructive_hint, hints.idempotent_hint, hints.open_world_hint) == (
        False,
        False,
        True,
        True,
    )
    assert status.annotations is not None and status.annotations.read_only_hint is True


@pytest.mark.parametrize(
    ("call_args", "golden"), [(SAMPLE_CALL, "uc2"), (UC3_CALL, "uc3")], ids=["UC2", "UC3"]
)
async def test_sendemail_over_http_writes_both_emails_as_in_the_spec(
    server: GatewayProcess, site: Path, call_args: dict[str, str], golden: str
) -> None:
    result = await call(server.mcp_url, "sendemail", call_args)
    assert not result.is_error, result.content
    data = result.structured_content
    match = EMAIL_ID.match(data["email_id"])
    assert match and match.group(1) == call_args["use_case"]
    assert data["status"] == "sent" and data["replay"] is False
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+07:00$", data["sent_at"])
    assert data["recipients"] == {"customer": "customer@example.com", "bank_team": "support@bankx.com"}
    assert [
        (d["role"], d["status"], d["transport"], d["attempts"], d["error"]) for d in data["deliveries"]
    ] == [("customer", "sent", "file", 1, None), ("bank_team", "sent", "file", 1, None)]

    mails = by_subject(site.parent / "outbox")
    customer = mails[(GOLDEN / f"{golden}_customer.subject").read_text().strip()]
    text, html = parts(customer)
    assert text.replace("\r\n", "\n") == (GOLDEN / f"{golden}_customer.txt").read_text()
    assert customer["From"] == "noreply@bankx.com" and customer["To"] == "customer@example.com"
    assert customer["X-Ticket-ID"] == call_args["ticket_id"]
    assert customer["Message-ID"] == data["deliveries"][0]["message_id"]
    assert call_args["ticket_id"] in html
    team = mails[f"New Support Ticket: {call_args['ticket_id']} ({call_args['use_case']})"]
    assert team["To"] == "support@bankx.com"
    assert team["Message-ID"] == data["deliveries"][1]["message_id"]
    if golden == "uc2":
        assert parts(team)[0].replace("\r\n", "\n") == (GOLDEN / "uc2_bank_team.txt").read_text()


async def test_hostile_query_arrives_escaped_in_html(server: GatewayProcess, site: Path) -> None:
    hostile = {
        **SAMPLE_CALL,
        "ticket_id": "TKT-2025-000666",
        "query": "<script>alert('x')</script><a href=\"javascript:evil()\">click</a>",
    }
    result = await call(server.mcp_url, "sendemail", hostile)
    assert result.structured_content["status"] == "sent"
    for message in outbox(site.parent / "outbox"):
        text, html = parts(message)
        assert "<script>" not in html and 'href="javascript:' not in html
        assert "&lt;script&gt;" in html
        assert hostile["query"] in text


async def test_repeat_sends_nothing_and_conflict_is_a_tool_error(server: GatewayProcess, site: Path) -> None:
    async with Client(server.mcp_url) as client:
        first = await client.call_tool("sendemail", SAMPLE_CALL)
        again = await client.call_tool("sendemail", SAMPLE_CALL)
        changed = await client.call_tool("sendemail", {**SAMPLE_CALL, "reason": "something else"})
    assert again.structured_content["replay"] is True
    assert again.structured_content["email_id"] == first.structured_content["email_id"]
    assert len(outbox(site.parent / "outbox")) == 2
    assert changed.is_error and "already escalated" in changed.content[0].text


async def test_bad_input_and_unknown_use_case_are_tool_errors_naming_the_field(
    server: GatewayProcess,
) -> None:
    async with Client(server.mcp_url) as client:
        bad_email = await client.call_tool("sendemail", {**SAMPLE_CALL, "customer_email": "not-an-address"})
        unknown = await client.call_tool("sendemail", {**SAMPLE_CALL, "use_case": "UC7"})
        blank = await client.call_tool("sendemail", {**SAMPLE_CALL, "query": "   "})
    assert bad_email.is_error and "customer_email" in bad_email.content[0].text
    assert unknown.is_error and "UC2, UC3, UC4" in unknown.content[0].text
    assert blank.is_error and "query" in blank.content[0].text


async def test_get_email_status_returns_the_same_shape(server: GatewayProcess) -> None:
    async with Client(server.mcp_url) as client:
        sent = (await client.call_tool("sendemail", SAMPLE_CALL)).structured_content
        status = await client.call_tool("get_email_status", {"email_id": sent["email_id"]})
        missing = await client.call_tool("get_email_status", {"email_id": "EMAIL-UC2-19990101-001"})
    assert status.structured_content == {**sent, "replay": False}
    assert missing.is_error and "unknown" in missing.content[0].text


async def test_use_case_added_in_config_alone_works(server: GatewayProcess, site: Path) -> None:
    result = await call(server.mcp_url, "sendemail", {**SAMPLE_CALL, "use_case": "UC4"})
    assert result.structured_content["email_id"].startswith("EMAIL-UC4-")
    mails = by_subject(site.parent / "outbox")
    customer = mails["Card Support Request: TKT-2025-001234"]
    assert "Thank you for contacting BankX Card Services." in parts(customer)[0]
    assert "Use Case: UC4 - Credit Cards" in parts(mails["New Support Ticket: TKT-2025-001234 (UC4)"])[0]


async def test_use_case_with_its_own_templates(config_factory: Callable[..., Path]) -> None:
    site = config_factory(
        {
            "use_cases": {
                "UC5": {
                    "title": "Wealth",
                    "customer": {
                        "templates": {
                            "subject": "uc5/subject.txt.j2",
                            "text": "uc5/body.txt.j2",
                            "html": "uc5/body.mjml",
                        }
                    },
                }
            }
        }
    )
    own = site.parent / "uc5"
    own.mkdir()
    (own / "subject.txt.j2").write_text("Wealth desk: {{ ticket_id }}\n")
    (own / "body.txt.j2").write_text("Hello from the wealth desk about {{ ticket_id }}.\n")
    (own / "body.mjml").write_text(
        "<mjml><mj-body><mj-section><mj-column><mj-text>Wealth {{ ticket_id }}</mj-text></mj-column>"
        "</mj-section></mj-body></mjml>"
    )
    with GatewayProcess(site) as server:
        result = await call(server.mcp_url, "sendemail", {**SAMPLE_CALL, "use_case": "UC5"})
    assert result.structured_content["status"] == "sent"
    mails = by_subject(site.parent / "outbox")
    text, html = parts(mails["Wealth desk: TKT-2025-001234"])
    assert text.strip() == "Hello from the wealth desk about TKT-2025-001234."
    assert "Wealth TKT-2025-001234" in html


async def test_sendemail_over_stdio(site: Path) -> None:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "gateway", "serve", "--stdio", "--config", str(site)],
        env=clean_env(),
        cwd=str(site.parent),
    )
    result = await call(params, "sendemail", UC3_CALL)
    assert not result.is_error, result.content
    assert result.structured_content["status"] == "sent"
    subjects = sorted(str(m["Subject"]) for m in outbox(site.parent / "outbox"))
    assert subjects == [
        "Financial Coaching Request: TKT-2025-001235",
        "New Support Ticket: TKT-2025-001235 (UC3)",
    ]


async def test_email_ids_continue_after_a_restart(site: Path) -> None:
    ids = []
    for n in range(2):
        with GatewayProcess(site) as server:
            result = await call(
                server.mcp_url, "sendemail", {**SAMPLE_CALL, "ticket_id": f"TKT-2025-00000{n}"}
            )
            ids.append(result.structured_content["email_id"])
    numbers = [int(EMAIL_ID.match(i).group(3)) for i in ids]  # type: ignore[union-attr]
    assert numbers == [numbers[0], numbers[0] + 1]


def test_health_endpoints_answer_and_logs_go_to_stderr_only(server: GatewayProcess) -> None:
    import httpx2

    assert httpx2.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx2.get(f"{server.url}/readyz")
    assert ready.status_code == 200 and json.loads(ready.text)["checks"]["store"] == "ok"
    wait_for(lambda: "escalation_requests" in httpx2.get(f"{server.url}/metrics").text, message="metrics")
    assert "gateway ready" in server.logs()  # stderr
    assert server.stdout() == ""


async def test_sender_and_team_addresses_come_from_the_environment(
    config_factory: Callable[..., Path],
) -> None:
    site = config_factory()
    env = {"SENDER_EMAIL": "alerts@bank.example", "SUPPORT_TEAM_EMAIL": "escalations@bank.example"}
    with GatewayProcess(site, env=env) as server:
        result = await call(server.mcp_url, "sendemail", SAMPLE_CALL)
    assert result.structured_content["recipients"]["bank_team"] == "escalations@bank.example"
    mails = by_subject(site.parent / "outbox")
    customer = mails["Support Ticket Created: TKT-2025-001234"]
    team = mails["New Support Ticket: TKT-2025-001234 (UC2)"]
    assert (customer["From"], customer["To"]) == ("alerts@bank.example", "customer@example.com")
    assert (team["From"], team["To"]) == ("alerts@bank.example", "escalations@bank.example")
    assert customer["Message-ID"].endswith("@bank.example>")  # ids are minted in the sender's domain


async def test_email_id_date_and_sent_at_follow_the_configured_time_zone(
    config_factory: Callable[..., Path],
) -> None:
    from datetime import datetime
    from zoneinfo import ZoneInfo

    zone = "America/Los_Angeles"
    with GatewayProcess(config_factory({"email": {"timezone": zone}})) as server:
        result = await call(server.mcp_url, "sendemail", SAMPLE_CALL)
    data = result.structured_content
    sent_at = datetime.fromisoformat(data["sent_at"])
    assert sent_at.utcoffset() == datetime.now(ZoneInfo(zone)).utcoffset()
    assert data["email_id"].split("-")[2] == sent_at.strftime("%Y%m%d")


def test_the_console_script_is_installed_and_runs(site: Path) -> None:
    import shutil
    import subprocess

    script = shutil.which("escalation-comms", path=str(Path(sys.executable).parent))
    assert script is not None, "the escalation-comms console script is not installed beside python"
    done = subprocess.run(
        [script, "check", "--config", str(site)], capture_output=True, text=True, env=clean_env(), timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "config OK" in done.stdout

"""The `escalation-comms` command line, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from gateway.models import EscalationResult
from tests.smtp_sink import SMTPSink
from tests.support import SAMPLE_CALL, GatewayProcess, clean_env, outbox


def cli(*args: str, config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        env=clean_env(env),
        cwd=config.parent,
        timeout=60,
    )


def send_args(**changes: str) -> list[str]:
    call = {**SAMPLE_CALL, **changes}
    return [
        "send",
        "--use-case",
        call["use_case"],
        "--ticket-id",
        call["ticket_id"],
        "--customer-id",
        call["customer_id"],
        "--customer-email",
        call["customer_email"],
        "--query",
        call["query"],
        "--reason",
        call["reason"],
    ]


def test_send_prints_the_tool_json_and_status_reads_it_back(config_factory: Callable[..., Path]) -> None:
    config = config_factory()
    sent = cli(*send_args(), config=config)
    assert sent.returncode == 0, sent.stderr
    result = json.loads(sent.stdout)
    assert set(result) == set(EscalationResult.model_fields)  # the tool's own result shape
    assert result["status"] == "sent" and result["email_id"].startswith("EMAIL-UC2-")
    assert {d["role"] for d in result["deliveries"]} == {"customer", "bank_team"}
    assert len(outbox(config.parent / "outbox")) == 2

    status = cli("status", result["email_id"], config=config)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout) == result

    repeat = json.loads(cli(*send_args(), config=config).stdout)
    assert repeat["replay"] is True and len(outbox(config.parent / "outbox")) == 2


def test_send_with_bad_input_exits_non_zero_naming_the_field(config_factory: Callable[..., Path]) -> None:
    done = cli(*send_args(customer_email="nobody"), config=config_factory())
    assert done.returncode == 2
    assert "customer_email" in done.stderr and done.stdout == ""


def test_status_of_an_unknown_email_id_fails_clearly(config_factory: Callable[..., Path]) -> None:
    done = cli("status", "EMAIL-UC2-20000101-001", config=config_factory())
    assert done.returncode != 0 and "unknown" in done.stderr


def test_check_passes_on_the_repository_config(config_factory: Callable[..., Path]) -> None:
    done = cli("check", config=config_factory())
    assert done.returncode == 0, done.stderr
    assert "config OK" in done.stdout and "UC2, UC3" in done.stdout


def test_check_reports_a_broken_template_and_exits_1(config_factory: Callable[..., Path]) -> None:
    config = config_factory()
    template = config.parent / "templates" / "bank_team" / "body.txt.j2"
    template.write_text(template.read_text().replace("{{ reason }}", "{{ reasn }}"))
    done = cli("check", config=config)
    assert done.returncode == 1
    assert "templates/bank_team/body.txt.j2" in done.stderr and "reasn" in done.stderr


def test_check_reports_a_jinja_syntax_error_with_its_line(config_factory: Callable[..., Path]) -> None:
    config = config_factory()
    (config.parent / "templates" / "customer" / "subject.txt.j2").write_text("{{ ticket_id }\n")
    done = cli("check", config=config)
    assert done.returncode == 1 and "subject.txt.j2 line 1" in done.stderr


def test_check_reports_bad_config_and_exits_1(config_factory: Callable[..., Path]) -> None:
    done = cli("check", config=config_factory(), env={"EMAIL_RETRY_COUNT": "-1"})
    assert done.returncode == 1 and "email.retry_count (set by EMAIL_RETRY_COUNT)" in done.stderr


def test_preview_writes_a_gallery_of_every_email(config_factory: Callable[..., Path], tmp_path: Path) -> None:
    out = tmp_path / "gallery"
    done = cli("preview", "--out", str(out), config=config_factory())
    assert done.returncode == 0, done.stderr
    index = (out / "index.html").read_text()
    for stem in ("UC2-customer", "UC2-bank_team", "UC3-customer", "UC3-bank_team"):
        assert f'src="{stem}.html"' in index
        assert "TKT-2025-001234" in (out / f"{stem}.html").read_text()
    assert "Support Ticket Created: TKT-2025-001234" in index


def test_failed_deliveries_are_listed_and_requeued(config_factory: Callable[..., Path]) -> None:
    config = config_factory()
    with SMTPSink() as sink:
        sink.refuse_recipient(SAMPLE_CALL["customer_email"], code=550)
        env = {"EMAIL_TRANSPORT": "smtp", **sink.env()}
        sent = json.loads(cli(*send_args(), config=config, env=env).stdout)
        assert sent["status"] == "partial"
        customer = sent["deliveries"][0]
        assert customer["status"] == "failed" and "550" in customer["error"]

        listed = [json.loads(line) for line in cli("deliveries", "list", config=config).stdout.splitlines()]
        assert [(row["role"], row["email_id"]) for row in listed] == [("customer", sent["email_id"])]
        done = cli("deliveries", "requeue", listed[0]["delivery_id"], config=config)
        assert done.returncode == 0 and "requeued 1" in done.stdout
        status = json.loads(cli("status", sent["email_id"], config=config).stdout)
        assert [d["status"] for d in status["deliveries"]] == ["queued", "sent"]
        assert status["status"] == "queued"

        # Once the recipient is fixed, a running server sends it again, with the same Message-ID.
        sink.accept_recipient(SAMPLE_CALL["customer_email"])
        with GatewayProcess(config, env=env):
            [resent] = [
                m for m in sink.wait_for(2, timeout=30) if m.recipients == (SAMPLE_CALL["customer_email"],)
            ]
        assert resent.message_id == customer["message_id"]


def test_a_transport_that_cannot_work_leaves_deliveries_queued_not_failed(
    config_factory: Callable[..., Path],
) -> None:
    config = config_factory()
    blocker = config.parent / "blocked"
    blocker.write_text("a file where the outbox directory should be")
    result = json.loads(cli(*send_args(), config=config, env={"FILE_SINK_DIR": str(blocker)}).stdout)
    assert result["status"] == "queued"
    assert all(
        d["status"] == "queued" and "no transport is usable" in d["error"] for d in result["deliveries"]
    )

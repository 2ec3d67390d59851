"""The SMTP transport against a real aiosmtpd sink: the shared contract, TLS, AUTH, pooling, and
every failure mapped onto the gateway's error tree."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from gateway_smtp import SMTPSettings, SMTPTransport
from gateway_smtp.transport import data_lines
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import ConfigError, PermanentDeliveryError, TransientDeliveryError
from gateway.plugins import transport_classes, transport_settings
from gateway.transport import OutgoingMessage, Transport
from tests.smtp_sink import LocalCA, Security, SMTPSink, StallPoint
from tests.support import SAMPLE_CALL, free_port, parts, wait_for
from tests.transport_contract import Captured, TransportContract, make_message, ticket_of

MakeTransport = Callable[..., Awaitable[SMTPTransport]]


@pytest.fixture(autouse=True)
def _no_smtp_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """SMTP_* from the developer's shell would override the settings these tests build."""
    for name in list(os.environ):
        if name.upper().startswith("SMTP_"):
            monkeypatch.delenv(name)


@pytest.fixture
def sink() -> Iterator[SMTPSink]:
    with SMTPSink() as running:
        yield running


@pytest.fixture
async def make_transport() -> AsyncIterator[MakeTransport]:
    """Build and start SMTP transports from settings; all are closed after the test."""
    made: list[SMTPTransport] = []

    async def make(target: SMTPSink | None = None, **settings: Any) -> SMTPTransport:
        values = {**(target.settings() if target is not None else {}), **settings}
        transport = SMTPTransport(SMTPSettings(**values))
        await transport.start()
        made.append(transport)
        return transport

    yield make
    for transport in made:
        await transport.aclose()


# -- the contract every transport passes ---------------------------------------------------------


class TestSMTPContract(TransportContract):
    copies_after_sending_twice = 2  # SMTP cannot recall a message: a second transaction, same Message-ID

    @pytest.fixture
    async def transport(self) -> AsyncIterator[Transport]:
        cls = transport_classes()["smtp"]  # through the entry point, as the gateway finds it
        with SMTPSink() as sink:
            self.sink = sink
            transport = cls(cls.settings_model(**sink.settings()))
            await transport.start()
            yield transport
            await transport.aclose()

    async def read_back(self, message: OutgoingMessage) -> list[Captured]:
        found = []
        for got in self.sink.messages:
            if got.header("X-Ticket-ID") != ticket_of(message):
                continue
            text, html = parts(got.message)
            found.append(
                Captured(
                    sender=got.sender,
                    recipients=list(got.recipients),
                    subject=got.subject,
                    text=text,
                    html=html,
                    headers={k: str(v) for k, v in got.message.items()},
                )
            )
        return found

    async def break_far_side(self) -> None:
        self.sink.down()  # nothing listens on the port any more: connections are refused


# -- settings ------------------------------------------------------------------------------------


def test_smtp_transport_is_registered_under_the_name_smtp() -> None:
    assert transport_classes()["smtp"] is SMTPTransport


def test_smtp_settings_defaults_follow_the_design_contract() -> None:
    settings = SMTPSettings()
    assert (settings.host, settings.port, settings.security) == ("127.0.0.1", 8025, "none")
    assert settings.pool_size == 4
    assert settings.username is None and settings.password is None
    assert settings.validate_certs is True


def test_smtp_environment_overrides_the_config_block(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-")
    monkeypatch.setenv("SMTP_HOST", "relay.bank.internal")
    monkeypatch.setenv("SMTP_PORT", "587")
    monkeypatch.setenv("SMTP_SECURITY", "STARTTLS")
    monkeypatch.setenv("SMTP_USERNAME", "gateway")
    monkeypatch.setenv("SMTP_PASSWORD", "s3cret-from-env")
    monkeypatch.setenv("SMTP_CA_BUNDLE", str(bundle))
    monkeypatch.setenv("SMTP_POOL_SIZE", "2")
    settings = transport_settings(SMTPTransport, {"host": "from-config", "port": 2525, "security": "none"})
    assert (settings.host, settings.port, settings.security) == ("relay.bank.internal", 587, "starttls")
    assert settings.username == "gateway"
    assert settings.password.get_secret_value() == "s3cret-from-env"
    assert settings.ca_bundle == bundle
    assert settings.pool_size == 2
    assert "s3cret-from-env" not in repr(settings) and "s3cret-from-env" not in str(settings.model_dump())


def test_smtp_settings_refuse_an_unknown_key_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"transports\.smtp\.hots"):
        transport_settings(SMTPTransport, {"hots": "relay"})


def test_smtp_settings_refuse_an_unknown_security_mode_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"transports\.smtp\.security: 'ssl3' .* none, starttls .* or tls"):
        transport_settings(SMTPTransport, {"security": "ssl3"})


def test_a_bad_smtp_variable_is_named_in_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTP_PORT", "abc")
    with pytest.raises(ConfigError, match=r"transports\.smtp\.port \(set by SMTP_PORT\): .*integer"):
        transport_settings(SMTPTransport, {"port": 2525})
    monkeypatch.delenv("SMTP_PORT")
    with pytest.raises(ConfigError) as caught:  # from the config file: no variable to name
        transport_settings(SMTPTransport, {"port": "abc"})
    assert "transports.smtp.port: " in str(caught.value) and "set by" not in str(caught.value)


def test_a_relative_ca_bundle_in_the_config_file_is_relative_to_that_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.chdir(tmp_path.parent)  # not the config file's directory
    settings = transport_settings(SMTPTransport, {"security": "tls", "ca_bundle": "ca.pem"}, tmp_path)
    assert settings.ca_bundle == tmp_path / "ca.pem"


def test_smtp_settings_refuse_a_password_without_a_username() -> None:
    with pytest.raises(ConfigError, match="username") as caught:
        transport_settings(SMTPTransport, {"password": "hunter2"})
    assert "hunter2" not in str(caught.value)


def test_smtp_settings_refuse_a_ca_bundle_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"transports\.smtp\.ca_bundle"):
        transport_settings(SMTPTransport, {"security": "tls", "ca_bundle": str(tmp_path / "missing.pem")})


def test_smtp_transport_refuses_a_ca_bundle_without_certificates(tmp_path: Path) -> None:
    bundle = tmp_path / "not-pem.pem"
    bundle.write_text("this is not a certificate\n")
    with pytest.raises(ConfigError, match=r"transports\.smtp\.ca_bundle"):
        SMTPTransport(SMTPSettings(security="starttls", ca_bundle=bundle))


# -- start-up and readiness ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_smtp_start_succeeds_with_nobody_listening_and_check_reports_the_server_down(
    make_transport: MakeTransport,
) -> None:
    transport = await make_transport(port=free_port())  # start() returned although nothing listens
    with pytest.raises(TransientDeliveryError, match="cannot connect"):
        await transport.check()


@pytest.mark.anyio
async def test_smtp_start_opens_no_connection(sink: SMTPSink, make_transport: MakeTransport) -> None:
    await make_transport(sink)
    assert sink.connections == 0


@pytest.mark.anyio
async def test_smtp_check_reuses_an_idle_pooled_connection(
    sink: SMTPSink, make_transport: MakeTransport
) -> None:
    transport = await make_transport(sink)
    await transport.send(make_message())
    await transport.check()
    await transport.check()
    assert sink.connections == 1


@pytest.mark.anyio
async def test_smtp_check_of_a_silent_server_fails_within_its_timeout(
    sink: SMTPSink, make_transport: MakeTransport
) -> None:
    sink.stall("greeting")
    transport = await make_transport(sink, check_timeout_seconds=0.3)
    async with asyncio.timeout(10):  # a guard against hanging, far above the configured timeout
        with pytest.raises(TransientDeliveryError, match="did not answer"):
            await transport.check()


@pytest.mark.anyio
async def test_smtp_check_reports_refused_credentials_as_transport_level(
    make_transport: MakeTransport,
) -> None:
    with SMTPSink(auth=("gateway", "right"), auth_require_tls=False) as sink:
        transport = await make_transport(sink, password="wrong")
        with pytest.raises(PermanentDeliveryError) as caught:
            await transport.check()
    assert caught.value.transport_level


# -- TLS -----------------------------------------------------------------------------------------


@pytest.fixture
def ca(tmp_path: Path) -> LocalCA:
    return LocalCA.create(tmp_path / "ca")


@pytest.mark.anyio
@pytest.mark.parametrize("security", ["starttls", "tls"])
async def test_smtp_sends_over_tls_when_the_test_ca_is_trusted(
    security: Security, ca: LocalCA, make_transport: MakeTransport
) -> None:
    with SMTPSink(security=security, ca=ca) as sink:
        transport = await make_transport(sink)
        await transport.send(make_message())
        [got] = sink.messages
    assert got.tls
    assert got.recipients == ("customer@example.com",)


@pytest.mark.anyio
@pytest.mark.parametrize("security", ["starttls", "tls"])
async def test_smtp_untrusted_certificate_is_a_transport_level_failure(
    security: Security, ca: LocalCA, make_transport: MakeTransport
) -> None:
    with SMTPSink(security=security, ca=ca) as sink:
        transport = await make_transport(sink, ca_bundle=None)  # system trust only
        with pytest.raises(PermanentDeliveryError, match="certificate") as caught:
            await transport.send(make_message())
        assert sink.messages == []
    assert caught.value.transport_level


@pytest.mark.anyio
async def test_smtp_validate_certs_false_accepts_a_self_signed_lab_relay(
    ca: LocalCA, make_transport: MakeTransport
) -> None:
    with SMTPSink(security="tls", ca=ca) as sink:
        transport = await make_transport(sink, ca_bundle=None, validate_certs=False)
        await transport.send(make_message())
        assert len(sink.messages) == 1


@pytest.mark.anyio
async def test_smtp_plain_client_against_a_server_requiring_starttls_is_transport_level(
    ca: LocalCA, make_transport: MakeTransport
) -> None:
    with SMTPSink(security="starttls", ca=ca) as sink:
        transport = await make_transport(sink, security="none")
        with pytest.raises(PermanentDeliveryError, match="530") as caught:
            await transport.send(make_message())
    assert caught.value.transport_level


@pytest.mark.anyio
@pytest.mark.parametrize("security", ["starttls", "tls"])
async def test_smtp_tls_setting_against_a_plain_server_is_transport_level(
    security: str, sink: SMTPSink, make_transport: MakeTransport
) -> None:
    transport = await make_transport(sink, security=security)
    with pytest.raises(PermanentDeliveryError) as caught:
        await transport.send(make_message())
    assert caught.value.transport_level
    assert sink.messages == []


# -- AUTH ----------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_smtp_authenticates_after_starttls(ca: LocalCA, make_transport: MakeTransport) -> None:
    with SMTPSink(security="starttls", ca=ca, auth=("gateway", "correct horse")) as sink:
        transport = await make_transport(sink)
        await transport.send(make_message())
        await transport.send(make_message())
        assert sink.logins == [("gateway", True)]  # once per connection, not per message
        assert [m.tls for m in sink.messages] == [True, True]


@pytest.mark.anyio
async def test_smtp_authenticates_over_plain_smtp_when_the_server_allows_it(
    make_transport: MakeTransport,
) -> None:
    with SMTPSink(auth=("gateway", "correct horse"), auth_require_tls=False) as sink:
        transport = await make_transport(sink)
        await transport.send(make_message())
        assert sink.logins == [("gateway", True)]
        assert len(sink.messages) == 1


@pytest.mark.anyio
async def test_smtp_refused_credentials_are_transport_level_and_never_show_the_password(
    make_transport: MakeTransport, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with SMTPSink(auth=("gateway", "correct horse"), auth_require_tls=False) as sink:
        transport = await make_transport(sink, password="Tr0ub4dor&3")
        with pytest.raises(PermanentDeliveryError) as caught:
            await transport.send(make_message())
        assert sink.logins and all(login == ("gateway", False) for login in sink.logins)
        assert sink.messages == []
    assert caught.value.transport_level
    assert "535" in str(caught.value)
    assert "Tr0ub4dor&3" not in str(caught.value)
    assert "Tr0ub4dor&3" not in caplog.text
    assert "Tr0ub4dor&3" not in repr(transport.settings)


@pytest.mark.anyio
async def test_smtp_server_requiring_auth_without_credentials_is_transport_level(
    make_transport: MakeTransport,
) -> None:
    with SMTPSink(auth=("gateway", "correct horse"), auth_require_tls=False) as sink:
        transport = await make_transport(sink, username=None, password=None)
        with pytest.raises(PermanentDeliveryError, match="530") as caught:
            await transport.send(make_message())
    assert caught.value.transport_level


@pytest.mark.anyio
async def test_smtp_credentials_for_a_server_without_auth_are_transport_level(
    sink: SMTPSink, make_transport: MakeTransport
) -> None:
    transport = await make_transport(sink, username="gateway", password="secret")
    with pytest.raises(PermanentDeliveryError, match="AUTH") as caught:
        await transport.send(make_message())
    assert caught.value.transport_level


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_smtp_550_for_the_recipient_is_permanent_for_this_message_only(
    sink: SMTPSink, make_transport: MakeTransport
) -> None:
    sink.refuse_recipient("customer@example.com", 550)
    transport = await make_transport(sink)
    with pytest.raises(PermanentDeliveryError, match="550") as caught:
        await transport.send(make_message())
    assert not caught.value.transport_level
    assert "customer@example.com" not in str(caught.value)  # masked: c***@example.com
    assert "c***@example.com" in str(caught.value)


@pytest.mark.anyio
async def test_smtp_partial_refusal_is_never_success_and_nobody_gets_the_message(
    sink: SMTPSink, make_transport: MakeTransport
) -> None:
    sink.refuse_recipient("gone@example.com", 550)
    transport = await make_transport(sink)
    message = make_message(recipients=("customer@example.com", "gone@example.com"))
    with pytest.raises(PermanentDeliveryError, match="1 of 2"):
        await transport.send(message)
    assert sink.messages == []  # reset before DATA: no half-delivered message to retry over
    await transport.send(make_message())  # the session was reset and is still usable
    assert sink.connections == 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("code", "error"),
    [(550, PermanentDeliveryError), (451, TransientDeliveryError)],
    ids=["550-transport-level", "451-transient"],
)
async def test_smtp_sender_refused_at_mail_names_the_server_and_the_connection_carries_the_next(
    sink: SMTPSink, make_transport: MakeTransport, code: int, error: type[Exception]
) -> None:
    sink.refuse_sender(code=code)
    transport = await make_transport(sink)
    with pytest.raises(error, match=str(code)) as caught:
        await transport.send(make_message())
    assert f"{sink.host}:{sink.port}" in str(caught.value)
    if code >= 500:  # every message from this sender would meet it: fail over, not this message
        assert isinstance(caught.value, PermanentDeliveryError) and caught.value.transport_level
    message = make_message()
    await transport.send(message)  # MAIL refused: the session still carries the next message
    assert [m.sender for m in sink.messages] == [message.sender]
    assert sink.connections == 1


@pytest.mark.anyio
async def test_smtp_451_for_a_recipient_is_transient(sink: SMTPSink, make_transport: MakeTransport) -> None:
    sink.refuse_recipient("customer@example.com", 451)
    transport = await make_transport(sink)
    with pytest.raises(TransientDeliveryError, match="451"):
        await transport.send(make_message())


@pytest.mark.anyio
async def test_smtp_451_then_success_on_the_next_attempt(
    sink: SMTPSink, make_transport: MakeTransport
) -> None:
    sink.fail_next(1, code=451)
    transport = await make_transport(sink)
    message = make_message()
    with pytest.raises(TransientDeliveryError, match="451"):
        await transport.send(message)
    await transport.send(message)
    assert sink.message_ids() == [message.message_id]
    assert sink.attempts == 2
    assert sink.connections == 1  # a refused message leaves the connection usable


@pytest.mark.anyio
async def test_smtp_554_at_end_of_data_is_permanent_for_this_message_only(
    sink: SMTPSink, make_transport: MakeTransport
) -> None:
    sink.fail_next(1, code=554)
    transport = await make_transport(sink)
    with pytest.raises(PermanentDeliveryError, match="554") as caught:
        await transport.send(make_message())
    assert not caught.value.transport_level


@pytest.mark.anyio
async def test_smtp_refused_data_command_resets_the_envelope_so_the_connection_carries_the_next(
    sink: SMTPSink, make_transport: MakeTransport
) -> None:
    sink.refuse_data_command(code=451)  # before 354: the server still holds MAIL and RCPT
    transport = await make_transport(sink)
    with pytest.raises(TransientDeliveryError, match="451"):
        await transport.send(make_message())
    message = make_message()
    await transport.send(message)  # without RSET this MAIL would meet "503 nested MAIL command"
    assert sink.message_ids() == [message.message_id]
    assert sink.connections == 1


@pytest.mark.anyio
async def test_smtp_lines_starting_with_a_dot_arrive_as_written(
    sink: SMTPSink, make_transport: MakeTransport
) -> None:
    """A line of one dot ends DATA; the transport doubles a leading dot, the server removes it."""
    text = ".\n..two dots\n.hidden\nlast ."
    message = make_message(text=text, html="<p>x</p>\n.\n.<p>y</p>")
    await (await make_transport(sink)).send(message)
    (received,) = sink.wait_for(1)
    assert received.data == message.as_bytes()
    assert parts(received.message)[0].replace("\r\n", "\n") == text + "\n"  # MIME ends a part's last line


@pytest.mark.anyio
async def test_smtp_declares_the_message_size_to_a_server_that_takes_size(
    sink: SMTPSink, make_transport: MakeTransport
) -> None:
    message = make_message()
    await (await make_transport(sink)).send(message)
    (received,) = sink.wait_for(1)
    assert received.mail_options == (f"SIZE={len(message.as_bytes())}",)


@pytest.mark.anyio
async def test_smtp_server_without_ehlo_is_greeted_with_helo_and_takes_the_message(
    sink: SMTPSink, make_transport: MakeTransport
) -> None:
    sink.speak_helo_only()
    message = make_message()
    await (await make_transport(sink)).send(message)
    (received,) = sink.wait_for(1)
    assert received.message_id == message.message_id
    assert received.mail_options == ()  # no ESMTP, so no SIZE


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(
    payload=st.binary(max_size=60)
    | st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"x"])).map(b"".join)
)
def test_smtp_data_lines_are_what_aiosmtplib_writes_for_any_bytes(payload: bytes) -> None:
    expected = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(payload)) + b".\r\n"
    assert data_lines(payload) == expected


@pytest.mark.anyio
async def test_smtp_refuses_an_address_that_would_change_the_smtp_command(
    sink: SMTPSink, make_transport: MakeTransport
) -> None:
    transport = await make_transport(sink)
    for bad in (
        "victim@example.com> NOTIFY=NEVER",
        "a@example.com\r\nRSET",
        "no-at-sign",
        "ลูกค้า@example.com",
    ):
        with pytest.raises(PermanentDeliveryError, match="envelope"):
            await transport.send(make_message(recipients=(bad,)))
    assert sink.connections == 0


# -- connections: reuse, drops, silence ----------------------------------------------------------


@pytest.mark.anyio
async def test_smtp_concurrent_sends_share_at_most_pool_size_connections(
    sink: SMTPSink, make_transport: MakeTransport
) -> None:
    transport = await make_transport(sink, pool_size=3)
    messages = [make_message() for _ in range(60)]
    await asyncio.gather(*(transport.send(m) for m in messages))
    assert sorted(sink.message_ids()) == sorted(m.message_id for m in messages)
    assert sink.connections <= 3
    assert sink.peak_connections <= 3


@pytest.mark.anyio
async def test_smtp_pool_sends_cancelled_while_waiting_for_a_slot_leave_every_slot_free() -> None:
    """A send given up while all connections are busy (EMAIL_TIMEOUT_SECONDS, shutdown) must
    not take a slot with it, nor keep the others waiting."""
    from contextlib import AsyncExitStack

    from gateway_smtp.pool import ConnectionPool

    pool = ConnectionPool(size=2, idle_timeout=60)
    served: list[int] = []

    async def send(n: int) -> None:
        async with pool.lease():
            served.append(n)

    async with AsyncExitStack() as busy:
        for _ in range(2):
            await busy.enter_async_context(pool.lease())
        assert pool.saturated
        waiting = [asyncio.create_task(send(n)) for n in range(6)]
        await asyncio.sleep(0)
        for task in waiting[::2]:
            task.cancel()
    # Both slots are free again, but queued sends have not taken them yet: still saturated.
    assert pool.saturated
    await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)
    assert served == [1, 3, 5]
    assert not pool.saturated
    async with AsyncExitStack() as both:  # both slots at once, without waiting
        for _ in range(2):
            await asyncio.wait_for(both.enter_async_context(pool.lease()), 1)
        assert pool.saturated


@pytest.mark.anyio
async def test_smtp_reconnects_when_the_server_drops_the_connection_after_each_message(
    sink: SMTPSink, make_transport: MakeTransport
) -> None:
    sink.drop_after_each_message()
    transport = await make_transport(sink)
    for _ in range(3):
        await transport.send(make_message())
    assert len(sink.messages) == 3
    assert sink.connections == 3


@pytest.mark.anyio
@pytest.mark.parametrize("reply", [True, False], ids=["421-then-close", "silent-close"])
async def test_smtp_pooled_connection_closed_by_the_server_is_retried_once_on_a_fresh_one(
    reply: bool, sink: SMTPSink, make_transport: MakeTransport
) -> None:
    transport = await make_transport(sink)
    await transport.send(make_message())
    sink.hang_up_at_next_mail(1, reply=reply)  # the server timed the idle session out
    message = make_message()
    await transport.send(message)  # no error: this is not a failed attempt
    assert sink.message_ids()[-1] == message.message_id
    assert len(sink.messages) == 2
    assert sink.connections == 2


@pytest.mark.anyio
async def test_smtp_reconnect_is_tried_only_once(sink: SMTPSink, make_transport: MakeTransport) -> None:
    transport = await make_transport(sink)
    await transport.send(make_message())
    sink.hang_up_at_next_mail(2)
    with pytest.raises(TransientDeliveryError, match="421"):
        await transport.send(make_message())
    assert sink.connections == 2


@pytest.mark.anyio
async def test_smtp_hang_up_on_a_fresh_connection_is_a_transient_failure(
    sink: SMTPSink, make_transport: MakeTransport
) -> None:
    sink.hang_up_at_next_mail(1, reply=False)
    transport = await make_transport(sink)
    with pytest.raises(TransientDeliveryError, match="closed the connection"):
        await transport.send(make_message())
    assert sink.connections == 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("stall_at", "setting", "step"),
    [
        ("greeting", "connect_timeout_seconds", "while connecting"),
        ("mail", "command_timeout_seconds", "to MAIL FROM"),
    ],
)
async def test_smtp_server_that_stops_answering_times_out_as_transient(
    sink: SMTPSink, make_transport: MakeTransport, stall_at: StallPoint, setting: str, step: str
) -> None:
    sink.stall(stall_at)
    transport = await make_transport(sink, **{setting: 0.3})
    async with asyncio.timeout(10):  # a guard against hanging, far above the configured timeout
        with pytest.raises(TransientDeliveryError, match=rf"did not answer in time \({step}\)"):
            await transport.send(make_message())
    assert sink.messages == []


@pytest.mark.anyio
async def test_smtp_silence_after_data_is_transient_and_never_resent_on_that_call(
    sink: SMTPSink, make_transport: MakeTransport
) -> None:
    # Only the stalled send may meet the short reply timeout: the check below opens the pooled
    # connection it reuses within check_timeout_seconds (its default), and the sends that must
    # succeed go through a transport with the default timeouts.
    impatient = await make_transport(sink, command_timeout_seconds=0.3)
    await impatient.check()  # leaves an idle pooled connection, the kind a failed MAIL may retry on
    sink.stall("data")  # the server has the message but never confirms it
    async with asyncio.timeout(10):  # a guard against hanging, far above the configured timeout
        with pytest.raises(TransientDeliveryError, match="did not answer"):
            await impatient.send(make_message())
    assert sink.connections == 1  # no transparent retry once DATA started
    # Its state is unknown, so the transport hangs up: wait in a thread, the loop must run to close.
    await asyncio.to_thread(wait_for, lambda: sink.open_connections == 0, message="the session closed")
    sink.stall(None)
    await impatient.check()  # a fresh connection replaces the abandoned one
    assert sink.connections == 2
    message = make_message()
    await (await make_transport(sink)).send(message)
    assert sink.message_ids() == [message.message_id]  # the stalled message was never accepted


@pytest.mark.anyio
async def test_smtp_server_down_then_up_on_the_same_port(
    sink: SMTPSink, make_transport: MakeTransport
) -> None:
    transport = await make_transport(sink)
    await transport.send(make_message())
    sink.down()
    with pytest.raises(TransientDeliveryError, match="Connection refused"):
        await transport.send(make_message())
    sink.up()
    await transport.send(make_message())
    await transport.check()
    assert len(sink.messages) == 2


@pytest.mark.anyio
async def test_smtp_idle_pooled_connection_is_replaced_after_the_idle_timeout(
    sink: SMTPSink, make_transport: MakeTransport
) -> None:
    transport = await make_transport(sink, idle_timeout_seconds=0.1)
    await transport.send(make_message())
    await asyncio.sleep(0.3)
    await transport.send(make_message())
    assert sink.connections == 2


@pytest.mark.anyio
async def test_smtp_max_messages_per_connection_opens_a_new_one(
    sink: SMTPSink, make_transport: MakeTransport
) -> None:
    transport = await make_transport(sink, max_messages_per_connection=2)
    for _ in range(5):
        await transport.send(make_message())
    assert [m.connection for m in sink.messages] == [1, 1, 2, 2, 3]


@pytest.mark.anyio
async def test_smtp_aclose_says_quit_and_closes_every_connection(
    sink: SMTPSink, make_transport: MakeTransport
) -> None:
    transport = await make_transport(sink, pool_size=2)
    await asyncio.gather(*(transport.send(make_message()) for _ in range(10)))
    assert sink.open_connections >= 1
    await transport.aclose()
    wait_for(lambda: sink.open_connections == 0, message="the sink to see every connection closed")


@pytest.mark.anyio
async def test_smtp_send_after_shutdown_is_a_transient_failure(
    sink: SMTPSink, make_transport: MakeTransport
) -> None:
    transport = await make_transport(sink)
    await transport.aclose()
    with pytest.raises(TransientDeliveryError, match="shut down"):
        await transport.send(make_message())
    assert sink.connections == 0


# -- the sink itself -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_smtp_sink_fail_fraction_repeats_with_the_same_seed(make_transport: MakeTransport) -> None:
    outcomes = []
    for _ in range(2):
        with SMTPSink() as sink:
            sink.fail_fraction(0.5, seed=7)
            transport = await make_transport(sink)
            run = []
            for _ in range(20):
                try:
                    await transport.send(make_message())
                    run.append(True)
                except TransientDeliveryError:
                    run.append(False)
            outcomes.append(run)
    assert outcomes[0] == outcomes[1]
    assert 0 < outcomes[0].count(False) < 20


# -- through the gateway's dispatcher ------------------------------------------------------------


@pytest.mark.anyio
async def test_smtp_451_is_retried_by_the_dispatcher_and_the_call_reports_sent(
    sink: SMTPSink, running_gateway: Callable[..., Any]
) -> None:
    sink.fail_next(1, code=451)
    patch = {"email": {"transport": "smtp"}, "transports": {"smtp": sink.settings()}}
    async with running_gateway(patch, background=False) as gateway:
        result = await gateway.service.sendemail(**SAMPLE_CALL)
    assert result.status == "sent"
    assert sorted(d.attempts for d in result.deliveries) == [1, 2]
    assert all(d.error is None and d.transport == "smtp" for d in result.deliveries)
    assert sink.attempts == 3
    assert len(sink.messages) == 2


@pytest.mark.anyio
async def test_smtp_refused_credentials_fail_over_to_the_next_transport(
    running_gateway: Callable[..., Any],
) -> None:
    with SMTPSink(auth=("gateway", "right"), auth_require_tls=False) as sink:
        patch = {
            "email": {"transport": "smtp,file"},
            "transports": {"smtp": {**sink.settings(), "password": "wrong"}},
        }
        async with running_gateway(patch, background=False) as gateway:
            result = await gateway.service.sendemail(**SAMPLE_CALL)
        assert sink.messages == []
    assert result.status == "sent"
    assert [d.transport for d in result.deliveries] == ["file", "file"]

"""The acs transport: the real azure SDK against the fake ACS service (tests/fake_acs.py).

The shared contract suite, then what only ACS promises: one operation per delivery
however often it is retried, the error mapping for each answer the service gives,
delivery confirmation from the operation's status, and the fake's own checks of
the HMAC signature (so the tests above prove the SDK really signs what it sends).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trustme
from azure.core.rest import HttpRequest
from gateway_acs import AcsSettings, AcsTransport

from gateway.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from gateway.plugins import transport_classes
from gateway.transport import OutgoingMessage, Receipt, Transport
from tests.fake_acs import Answer, FakeAcs, OperationPlan
from tests.support import CONTRACT_VARIABLES
from tests.transport_contract import Captured, TransportContract, make_message, ticket_of


@pytest.fixture(autouse=True)
def no_acs_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*CONTRACT_VARIABLES, "ACS_ENDPOINT", "ACS_REQUEST_TIMEOUT_SECONDS", "ACS_API_VERSION"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def fake(tmp_path: Path, ca: trustme.CA) -> Iterator[FakeAcs]:
    with FakeAcs(tmp_path / "acs", ca) as service:
        yield service


def settings_for(fake: FakeAcs, **changes: Any) -> AcsSettings:
    values: dict[str, Any] = {"connection_string": fake.connection_string, "ca_bundle": fake.ca_bundle}
    values.update(changes)
    return AcsSettings(**values)


@pytest.fixture
async def acs(fake: FakeAcs) -> AsyncIterator[AcsTransport]:
    transport = AcsTransport(settings_for(fake))
    await transport.start()
    yield transport
    await transport.aclose()


class TestAcsContract(TransportContract):
    copies_after_sending_twice = 1  # the same operation id is the same ACS operation: one email

    @pytest.fixture
    async def transport(self, fake: FakeAcs) -> AsyncIterator[Transport]:
        self.fake = fake
        transport = transport_classes()["acs"](settings_for(fake))
        await transport.start()
        yield transport
        await transport.aclose()

    async def read_back(self, message: OutgoingMessage) -> list[Captured]:
        """The request bodies the SDK sent (once per operation), with the headers exactly as sent:
        ACS puts them on the email, so Message-ID is there only if the transport sent ours."""
        found = []
        for sent in self.fake.messages:
            headers = sent.get("headers", {})
            if headers.get("X-Ticket-ID") != ticket_of(message):
                continue
            found.append(
                Captured(
                    sender=sent["senderAddress"],
                    recipients=[r["address"] for r in sent["recipients"]["to"]],
                    subject=sent["content"]["subject"],
                    text=sent["content"].get("plainText", ""),
                    html=sent["content"].get("html", ""),
                    headers=headers,
                )
            )
        return found

    async def break_far_side(self) -> None:
        self.fake.fail_sends(Answer(500, code="InternalServerError", message="The service is broken."))


# -- sending ---------------------------------------------------------------------------------------

pytestmark = pytest.mark.anyio


async def test_send_returns_sent_with_the_delivery_id_as_the_acs_operation(
    acs: AcsTransport, fake: FakeAcs
) -> None:
    message = make_message()
    receipt = await acs.send(message)
    assert receipt == Receipt(status="sent", provider_id=message.delivery_id)
    [seen] = fake.sends()
    assert seen.operation_id == message.delivery_id and seen.status == 202
    assert list(fake.operations) == [message.delivery_id]


async def test_send_does_not_wait_for_the_operation_to_finish(acs: AcsTransport, fake: FakeAcs) -> None:
    fake.plan = OperationPlan(running_polls=5)
    await acs.send(make_message())
    assert [s.method for s in fake.seen] == ["POST"]  # no GET: confirmation is status()'s job


async def test_message_carries_our_message_id_and_ticket_header(acs: AcsTransport, fake: FakeAcs) -> None:
    message = make_message(headers={"X-Ticket-ID": "TKT-9", "Auto-Submitted": "auto-generated"})
    await acs.send(message)
    [sent] = fake.messages
    assert sent["senderAddress"] == "noreply@bankx.com"
    assert sent["recipients"] == {"to": [{"address": "customer@example.com"}]}
    assert sent["content"] == {"subject": message.subject, "plainText": message.text, "html": message.html}
    assert sent["headers"] == {
        "Message-ID": message.message_id,
        "X-Ticket-ID": "TKT-9",
        "Auto-Submitted": "auto-generated",
    }


async def test_retrying_a_delivery_reuses_its_operation_so_acs_sends_one_email(
    acs: AcsTransport, fake: FakeAcs
) -> None:
    message = make_message()
    fake.fail_sends(Answer(503, accept_first=True))  # ACS took it, but the answer was lost
    with pytest.raises(TransientDeliveryError):
        await acs.send(message)
    receipt = await acs.send(message)
    assert receipt.provider_id == message.delivery_id
    assert [(s.operation_id, s.status) for s in fake.sends()] == [
        (message.delivery_id, 503),
        (message.delivery_id, 202),
    ]
    assert len(fake.operations) == 1 and len(fake.messages) == 1


async def test_sdk_does_not_retry_on_its_own(acs: AcsTransport, fake: FakeAcs) -> None:
    fake.fail_sends(Answer(503), Answer(503))
    with pytest.raises(TransientDeliveryError):
        await acs.send(make_message())
    assert len(fake.sends()) == 1  # retry_total=0: the dispatcher is the only retry layer


# -- error mapping ---------------------------------------------------------------------------------


PERMANENT, TRANSIENT = PermanentDeliveryError, TransientDeliveryError


@pytest.mark.parametrize(
    ("answer", "kind", "transport_level", "retry_after"),
    [
        (Answer(400, code="BadRequest", message="Invalid email address."), PERMANENT, False, None),
        (Answer(401, code="Denied", message="Denied by the resource provider."), PERMANENT, True, None),
        (Answer(403, code="Forbidden", message="Domain not linked."), PERMANENT, True, None),
        (Answer(408, code="RequestTimeout", message="Request timed out."), TRANSIENT, None, None),
        (Answer(429, code="TooManyRequests", message="Quota.", retry_after=17), TRANSIENT, None, 17),
        (Answer(429, code="TooManyRequests", message="Slow.", retry_after_ms=1500), TRANSIENT, None, 1.5),
        (Answer(500, code="InternalServerError", message="Broke."), TRANSIENT, None, None),
        (Answer(503, code="ServiceUnavailable", message="Later.", retry_after=3), TRANSIENT, None, 3),
    ],
    ids=["400", "401", "403", "408", "429-retry-after", "429-retry-after-ms", "500", "503"],
)
async def test_each_acs_answer_maps_to_one_gateway_error(
    acs: AcsTransport,
    fake: FakeAcs,
    answer: Answer,
    kind: type[DeliveryError],
    transport_level: bool | None,
    retry_after: float | None,
) -> None:
    fake.fail_sends(answer)
    with pytest.raises(DeliveryError) as caught:
        await acs.send(make_message())
    error = caught.value
    assert type(error) is kind
    assert str(error).startswith(
        f"ACS answered {answer.status} to send the email: {answer.code}: {answer.message}"
    )
    if transport_level is not None:
        assert isinstance(error, PermanentDeliveryError) and error.transport_level is transport_level
    if kind is TransientDeliveryError:
        assert isinstance(error, TransientDeliveryError) and error.retry_after == retry_after
    assert not type(error).__module__.startswith("azure")


async def test_recipient_addresses_in_provider_text_are_masked(acs: AcsTransport, fake: FakeAcs) -> None:
    fake.fail_sends(Answer(400, message="Recipient jane.doe@example.com is suppressed."))
    with pytest.raises(PermanentDeliveryError) as caught:
        await acs.send(make_message())
    assert "jane.doe@example.com" not in str(caught.value)
    assert "j***@example.com" in str(caught.value)


async def test_the_services_own_400_for_a_bad_recipient_is_permanent(
    acs: AcsTransport, fake: FakeAcs
) -> None:
    with pytest.raises(PermanentDeliveryError) as caught:
        await acs.send(make_message(recipients=("not an address",)))
    assert not caught.value.transport_level
    assert "ACS answered 400" in str(caught.value) and fake.messages == []


async def test_wrong_access_key_fails_the_signature_check_and_is_transport_level(fake: FakeAcs) -> None:
    other_key = base64.b64encode(os.urandom(64)).decode()
    wrong = fake.connection_string.replace(fake.access_key, other_key)
    transport = AcsTransport(settings_for(fake, connection_string=wrong))
    try:
        with pytest.raises(PermanentDeliveryError) as caught:
            await transport.send(make_message())
        assert caught.value.transport_level and "ACS answered 401" in str(caught.value)
        assert other_key not in str(caught.value)
        with pytest.raises(PermanentDeliveryError):
            await transport.check()
    finally:
        await transport.aclose()
    assert fake.messages == []


async def test_untrusted_certificate_is_a_transport_level_failure_naming_ACS_CA_BUNDLE(fake: FakeAcs) -> None:
    transport = AcsTransport(settings_for(fake, ca_bundle=None))  # system trust: the test CA is unknown
    try:
        with pytest.raises(PermanentDeliveryError) as caught:
            await transport.send(make_message())
    finally:
        await transport.aclose()
    assert caught.value.transport_level and "ACS_CA_BUNDLE" in str(caught.value)


async def test_nobody_listening_is_transient(fake: FakeAcs) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    nowhere = fake.connection_string.replace(f":{fake.port}/", f":{port}/")
    transport = AcsTransport(settings_for(fake, connection_string=nowhere))
    try:
        with pytest.raises(TransientDeliveryError, match="could not reach ACS"):
            await transport.send(make_message())
        with pytest.raises(TransientDeliveryError):
            await transport.check()
    finally:
        await transport.aclose()


async def test_a_server_that_never_answers_times_out_as_transient(fake: FakeAcs) -> None:
    with socket.socket() as silent:  # accepts connections (backlog) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        endpoint = fake.connection_string.replace(f":{fake.port}/", f":{port}/")
        transport = AcsTransport(settings_for(fake, connection_string=endpoint, request_timeout_seconds=0.3))
        try:
            with pytest.raises(TransientDeliveryError, match="in time"):
                await transport.send(make_message())
        finally:
            await transport.aclose()


# -- delivery confirmation -------------------------------------------------------------------------


async def test_status_reports_sent_with_retry_after_while_running_then_delivered(
    acs: AcsTransport, fake: FakeAcs
) -> None:
    fake.plan = OperationPlan(running_polls=2, retry_after=7)
    receipt = await acs.send(make_message())
    first, second, third = [await acs.status(receipt) for _ in range(3)]
    assert (first.status, first.retry_after) == ("sent", 7)
    assert (second.status, second.retry_after) == ("sent", 7)
    assert (third.status, third.error) == ("delivered", None)


@pytest.mark.parametrize("final", ["Failed", "Canceled"])
async def test_failed_operation_reports_the_services_code_and_message(
    acs: AcsTransport, fake: FakeAcs, final: str
) -> None:
    fake.plan = OperationPlan(
        final=final, error_code="EmailDropped", error_message="Mailbox full for a@b.example"
    )
    update = await acs.status(await acs.send(make_message()))
    assert update.status == "failed"
    assert update.error == f"ACS reported the email {final}: EmailDropped: Mailbox full for a***@b.example"


async def test_status_errors_map_like_send_errors(acs: AcsTransport, fake: FakeAcs) -> None:
    receipt = await acs.send(make_message())
    fake.fail_polls(Answer(503, retry_after=9), Answer(401))
    with pytest.raises(TransientDeliveryError) as transient:
        await acs.status(receipt)
    assert transient.value.retry_after == 9
    with pytest.raises(PermanentDeliveryError) as permanent:
        await acs.status(receipt)
    assert permanent.value.transport_level
    assert (await acs.status(receipt)).status == "delivered"


async def test_status_of_an_operation_acs_does_not_know_is_permanent(acs: AcsTransport) -> None:
    with pytest.raises(PermanentDeliveryError, match="ACS answered 404"):
        await acs.status(Receipt(status="sent", provider_id="6b1f2a57-0000-4000-8000-000000000000"))


async def test_check_caches_a_good_answer_so_readyz_does_not_spend_the_quota(
    acs: AcsTransport, fake: FakeAcs
) -> None:
    await acs.check()
    await acs.check()
    assert [(s.method, s.status) for s in fake.seen] == [("GET", 404)]


async def test_start_makes_no_request(fake: FakeAcs) -> None:
    transport = AcsTransport(settings_for(fake))
    await transport.start()
    await transport.aclose()
    assert fake.seen == []


# -- the fake's own checks ------------------------------------------------------------------------
#
# Every send above goes through the real SDK, so the fake accepts the SDK's own signatures; the
# requests below are signed here, the way the SDK's HMAC policy signs (without importing its
# private module), so that each can be changed in exactly one way.


def signed_send(
    fake: FakeAcs, body: bytes, *, date: datetime | None = None, key: str | None = None
) -> HttpRequest:
    """A send signed as the SDK signs: HMAC-SHA256 over the verb, the path and query, and the
    values of x-ms-date, host and x-ms-content-sha256 (`date`: now unless given)."""
    path_and_query = "/emails:send?api-version=2025-09-01"
    x_ms_date = format_datetime((date or datetime.now(UTC)).astimezone(UTC), usegmt=True)
    content_hash = base64.b64encode(hashlib.sha256(body).digest()).decode()
    host = fake.endpoint.removeprefix("https://")
    to_sign = f"POST\n{path_and_query}\n{x_ms_date};{host};{content_hash}"
    secret = base64.b64decode(key or fake.access_key)
    signature = base64.b64encode(hmac.new(secret, to_sign.encode(), hashlib.sha256).digest()).decode()
    signed_headers = "x-ms-date;host;x-ms-content-sha256"  # their values, in this order, are signed
    headers = {
        "Content-Type": "application/json",
        "Operation-Id": "0d9f5d0c-57a3-4b5e-9a51-0d6f3f1d2a11",
        "x-ms-date": x_ms_date,
        "x-ms-content-sha256": content_hash,
        "Authorization": f"HMAC-SHA256 SignedHeaders={signed_headers}&Signature={signature}",
    }
    return HttpRequest("POST", f"{fake.endpoint}{path_and_query}", headers=headers, content=body.decode())


def post(fake: FakeAcs, request: HttpRequest, body: bytes) -> httpx2.Response:
    trust = ssl.create_default_context(cafile=str(fake.ca_bundle))
    return httpx2.post(request.url, headers=dict(request.headers), content=body, verify=trust)


BODY = (
    b'{"senderAddress": "noreply@bankx.com", "recipients": {"to": [{"address": "a@example.com"}]},'
    b' "content": {"subject": "s", "plainText": "t"}}'
)


def test_fake_accepts_a_request_signed_as_the_sdk_signs(fake: FakeAcs) -> None:
    response = post(fake, signed_send(fake, BODY), BODY)
    assert response.status_code == 202
    assert response.json() == {"id": "0d9f5d0c-57a3-4b5e-9a51-0d6f3f1d2a11", "status": "Running"}
    assert response.headers["Operation-Location"].startswith(f"{fake.endpoint}/emails/operations/0d9f5d0c-")
    assert response.headers["retry-after"] == "1"


def test_fake_refuses_a_body_changed_after_signing(fake: FakeAcs) -> None:
    request = signed_send(fake, BODY)
    response = post(fake, request, BODY.replace(b'"t"', b'"x"'))
    assert response.status_code == 401 and response.json()["error"]["code"] == "Denied"
    assert fake.messages == []


def test_fake_refuses_a_signature_made_with_another_key(fake: FakeAcs) -> None:
    other = base64.b64encode(os.urandom(64)).decode()
    assert post(fake, signed_send(fake, BODY, key=other), BODY).status_code == 401


def test_fake_refuses_a_content_hash_that_does_not_match(fake: FakeAcs) -> None:
    request = signed_send(fake, BODY)
    request.headers["x-ms-content-sha256"] = base64.b64encode(b"\0" * 32).decode()
    assert post(fake, request, BODY).status_code == 401


def test_fake_refuses_a_stale_x_ms_date_even_when_correctly_signed(fake: FakeAcs) -> None:
    now = datetime.now(UTC)
    stale = signed_send(fake, BODY, date=now - timedelta(minutes=20))
    assert post(fake, stale, BODY).status_code == 401
    assert fake.messages == []
    fresh = signed_send(fake, BODY, date=now)  # the same signing with a current date is accepted
    assert post(fake, fresh, BODY).status_code == 202


def test_fake_treats_a_repeated_operation_id_with_another_message_as_a_bad_request(fake: FakeAcs) -> None:
    assert post(fake, signed_send(fake, BODY), BODY).status_code == 202
    other = BODY.replace(b'"t"', b'"other"')
    response = post(fake, signed_send(fake, other), other)
    assert response.status_code == 400 and len(fake.messages) == 1

"""Managed identity for ACS: the real azure-identity gets a token from a fake managed-identity
endpoint, and the real SDK sends with it to the fake ACS, which accepts only that token."""

from __future__ import annotations

import secrets
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from gateway_acs import AcsSettings, AcsTransport

from gateway.errors import ConfigError, PermanentDeliveryError
from tests.fake_acs import FakeAcs
from tests.fake_identity import FakeIdentityEndpoint
from tests.transport_contract import make_message

pytestmark = pytest.mark.anyio

#: the scope azure-communication-email asks for, as a managed-identity resource
ACS_RESOURCE = "https://communication.azure.com/"


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeAcs]:
    with FakeAcs(tmp_path / "acs") as service:
        service.bearer_token = secrets.token_urlsafe(32)
        yield service


def identity_settings(fake: FakeAcs) -> AcsSettings:
    # No connection string, no access key: the endpoint alone means managed identity.
    return AcsSettings(endpoint=fake.endpoint, ca_bundle=fake.ca_bundle)


@pytest.fixture
def identity_for(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], FakeIdentityEndpoint]]:
    """Start a fake managed-identity endpoint issuing `token`, seen by azure-identity as App Service's."""
    started: list[FakeIdentityEndpoint] = []

    def start(token: str) -> FakeIdentityEndpoint:
        endpoint = FakeIdentityEndpoint(token).__enter__()
        started.append(endpoint)
        for name, value in endpoint.environment().items():
            monkeypatch.setenv(name, value)
        return endpoint

    yield start
    for endpoint in started:
        endpoint.__exit__(None, None, None)


async def test_a_managed_identity_token_sends_through_acs(
    fake: FakeAcs, identity_for: Callable[[str], FakeIdentityEndpoint]
) -> None:
    assert fake.bearer_token is not None
    identity = identity_for(fake.bearer_token)
    transport = AcsTransport(identity_settings(fake))
    await transport.start()
    try:
        message = make_message()
        receipt = await transport.send(message)
        await transport.check()  # /readyz's probe goes through with the same token
    finally:
        await transport.aclose()
    assert receipt.provider_id == message.delivery_id
    assert [m["headers"]["Message-ID"] for m in fake.messages] == [message.message_id]
    assert identity.resources and set(identity.resources) == {ACS_RESOURCE}


async def test_a_token_acs_refuses_is_a_transport_level_failure(
    fake: FakeAcs, identity_for: Callable[[str], FakeIdentityEndpoint]
) -> None:
    identity_for("a token for some other resource")
    transport = AcsTransport(identity_settings(fake))
    await transport.start()
    try:
        with pytest.raises(PermanentDeliveryError) as caught:
            await transport.send(make_message())
    finally:
        await transport.aclose()
    assert caught.value.transport_level  # credentials: the failover chain moves on
    assert fake.messages == []


def test_managed_identity_without_the_identity_extra_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # azure-identity is installed for these tests; None in sys.modules is how Python says "absent".
    monkeypatch.setitem(sys.modules, "azure.identity", None)
    with pytest.raises(ConfigError, match=r"escalation-comms\[identity\]"):
        AcsTransport(AcsSettings(endpoint="https://bankx.communication.azure.com/"))

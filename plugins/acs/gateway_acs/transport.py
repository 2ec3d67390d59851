"""The acs transport: Azure Communication Services Email through the async azure SDK.

`send` returns once ACS has accepted the message (202) under an operation id that
is the delivery's id, so a retry of the same delivery is the same operation at
ACS, never a second email. azure-core's own retries are off: the dispatcher is the
one retry layer. Delivery confirmation comes later from `status`, which GETs the
operation. All SDK errors are translated in `gateway_acs.errors`.
"""

from __future__ import annotations

import importlib.util
import json
import ssl
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

from azure.communication.email.aio import EmailClient
from azure.core.credentials import AzureKeyCredential
from azure.core.rest import HttpRequest
from pydantic import SecretStr

from gateway.errors import ConfigError, TransientDeliveryError
from gateway.transport import OutgoingMessage, Receipt, StatusUpdate, Transport
from gateway_acs.connection_string import check_endpoint, parse_connection_string
from gateway_acs.errors import SENDING, for_status, from_exception, provider_detail, retry_after
from gateway_acs.message import to_acs_message
from gateway_acs.settings import AcsSettings

#: a successful readiness probe is trusted this long, so /readyz does not spend ACS's request quota
CHECK_CACHE_SECONDS = 30.0
ASKING_STATUS = "ask for the delivery status"
PROBING = "check the credentials"
_FINAL_FAILURES = ("Failed", "Canceled")


class AcsTransport(Transport):
    name = "acs"
    settings_model = AcsSettings
    tracks_delivery = True

    def __init__(self, settings: AcsSettings) -> None:
        super().__init__(settings)
        self.settings: AcsSettings = settings
        self._endpoint, self._key = _credentials_from(settings)
        self._ca_bundle = _checked_ca_bundle(settings)
        self._client: EmailClient | None = None
        self._identity: Any = None  # azure.identity.aio.DefaultAzureCredential, closed in aclose
        self._healthy_until = 0.0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Build the client; no request is made, so a down service cannot delay start-up."""
        self._ensure_client()

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()
        identity, self._identity = self._identity, None
        if identity is not None:
            await identity.close()

    def _ensure_client(self) -> EmailClient:
        if self._client is None:
            credential: Any
            if self._key is not None:
                credential = AzureKeyCredential(self._key.get_secret_value())
            else:
                from azure.identity.aio import DefaultAzureCredential

                self._identity = credential = DefaultAzureCredential()
            timeout = self.settings.request_timeout_seconds
            self._client = EmailClient(
                self._endpoint,
                credential,
                api_version=self.settings.api_version,
                retry_total=0,  # the gateway's dispatcher is the only retry layer
                connection_timeout=timeout,
                read_timeout=timeout,
                connection_verify=str(self._ca_bundle) if self._ca_bundle else True,
            )
        return self._client

    # -- sending -----------------------------------------------------------------------------

    async def send(self, message: OutgoingMessage) -> Receipt:
        client = self._ensure_client()
        try:
            # polling=False: the poller only carries the 202 answer; confirmation is `status`'s job
            poller = await client.begin_send(
                to_acs_message(message), operation_id=message.delivery_id, polling=False
            )
            accepted = await poller.result()
        except Exception as err:
            raise from_exception(err, doing=SENDING) from err
        operation_id = accepted.get("id") if isinstance(accepted, dict) else None
        return Receipt(status="sent", provider_id=str(operation_id or message.delivery_id))

    async def status(self, receipt: Receipt) -> StatusUpdate:
        """GET /emails/operations/{id}: Succeeded -> delivered, Failed/Canceled -> failed, else sent."""
        if not receipt.provider_id:
            return StatusUpdate(status=receipt.status)
        code, headers, content = await self._get_operation(receipt.provider_id, doing=ASKING_STATUS)
        if code != 200:
            raise for_status(code, headers, content, doing=ASKING_STATUS)
        body = _json_object(content)
        if body is None:
            raise TransientDeliveryError(f"ACS answered 200 to {ASKING_STATUS}, but not with a JSON object")
        state = str(body.get("status") or "")
        if state == "Succeeded":
            return StatusUpdate(status="delivered")
        if state in _FINAL_FAILURES:
            error = body.get("error")
            if not isinstance(error, dict):
                error = {}
            detail = provider_detail(error.get("code"), error.get("message"))
            return StatusUpdate(status="failed", error=f"ACS reported the email {state}: {detail}")
        return StatusUpdate(status="sent", retry_after=retry_after(headers))

    async def check(self) -> None:
        """Reachable, and the credentials accepted: GET an operation that does not exist (a 404)."""
        if time.monotonic() < self._healthy_until:
            return
        code, headers, content = await self._get_operation(str(uuid.uuid4()), doing=PROBING)
        # Any answer but 401/403 (credentials), 408 and 5xx (the service) proves reachability and auth.
        if code in (401, 403, 408) or code >= 500:
            raise for_status(code, headers, content, doing=PROBING)
        self._healthy_until = time.monotonic() + CHECK_CACHE_SECONDS

    async def _get_operation(self, operation_id: str, *, doing: str) -> tuple[int, dict[str, str], bytes]:
        """(status code, headers, body) of GET /emails/operations/{id}; raises only when no answer came."""
        client = self._ensure_client()
        request = HttpRequest(
            "GET",
            f"/emails/operations/{quote(operation_id, safe='')}",
            params={"api-version": self.settings.api_version},
        )
        try:
            response = await client.send_request(request)
            content = response.content
        except Exception as err:
            raise from_exception(err, doing=doing) from err
        return response.status_code, dict(response.headers), content


def _json_object(content: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _credentials_from(settings: AcsSettings) -> tuple[str, SecretStr | None]:
    """(endpoint, access key), or (endpoint, None) for managed identity; ConfigError otherwise."""
    if settings.connection_string is not None and settings.endpoint is not None:
        raise ConfigError(
            "acs transport: set either AZURE_COMMUNICATION_CONNECTION_STRING (access key) or "
            "transports.acs.endpoint / ACS_ENDPOINT (managed identity), not both"
        )
    if settings.connection_string is not None:
        parsed = parse_connection_string(settings.connection_string.get_secret_value())
        return parsed.endpoint, parsed.access_key
    if settings.endpoint is None:
        raise ConfigError(
            "acs transport: AZURE_COMMUNICATION_CONNECTION_STRING is not set; set it to the connection "
            "string of your Communication Services resource (endpoint=https://...;accesskey=...), or set "
            "ACS_ENDPOINT to use managed identity"
        )
    endpoint = check_endpoint(settings.endpoint, prefix="transports.acs.endpoint (ACS_ENDPOINT)")
    if importlib.util.find_spec("azure.identity") is None:
        raise ConfigError(
            "transports.acs.endpoint (ACS_ENDPOINT) means managed identity, which needs azure-identity: "
            "install the identity extra (pip install 'escalation-comms[identity]') or use "
            "AZURE_COMMUNICATION_CONNECTION_STRING instead"
        )
    return endpoint, None


def _checked_ca_bundle(settings: AcsSettings) -> Path | None:
    bundle = settings.ca_bundle
    if bundle is None:
        return None
    if not bundle.is_file():
        raise ConfigError(f"ACS_CA_BUNDLE (transports.acs.ca_bundle): {bundle} is not a file")
    try:
        ssl.create_default_context(cafile=str(bundle))
    except (ssl.SSLError, OSError, ValueError) as err:
        raise ConfigError(
            f"ACS_CA_BUNDLE (transports.acs.ca_bundle): {bundle} is not a readable PEM CA bundle ({err})"
        ) from None
    return bundle

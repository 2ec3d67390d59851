"""The one place where ACS answers and azure-core exceptions become gateway errors.

    401, 403                        PermanentDeliveryError(transport_level)  credentials: fail over
    404 to a send                   PermanentDeliveryError(transport_level)  not an ACS endpoint
    400 and other 4xx               PermanentDeliveryError                    this message cannot be sent
    408, 429, 5xx                   TransientDeliveryError(retry_after)       try again later
    connection errors, timeouts     TransientDeliveryError
    certificate not trusted         PermanentDeliveryError(transport_level)  ACS_CA_BUNDLE or proxy

What the service said (its error code and message) appears only inside the
error text, which the store records as the delivery's error; addresses in it
are masked and it is cut short. No azure exception leaves the transport.
"""

from __future__ import annotations

import contextlib
import json
import re
import ssl
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ServiceRequestError,
    ServiceRequestTimeoutError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)

from gateway.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from gateway.logs import mask_address

#: what `doing` says for a send; other calls name their own action
SENDING = "send the email"
#: how much of the provider's message is kept in the recorded error
MAX_DETAIL_CHARS = 300
_ADDRESS = re.compile(r"[^\s<>()\[\]'\",;:]+@[^\s<>()\[\]'\",;:]+")


def provider_detail(code: str | None, message: str | None) -> str:
    """`Code: message`, addresses masked, shortened; what the recorded error shows of ACS's answer."""
    text = " ".join((message or "").split())
    text = _ADDRESS.sub(lambda m: mask_address(m.group(0)), text)
    if len(text) > MAX_DETAIL_CHARS:
        text = text[: MAX_DETAIL_CHARS - 1] + "…"
    if code and text:
        return f"{code}: {text}"
    return code or text or "no details"


def error_body(body: bytes | str | None) -> tuple[str | None, str | None]:
    """(code, message) from an ACS ErrorResponse body `{"error": {"code", "message"}}`."""
    if not body:
        return None, None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return None, None
    code, message = error.get("code"), error.get("message")
    return (str(code) if code else None, str(message) if message else None)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait, from retry-after-ms / x-ms-retry-after-ms or Retry-After (seconds or a date)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    for name in ("retry-after-ms", "x-ms-retry-after-ms"):
        value = lowered.get(name)
        if value:
            try:
                return max(0.0, float(value) / 1000)
            except ValueError:
                pass
    value = lowered.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def for_status(
    status: int, headers: Mapping[str, str], body: bytes | str | None, *, doing: str
) -> DeliveryError:
    """The gateway error for an HTTP answer that is not a success; `doing` says what was attempted."""
    code, message = error_body(body)
    code = code or headers.get("x-ms-error-code")
    detail = f"ACS answered {status} to {doing}: {provider_detail(code, message)}"
    if status in (401, 403):
        return PermanentDeliveryError(
            f"{detail} (check AZURE_COMMUNICATION_CONNECTION_STRING or the identity's role)",
            transport_level=True,
        )
    if status == 404 and doing == SENDING:
        # the email API is not at this endpoint: every message would fail the same way
        return PermanentDeliveryError(f"{detail} (is the endpoint an ACS resource?)", transport_level=True)
    if status in (408, 429) or status >= 500:
        return TransientDeliveryError(detail, retry_after=retry_after(headers))
    return PermanentDeliveryError(detail)


def from_exception(err: BaseException, *, doing: str) -> DeliveryError:
    """Translate an azure-core (or aiohttp / OS) exception raised while `doing` something."""
    if isinstance(err, HttpResponseError) and err.response is not None and err.status_code:
        response: Any = err.response
        return for_status(err.status_code, dict(response.headers), _body_of(response), doing=doing)
    untrusted = _certificate_problem(err)
    if untrusted is not None:
        return PermanentDeliveryError(
            f"the TLS certificate of the ACS endpoint failed verification ({untrusted}) while trying to "
            f"{doing}; if a proxy or private endpoint uses its own CA, set ACS_CA_BUNDLE to it",
            transport_level=True,
        )
    if isinstance(err, ServiceRequestTimeoutError | ServiceResponseTimeoutError | TimeoutError):
        return TransientDeliveryError(f"ACS did not answer in time while trying to {doing}")
    if isinstance(err, ServiceRequestError | ServiceResponseError | aiohttp.ClientError | OSError):
        return TransientDeliveryError(f"could not reach ACS to {doing}: {_cause(err)}")
    if isinstance(err, AzureError):
        return TransientDeliveryError(f"ACS request failed while trying to {doing}: {type(err).__name__}")
    return TransientDeliveryError(f"unexpected {type(err).__name__} while trying to {doing}")


def _body_of(response: Any) -> bytes | None:
    """The already-read body of an azure-core response (new `rest` or legacy transport type)."""
    body: Any = None
    with contextlib.suppress(Exception):  # the new `rest` type raises when the body was not read
        body = response.content
    if body is None and callable(getattr(response, "body", None)):
        with contextlib.suppress(Exception):
            body = response.body()
    if isinstance(body, str):
        return body.encode()
    return body if isinstance(body, bytes) else None


def _chain(err: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [err]
    while todo:
        current = todo.pop()
        if current is None or any(current is s for s in seen):
            continue
        seen.append(current)
        inner: Any = getattr(current, "inner_exception", None)
        todo.extend([current.__cause__, current.__context__])
        if isinstance(inner, BaseException):
            todo.append(inner)
    return seen


def _certificate_problem(err: BaseException) -> str | None:
    """Why certificate verification failed (e.g. "unable to get local issuer certificate"), if it did."""
    found = None
    for e in _chain(err):
        if isinstance(e, aiohttp.ClientConnectorCertificateError):
            e = e.certificate_error
        if isinstance(e, ssl.SSLCertVerificationError):
            found = getattr(e, "verify_message", None) or found or "certificate verify failed"
    return str(found) if found else None


def _cause(err: BaseException) -> str:
    """A short, secret-free reason: the innermost OS or connection error's class and text."""
    for e in reversed(_chain(err)):
        if isinstance(e, OSError | aiohttp.ClientError) and str(e):
            return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return type(err).__name__

"""A fake Azure Communication Services Email REST service, for the real SDK to talk to.

It speaks the 2025-09-01 API the way the service does (shapes from the REST spec
and azure/communication/email/_generated): `POST /emails:send` answers 202 with
`Operation-Location`, `retry-after` and `{id, status}`; `GET /emails/operations/{id}`
answers the operation's status. Every request must carry the HMAC-SHA256 signature
that azure-communication-email's `HMACCredentialsPolicy` computes
(x-ms-date;host;x-ms-content-sha256), or the bearer token set in `bearer_token`
(managed identity), or it gets 401. A repeated Operation-Id with
the same message is the same operation (no second email); with a different message
it is a 400, as Azure's long-running-operation guidelines say.

It serves HTTPS (a certificate from a trustme CA; `ca_bundle` is the file for
ACS_CA_BUNDLE) from its own thread, so a gateway subprocess can talk to it while
a test waits. Tests script it: `fail_sends(...)`, `fail_polls(...)`, `plan`.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import os
import re
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import trustme
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

API_VERSIONS = ("2023-03-31", "2024-07-01-preview", "2025-09-01")
#: how far x-ms-date may be from the fake's clock, as the service allows
CLOCK_SKEW = timedelta(minutes=15)
REQUIRED_SIGNED_HEADERS = {"x-ms-date", "host", "x-ms-content-sha256"}
_AUTHORIZATION = re.compile(r"HMAC-SHA256 SignedHeaders=(?P<headers>[^&]+)&Signature=(?P<signature>\S+)")
_ADDRESS = re.compile(r"[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+")


@dataclass(frozen=True)
class Answer:
    """A scripted reply: HTTP `status` with an ACS ErrorResponse body.

    `accept_first` makes the fake take the message (create the operation) and still
    answer `status`, as when the service accepted but the answer was lost on the way.
    `recipient` limits the answer to a send addressed to that address.
    """

    status: int
    code: str | None = None
    message: str | None = None
    retry_after: int | None = None
    retry_after_ms: int | None = None
    accept_first: bool = False
    recipient: str | None = None


@dataclass(frozen=True)
class OperationPlan:
    """How an operation created from now on ends: `running_polls` GETs say Running, then `final`."""

    final: str = "Succeeded"  # Succeeded | Failed | Canceled
    running_polls: int = 0
    error_code: str | None = None
    error_message: str | None = None
    retry_after: int = 1  # seconds, on the 202 and on Running answers


@dataclass
class Operation:
    id: str
    message: dict[str, Any]
    plan: OperationPlan
    polls: int = 0

    def view(self) -> dict[str, Any]:
        """The EmailSendResult body for the current state (counts one poll)."""
        if self.polls <= self.plan.running_polls:
            return {"id": self.id, "status": "Running"}
        body: dict[str, Any] = {"id": self.id, "status": self.plan.final}
        if self.plan.final != "Succeeded":
            body["error"] = {
                "code": self.plan.error_code or "EmailDropped",
                "message": self.plan.error_message or "Email was dropped after several attempts to deliver.",
            }
        return body


@dataclass(frozen=True)
class Seen:
    """One request as the fake saw it, and what it answered."""

    method: str
    path: str
    operation_id: str | None
    status: int
    at: float  # time.monotonic() when the fake answered it


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}},
        status_code=status,
        headers={"x-ms-error-code": code, **(headers or {})},
    )


def _scripted(answer: Answer) -> JSONResponse:
    headers: dict[str, str] = {}
    if answer.retry_after is not None:
        headers["Retry-After"] = str(answer.retry_after)
    if answer.retry_after_ms is not None:
        headers["retry-after-ms"] = str(answer.retry_after_ms)
    default_codes = {
        400: "BadRequest",
        401: "Denied",
        403: "Forbidden",
        408: "RequestTimeout",
        429: "TooManyRequests",
        500: "InternalServerError",
    }
    code = answer.code or default_codes.get(answer.status, "ServiceUnavailable")
    return _error(answer.status, code, answer.message or f"scripted {answer.status}", headers)


class FakeAcs:
    """The fake service; use as a context manager or call start()/stop()."""

    def __init__(self, directory: Path, ca: trustme.CA | None = None, access_key: str | None = None) -> None:
        self.directory = directory
        self.ca = ca or trustme.CA()
        self.access_key = access_key or base64.b64encode(os.urandom(64)).decode()
        #: the Microsoft Entra token accepted as `Authorization: Bearer ...` (managed identity)
        self.bearer_token: str | None = None
        self.plan = OperationPlan()
        self._lock = threading.Lock()
        self._send_script: deque[Answer] = deque()
        self._poll_script: deque[Answer] = deque()
        self._operations: dict[str, Operation] = {}
        self._messages: list[dict[str, Any]] = []
        self._seen: list[Seen] = []
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.ca_bundle = directory / "fake-acs-ca.pem"

    # -- what tests use ----------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def connection_string(self) -> str:
        return f"endpoint={self.endpoint}/;accesskey={self.access_key}"

    def environment(self) -> dict[str, str]:
        """The variables that point the gateway's acs transport at this fake."""
        return {
            "AZURE_COMMUNICATION_CONNECTION_STRING": self.connection_string,
            "ACS_CA_BUNDLE": str(self.ca_bundle),
        }

    def fail_sends(self, *answers: Answer) -> None:
        """Answer the next sends with these, in order (then accept again)."""
        with self._lock:
            self._send_script.extend(answers)

    def fail_polls(self, *answers: Answer) -> None:
        """Answer the next operation GETs with these, in order."""
        with self._lock:
            self._poll_script.extend(answers)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """Every message accepted, once per operation, as the JSON the SDK sent."""
        with self._lock:
            return copy.deepcopy(self._messages)

    @property
    def operations(self) -> dict[str, Operation]:
        with self._lock:
            return dict(self._operations)

    @property
    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    def sends(self) -> list[Seen]:
        return [s for s in self.seen if s.method == "POST"]

    # -- the server --------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> FakeAcs:
        self.directory.mkdir(parents=True, exist_ok=True)
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        cert_file, key_file = self.directory / "fake-acs-cert.pem", self.directory / "fake-acs-key.pem"
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
        for extra in cert.cert_chain_pems[1:]:
            extra.write_to_path(str(cert_file), append=True)
        cert.private_key_pem.write_to_path(str(key_file))
        self.ca.cert_pem.write_to_path(str(self.ca_bundle))

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app(),
            ssl_certfile=str(cert_file),
            ssl_keyfile=str(key_file),
            log_level="warning",
            lifespan="off",
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="fake-acs", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the fake ACS service did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
        self._server = self._thread = None

    def __enter__(self) -> FakeAcs:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/emails:send", self._send, methods=["POST"]),
                Route("/emails/operations/{operation_id}", self._operation, methods=["GET"]),
            ]
        )

    # -- endpoints ---------------------------------------------------------------------------

    async def _send(self, request: Request) -> Response:
        body = await request.body()
        operation_id = request.headers.get("operation-id")
        response = self._answer_send(request, body, operation_id)
        self._note(request, operation_id, response.status_code)
        return response

    def _answer_send(self, request: Request, body: bytes, operation_id: str | None) -> Response:
        refused = self._authenticate(request, body) or self._check_version(request)
        if refused is not None:
            return refused
        try:
            message = json.loads(body)
        except ValueError:
            return _error(400, "InvalidRequest", "The request body is not valid JSON.")
        problem = _invalid_message(message)
        if problem:
            return _error(400, "BadRequest", problem)
        if operation_id is not None:
            try:
                operation_id = str(uuid.UUID(operation_id))
            except ValueError:
                return _error(400, "InvalidOperationId", "Operation-Id must be a UUID.")
        operation_id = operation_id or str(uuid.uuid4())
        with self._lock:
            answer = _take(self._send_script, [r["address"] for r in message["recipients"]["to"]])
            if answer is not None and not answer.accept_first:
                return _scripted(answer)
            existing = self._operations.get(operation_id)
            if existing is not None and existing.message != message:
                return _error(
                    400, "OperationIdAlreadyExists", "Operation-Id was already used for a different message."
                )
            if existing is None:
                existing = Operation(id=operation_id, message=message, plan=self.plan)
                self._operations[operation_id] = existing
                self._messages.append(copy.deepcopy(message))
            if answer is not None:
                return _scripted(answer)
        version = request.query_params["api-version"]
        location = f"{self.endpoint}/emails/operations/{existing.id}?api-version={version}"
        return JSONResponse(
            {"id": existing.id, "status": "Running"},
            status_code=202,
            headers={
                "Operation-Location": location,
                "retry-after": str(existing.plan.retry_after),
            },
        )

    async def _operation(self, request: Request) -> Response:
        body = await request.body()
        operation_id = request.path_params["operation_id"]
        response = self._answer_operation(request, body, operation_id)
        self._note(request, operation_id, response.status_code)
        return response

    def _answer_operation(self, request: Request, body: bytes, operation_id: str) -> Response:
        refused = self._authenticate(request, body) or self._check_version(request)
        if refused is not None:
            return refused
        with self._lock:
            answer = _take(self._poll_script, [])
            if answer is not None:
                return _scripted(answer)
            operation = self._operations.get(operation_id)
            if operation is None:
                return _error(404, "NotFound", f"Operation {operation_id} was not found.")
            operation.polls += 1
            view = operation.view()
            headers = {"retry-after": str(operation.plan.retry_after)} if view["status"] == "Running" else {}
        return JSONResponse(view, status_code=200, headers=headers)

    def _note(self, request: Request, operation_id: str | None, status: int) -> None:
        with self._lock:
            self._seen.append(Seen(request.method, request.url.path, operation_id, status, time.monotonic()))

    # -- checks the service makes ------------------------------------------------------------

    def _check_version(self, request: Request) -> Response | None:
        version = request.query_params.get("api-version")
        if version not in API_VERSIONS:
            return _error(400, "UnsupportedApiVersion", f"api-version {version!r} is not supported.")
        return None

    def _authenticate(self, request: Request, body: bytes) -> Response | None:
        """HMAC-SHA256 over VERB, path and query, and the signed headers' values, as the SDK signs
        with an access key; or, with managed identity, the bearer token set in `bearer_token`."""
        denied = _error(401, "Denied", "Denied by the resource provider.")
        scheme, _, credential = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            accepted = self.bearer_token is not None and hmac.compare_digest(credential, self.bearer_token)
            return None if accepted else denied
        date, digest = request.headers.get("x-ms-date"), request.headers.get("x-ms-content-sha256")
        match = _AUTHORIZATION.fullmatch(request.headers.get("authorization", ""))
        if not date or not digest or match is None:
            return denied
        try:
            sent_at = parsedate_to_datetime(date)
        except (TypeError, ValueError):
            return denied
        if sent_at.tzinfo is None or abs(datetime.now(UTC) - sent_at) > CLOCK_SKEW:
            return denied
        expected_digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
        if not hmac.compare_digest(digest, expected_digest):
            return denied
        signed = match.group("headers").lower().split(";")
        if not set(signed) >= REQUIRED_SIGNED_HEADERS:
            return denied
        values = [request.headers.get(name, "") for name in signed]
        raw_path = request.scope.get("raw_path", b"").decode("latin-1") or request.url.path
        query = request.scope.get("query_string", b"").decode("latin-1")
        path_and_query = unquote(raw_path + (f"?{query}" if query else ""))
        to_sign = f"{request.method.upper()}\n{path_and_query}\n{';'.join(values)}"
        key = base64.b64decode(self.access_key)
        expected = base64.b64encode(hmac.new(key, to_sign.encode(), hashlib.sha256).digest()).decode()
        if not hmac.compare_digest(match.group("signature"), expected):
            return denied
        return None


def _take(script: deque[Answer], recipients: list[str]) -> Answer | None:
    """The first scripted answer that applies to a request for these recipients, removed."""
    for index, answer in enumerate(script):
        if answer.recipient is None or answer.recipient in recipients:
            del script[index]
            return answer
    return None


def _invalid_message(message: Any) -> str | None:
    """What the service refuses with 400 before it queues anything."""
    if not isinstance(message, dict):
        return "The request body must be a JSON object."
    if not isinstance(message.get("senderAddress"), str) or not message["senderAddress"]:
        return "senderAddress is required."
    content = message.get("content")
    if not isinstance(content, dict) or not isinstance(content.get("subject"), str):
        return "content.subject is required."
    if not content.get("plainText") and not content.get("html"):
        return "Either plainText or html content is required."
    recipients = message.get("recipients")
    to = recipients.get("to") if isinstance(recipients, dict) else None
    if not isinstance(to, list) or not to:
        return "At least one recipient is required."
    for entry in to:
        address = entry.get("address") if isinstance(entry, dict) else None
        if not isinstance(address, str) or not _ADDRESS.fullmatch(address):
            return f"Invalid email address format: {address}"
    headers = message.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        return "headers must map names to strings."
    return None

"""A fake managed-identity token endpoint (the App Service protocol), for azure-identity to use.

azure-identity's ManagedIdentityCredential, given IDENTITY_ENDPOINT and IDENTITY_HEADER, asks
`GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=...` with the header
`X-IDENTITY-HEADER` and expects `{access_token, expires_on, resource, token_type}`. This one
answers with a token of the test's choice and records what was asked, over plain HTTP on a
free loopback port (as App Service's local endpoint does), from its own thread.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class FakeIdentityEndpoint:
    def __init__(self, token: str) -> None:
        self.token = token
        self.header_secret = secrets.token_hex(16)
        #: the `resource` of every token request that carried the right header
        self.resources: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                if self.headers.get("X-IDENTITY-HEADER") != fake.header_secret:
                    self._answer(401, {"error": "unauthorized"})
                    return
                resource = query.get("resource", [""])[0]
                fake.resources.append(resource)
                self._answer(
                    200,
                    {
                        "access_token": fake.token,
                        "expires_on": str(int(time.time()) + 3600),
                        "resource": resource,
                        "token_type": "Bearer",
                    },
                )

            def _answer(self, status: int, body: dict[str, str]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeIdentityEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def environment(self) -> dict[str, str]:
        """What App Service sets, and azure-identity reads, for a system-assigned identity."""
        host, port = self._server.server_address[:2]
        return {"IDENTITY_ENDPOINT": f"http://{host}:{port}/msi/token", "IDENTITY_HEADER": self.header_secret}

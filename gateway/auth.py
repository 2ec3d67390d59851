"""Bearer-token authentication for /mcp, through the MCP SDK's `TokenVerifier`.

Tokens come from MCP_AUTH_TOKEN (comma-separated) and, for rotation without a
restart, from a file of SHA-256 hex digests (one per line, `#` comments) that is
re-read whenever it changes. Only digests are kept and compared, in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path

from mcp.server.auth.provider import AccessToken

log = logging.getLogger("gateway.auth")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class StaticTokenVerifier:
    def __init__(self, tokens: list[str], token_file: Path | None = None) -> None:
        self._digests = [token_digest(t) for t in tokens if t]
        self._file = token_file
        self._file_stamp: tuple[float, int] | None = None
        self._file_digests: list[str] = []
        self._load_file()

    @property
    def enabled(self) -> bool:
        return bool(self._digests) or self._file is not None

    def _load_file(self) -> None:
        if self._file is None:
            return
        try:
            stat = self._file.stat()
        except OSError as err:
            log.error(
                "token file %s is unreadable (%s); only MCP_AUTH_TOKEN tokens are accepted",
                self._file,
                err.strerror,
            )
            self._file_digests = []
            return
        stamp = (stat.st_mtime, stat.st_size)
        if stamp == self._file_stamp:
            return
        digests = []
        for number, line in enumerate(self._file.read_text(encoding="utf-8").splitlines(), 1):
            entry = line.split("#", 1)[0].strip().lower()
            if not entry:
                continue
            if len(entry) != 64 or any(c not in "0123456789abcdef" for c in entry):
                log.error("token file %s line %d is not a SHA-256 hex digest; ignored", self._file, number)
                continue
            digests.append(entry)
        self._file_digests = digests
        self._file_stamp = stamp
        log.info("loaded %d token digest(s) from %s", len(digests), self._file)

    def matches(self, token: str) -> bool:
        self._load_file()
        digest = token_digest(token)
        found = False
        for known in (*self._digests, *self._file_digests):
            # No early exit: the time taken does not depend on which token matched.
            found |= hmac.compare_digest(known, digest)
        return found

    async def verify_token(self, token: str) -> AccessToken | None:
        if not self.matches(token):
            return None
        return AccessToken(token=token, client_id=f"token-{token_digest(token)[:8]}", scopes=[])

"""Bearer-token authentication for /mcp, through the MCP SDK's `TokenVerifier`.

Tokens come from MCP_AUTH_TOKEN (comma-separated) and, for rotation without a
restart, from a file of SHA-256 hex digests (one per line, `#` comments) that is
re-read whenever its content changes. Only digests are kept and compared, in
constant time; no token (nor digest) is ever logged or put in an error message.
A configured but unreadable file accepts no file tokens: authentication fails
closed, never open.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from pathlib import Path

from mcp.server.auth.provider import AccessToken

log = logging.getLogger("gateway.auth")

#: a token file larger than this is refused (it holds a few digests, not megabytes)
MAX_TOKEN_FILE_BYTES = 1 << 20
#: tokens shorter than this are accepted, with a warning at start-up
MIN_TOKEN_CHARS = 16


#: how often the token file is looked at again (a rotation takes effect within this time)
TOKEN_FILE_RECHECK_SECONDS = 1.0


def token_digest(token: str) -> str:
    """What the token file holds for `token`: `printf %s TOKEN | sha256sum`."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class StaticTokenVerifier:
    def __init__(self, tokens: list[str], token_file: Path | None = None) -> None:
        self._digests = [token_digest(t) for t in tokens if t]
        short = sum(1 for t in tokens if t and len(t) < MIN_TOKEN_CHARS)
        if short:
            log.warning(
                "%d MCP_AUTH_TOKEN token(s) are shorter than %d characters; use long random tokens",
                short,
                MIN_TOKEN_CHARS,
            )
        self._file = token_file
        self._file_content: bytes | None = None
        self._file_problem: str | None = None
        self._file_digests: list[str] = []
        self._checked_at: float | None = None
        self._load_file()

    @property
    def enabled(self) -> bool:
        return bool(self._digests) or self._file is not None

    def _load_file(self) -> None:
        """Re-parse the token file when its bytes changed (mtime alone misses same-size rewrites).

        Read at most once every `TOKEN_FILE_RECHECK_SECONDS`: a rotation takes effect within that
        time, and a busy server does not read the file on every request."""
        if self._file is None:
            return
        now = time.monotonic()
        if self._checked_at is not None and now - self._checked_at < TOKEN_FILE_RECHECK_SECONDS:
            return
        self._checked_at = now
        try:
            with self._file.open("rb") as handle:
                content = handle.read(MAX_TOKEN_FILE_BYTES + 1)
        except OSError as err:
            self._file_failed(f"is unreadable ({err.strerror})")
            return
        if len(content) > MAX_TOKEN_FILE_BYTES:
            self._file_failed(f"is larger than {MAX_TOKEN_FILE_BYTES} bytes")
            return
        if content == self._file_content:
            return
        digests = []
        for number, line in enumerate(content.decode("utf-8", errors="replace").splitlines(), 1):
            entry = line.split("#", 1)[0].strip().lower()
            if not entry:
                continue
            if len(entry) != 64 or any(c not in "0123456789abcdef" for c in entry):
                log.error("token file %s line %d is not a SHA-256 hex digest; ignored", self._file, number)
                continue
            digests.append(entry)
        self._file_content = content
        self._file_problem = None
        self._file_digests = digests
        log.info("loaded %d token digest(s) from %s", len(digests), self._file)

    def _file_failed(self, problem: str) -> None:
        if problem != self._file_problem:  # once per change, not once per request
            log.error("token file %s %s; only MCP_AUTH_TOKEN tokens are accepted", self._file, problem)
        self._file_problem = problem
        self._file_content = None
        self._file_digests = []

    def matches(self, token: str) -> bool:
        self._load_file()
        digest = token_digest(token)
        found = False
        for known in (*self._digests, *self._file_digests):
            # No early exit: the time taken does not depend on which token matched.
            found |= hmac.compare_digest(known, digest)
        return found

    async def verify_token(self, token: str) -> AccessToken | None:
        if not token or not self.matches(token):
            return None
        return AccessToken(token=token, client_id=f"token-{token_digest(token)[:8]}", scopes=[])

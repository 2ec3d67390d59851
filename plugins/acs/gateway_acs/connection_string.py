"""Parse and check an ACS connection string before anything is sent.

The SDK accepts a malformed string with a plain ValueError, rewrites an http://
endpoint to https, and decodes the access key leniently, so a key that is not
base64 fails only at the first send. Checking here stops start-up instead, with
a message that says what is wrong and never repeats the key (or any value that
might be the key, put in the wrong place).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from urllib.parse import urlsplit

from pydantic import SecretStr

from gateway.errors import ConfigError

PREFIX = "Invalid Azure Communication Services connection string"
EXPECTED = "expected endpoint=https://<resource>.communication.azure.com/;accesskey=<base64 key>"


@dataclass(frozen=True)
class ConnectionString:
    """The two parts of a checked connection string; the key stays a SecretStr."""

    endpoint: str
    access_key: SecretStr


def _invalid(problem: str) -> ConfigError:
    return ConfigError(f"{PREFIX} (AZURE_COMMUNICATION_CONNECTION_STRING): {problem}; {EXPECTED}")


def parse_connection_string(raw: str) -> ConnectionString:
    """Return the endpoint (https://host[:port], no trailing slash) and the access key."""
    text = raw.strip()
    if not text:
        raise _invalid("it is empty")
    parts: dict[str, str] = {}
    for position, segment in enumerate(text.split(";"), start=1):
        segment = segment.strip()
        if not segment:
            continue  # a trailing ';' is common and harmless
        key, sep, value = segment.partition("=")
        key = key.strip().lower()
        if not sep or not key.isidentifier():
            raise _invalid(f"part {position} is not of the form key=value")
        if key in parts:
            raise _invalid(f"{key}= appears twice")
        parts[key] = value.strip()
    missing = [k for k in ("endpoint", "accesskey") if not parts.get(k)]
    if missing:
        found = ", ".join(sorted(parts)) or "none"
        raise _invalid(f"{' and '.join(k + '=' for k in missing)} missing or empty (keys found: {found})")
    return ConnectionString(
        endpoint=check_endpoint(parts["endpoint"]), access_key=_check_key(parts["accesskey"])
    )


def check_endpoint(value: str, *, prefix: str = PREFIX) -> str:
    """An https URL with a host and nothing after it but '/'; returned without the slash."""

    def invalid(problem: str) -> ConfigError:
        if prefix == PREFIX:
            return _invalid(problem)
        return ConfigError(f"{prefix}: {problem}")

    try:
        url = urlsplit(value)
        port = url.port
    except ValueError:
        raise invalid("the endpoint is not a valid URL") from None
    if url.scheme.lower() != "https":
        shown = f"{url.scheme}://" if url.scheme.isalpha() and len(url.scheme) < 10 else "no https://"
        raise invalid(f"the endpoint must be an https:// URL (it has {shown}); the SDK only speaks https")
    if not url.hostname:
        raise invalid("the endpoint has no host name")
    if url.username is not None or url.password is not None:
        raise invalid("the endpoint must not contain a user name or password")
    if url.path not in ("", "/") or url.query or url.fragment:
        raise invalid("the endpoint must be the resource URL alone, without a path or query")
    host = url.hostname if ":" not in url.hostname else f"[{url.hostname}]"
    return f"https://{host}" + (f":{port}" if port is not None else "")


def _check_key(value: str) -> SecretStr:
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid("the access key is not valid base64 (copy it again from the Azure portal)") from None
    if not decoded:
        raise _invalid("the access key is empty")
    return SecretStr(value)

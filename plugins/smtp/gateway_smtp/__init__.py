"""smtp transport plugin (being written)."""

from __future__ import annotations

from typing import Any

from gateway.hookspecs import hookimpl


@hookimpl
def register_transports(register: Any) -> None:
    """Nothing registered yet."""

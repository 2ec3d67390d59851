"""The hooks a plugin may implement. Hooks are sync and cheap: they hand over
classes, directories and static values at start-up; all I/O is `async def` on
the transport objects the core holds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("gateway")
hookimpl = pluggy.HookimplMarker("gateway")


@hookspec
def register_transports(register: Callable[[type[Any]], None]) -> None:
    """Hand each transport class (a `gateway.transport.Transport` subclass) to `register`."""


@hookspec
def template_dirs() -> list[Path] | None:
    """Return extra directories to search for templates, after the config's own."""


@hookspec
def template_context(use_case: str, role: str) -> dict[str, Any] | None:
    """Return extra template variables for one use case and role (`customer` or `bank_team`)."""

"""Plugin loading and the transport registry.

Transports arrive only through the `gateway` entry-point group (or `pm.register`
in tests): the core never imports a plugin by name. A transport class without a
name, or two with the same name, stop start-up.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pluggy
from pydantic import ValidationError

from gateway import hookspecs
from gateway.errors import ConfigError, StartupError
from gateway.transport import Transport

#: Core modules that implement hooks themselves (none yet: transports are entry points).
DEFAULT_PLUGINS: tuple[str, ...] = ()

#: keys of a `transports.<name>` block that the core reads rather than the transport
CORE_TRANSPORT_KEYS = ("rate_limits",)

pm = pluggy.PluginManager("gateway")
pm.add_hookspecs(hookspecs)

_loaded = False


def load_plugins() -> pluggy.PluginManager:
    """Load the default plugins and every `gateway` entry point, once."""
    global _loaded
    if not _loaded:
        try:
            for module_name in DEFAULT_PLUGINS:
                if pm.get_plugin(module_name) is None:
                    pm.register(__import__(module_name, fromlist=["_"]), module_name)
            pm.load_setuptools_entrypoints("gateway")
            pm.check_pending()
        except pluggy.PluginValidationError as err:
            raise StartupError(f"a plugin has a hook that no spec declares: {err}") from None
        except Exception as err:  # an installed plugin that cannot even be imported
            raise StartupError(f"a `gateway` plugin failed to load: {type(err).__name__}: {err}") from err
        _loaded = True
    return pm


@contextmanager
def registered(plugin: object, name: str | None = None) -> Iterator[object]:
    """Register an inline plugin for the duration of a block (tests, embedding)."""
    load_plugins()
    pm.register(plugin, name)
    try:
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as err:
            raise StartupError(f"plugin {name or plugin!r}: {err}") from None
        yield plugin
    finally:
        pm.unregister(plugin)


def transport_classes() -> dict[str, type[Transport]]:
    """Every registered transport class by name; refuses missing and duplicate names."""
    load_plugins()
    classes: dict[str, type[Transport]] = {}

    def register(cls: type[Any]) -> None:
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise StartupError(f"transport class {cls.__module__}.{cls.__qualname__} has no `name`")
        if name in classes and classes[name] is not cls:
            other = classes[name]
            raise StartupError(
                f"two transports are named {name!r}: {other.__module__}.{other.__qualname__} "
                f"and {cls.__module__}.{cls.__qualname__}; uninstall or rename one"
            )
        classes[name] = cls

    pm.hook.register_transports(register=register)
    return classes


def template_dirs() -> list[Path]:
    load_plugins()
    return [Path(d) for dirs in pm.hook.template_dirs() if dirs for d in dirs]


def template_context(use_case: str, role: str) -> dict[str, Any]:
    load_plugins()
    merged: dict[str, Any] = {}
    for extra in reversed(pm.hook.template_context(use_case=use_case, role=role)):
        if extra:
            merged.update(extra)
    return merged


def transport_settings(
    cls: type[Transport], block: dict[str, Any] | None, base_dir: Path | None = None
) -> Any:
    """Validate one `transports.<name>` block (environment first) with the class's model.

    A relative path the block gives to a `Path` field is relative to `base_dir` (the config
    file's directory), as templates and the SQLite file are; the environment's stay as given."""
    values = {k: v for k, v in (block or {}).items() if k not in CORE_TRANSPORT_KEYS}
    if base_dir is not None:
        for name, field in cls.settings_model.model_fields.items():
            value = values.get(name)
            if isinstance(value, str | Path) and str(value) and _holds_a_path(field.annotation):
                values[name] = base_dir / value
    # A model that names no prefix reads <NAME>_<FIELD> (never a bare HOST or PORT).
    prefix = cls.settings_model.model_config.get("env_prefix") or f"{cls.name.upper()}_"
    try:
        return cls.settings_model(_env_prefix=prefix, **values)
    except ValidationError as err:
        lines = [f"invalid settings for transport {cls.name!r}:"]
        for problem in err.errors():
            path = ".".join(str(p) for p in problem["loc"])
            message = problem["msg"].removeprefix("Value error, ")
            variable = f"{prefix}{path}".upper()
            where = f" (set by {variable})" if variable in {k.upper() for k in os.environ} else ""
            lines.append(f"  transports.{cls.name}.{path}{where}: {message}")
        raise ConfigError("\n".join(lines)) from None


def _holds_a_path(annotation: Any) -> bool:
    """`Path`, or a union or `Annotated` of it (pydantic's `FilePath | None`)."""
    if annotation is Path:
        return True
    if typing.get_origin(annotation) is typing.Annotated:
        return _holds_a_path(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_holds_a_path(member) for member in typing.get_args(annotation))
    return False


def build_transports(
    chain: list[str], blocks: dict[str, dict[str, Any]], base_dir: Path | None = None
) -> dict[str, Transport]:
    """Instantiate the transports of the failover chain; validate every configured block."""
    classes = transport_classes()
    known = ", ".join(sorted(classes)) or "none installed"
    for name in list(chain) + list(blocks):
        if name not in classes:
            raise ConfigError(f"unknown transport {name!r}; installed transports: {known}")
    if len(set(chain)) != len(chain):
        raise ConfigError(f"EMAIL_TRANSPORT names a transport twice: {','.join(chain)}")
    for name, block in blocks.items():
        if name not in chain:
            transport_settings(classes[name], block, base_dir)  # validated even when not in use
    return {
        name: classes[name](transport_settings(classes[name], blocks.get(name), base_dir)) for name in chain
    }

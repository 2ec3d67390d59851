"""Plugins: transports arrive through hooks, names are checked, core imports no plugin."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest

from gateway.app import Gateway
from gateway.config import Settings
from gateway.errors import ConfigError, StartupError
from gateway.hookspecs import hookimpl
from gateway.plugins import registered, template_dirs, transport_classes
from gateway.transport import OutgoingMessage, Receipt, Transport
from tests.support import SAMPLE_CALL

ROOT = Path(__file__).resolve().parent.parent


class MemoryTransport(Transport):
    """A transport defined by a test plugin: keeps what it is given."""

    name = "memory"
    sent: ClassVar[list[OutgoingMessage]] = []

    async def send(self, message: OutgoingMessage) -> Receipt:
        MemoryTransport.sent.append(message)
        return Receipt(status="delivered", provider_id=f"mem-{len(MemoryTransport.sent)}")


class MemoryPlugin:
    @hookimpl
    def register_transports(self, register: Callable[[type[Any]], None]) -> None:
        register(MemoryTransport)


def test_entry_point_transports_are_registered() -> None:
    assert {"file", "smtp", "acs"} <= set(transport_classes())


@pytest.mark.anyio
async def test_inline_plugin_registers_a_transport_that_receives_the_sends(
    settings_factory: Callable[..., Settings],
) -> None:
    MemoryTransport.sent.clear()
    with registered(MemoryPlugin(), "memory-plugin"):
        gateway = Gateway(settings_factory(env={"EMAIL_TRANSPORT": "memory"}))
        async with gateway.running(background=False):
            result = await gateway.service.sendemail(**SAMPLE_CALL)
    assert "memory" not in transport_classes()  # unregistered after the block
    assert result.status == "sent"
    assert [d.transport for d in result.deliveries] == ["memory", "memory"]
    assert [d.status for d in result.deliveries] == ["delivered", "delivered"]
    assert sorted(m.recipients[0] for m in MemoryTransport.sent) == [
        "customer@example.com",
        "support@bankx.com",
    ]


def test_two_transports_with_one_name_stop_startup() -> None:
    class Impostor(MemoryTransport):
        pass

    class ImpostorPlugin:
        @hookimpl
        def register_transports(self, register: Callable[[type[Any]], None]) -> None:
            register(Impostor)

    with (
        registered(MemoryPlugin(), "a"),
        registered(ImpostorPlugin(), "b"),
        pytest.raises(StartupError, match="two transports are named 'memory'"),
    ):
        transport_classes()


def test_transport_without_a_name_stops_startup() -> None:
    class Nameless(Transport):
        pass

    class NamelessPlugin:
        @hookimpl
        def register_transports(self, register: Callable[[type[Any]], None]) -> None:
            register(Nameless)

    with registered(NamelessPlugin(), "nameless"), pytest.raises(StartupError, match="has no `name`"):
        transport_classes()


def test_misspelt_hook_fails_loudly() -> None:
    class Misspelt:
        @hookimpl
        def register_transport(self, register: Any) -> None:  # missing the final "s"
            raise AssertionError("never called")

    with pytest.raises(StartupError, match="register_transport"), registered(Misspelt(), "misspelt"):
        pass


def test_unknown_transport_in_the_chain_lists_the_installed_ones(
    settings_factory: Callable[..., Settings],
) -> None:
    with pytest.raises(
        ConfigError, match=r"unknown transport 'carrier-pigeon'; installed transports: .*file"
    ):
        Gateway(settings_factory(env={"EMAIL_TRANSPORT": "file,carrier-pigeon"}))


def test_unknown_key_in_a_transport_block_names_its_path(settings_factory: Callable[..., Settings]) -> None:
    with pytest.raises(ConfigError, match=r"transports\.file\.directory"):
        Gateway(settings_factory({"transports": {"file": {"directory": "x"}}}))


def test_template_extension_adds_a_directory_and_context(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    extra = tmp_path / "extension-templates"
    (extra / "uc9").mkdir(parents=True)
    (extra / "uc9" / "subject.txt.j2").write_text("{{ campaign }}: {{ ticket_id }}\n")

    class TemplatePlugin:
        @hookimpl
        def template_dirs(self) -> list[Path]:
            return [extra]

        @hookimpl
        def template_context(self, use_case: str, role: str) -> dict[str, Any]:
            return {"campaign": f"Cards ({use_case}/{role})"}

    settings = settings_factory(
        {
            "use_cases": {
                "UC9": {
                    "title": "Cards",
                    "customer": {
                        "wording": {
                            "subject_prefix": "x",
                            "service_name": "x",
                            "query_heading": "x",
                            "promise": "x",
                            "signature": "x",
                        },
                        "templates": {
                            "subject": "uc9/subject.txt.j2",
                            "text": "templates/customer/body.txt.j2",
                            "html": "templates/customer/body.mjml",
                        },
                    },
                }
            }
        }
    )
    with registered(TemplatePlugin(), "templates-plugin"):
        assert extra in template_dirs()
        gateway = Gateway(settings)
        email = gateway.renderer.render(
            "UC9", "customer", {**SAMPLE_CALL}, __import__("datetime").datetime.now(settings.zone)
        )
    assert email.subject == "Cards (UC9/customer): TKT-2025-001234"


def test_core_never_imports_a_plugin_by_name() -> None:
    pattern = re.compile(r"^\s*(from|import)\s+gateway_\w+", re.M)
    offenders = [
        str(p.relative_to(ROOT)) for p in (ROOT / "gateway").rglob("*.py") if pattern.search(p.read_text())
    ]
    assert offenders == []

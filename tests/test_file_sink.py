"""The file sink against the shared transport contract, plus what only it promises."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from gateway_file_sink import FileSinkSettings, FileSinkTransport

from gateway.errors import PermanentDeliveryError
from gateway.plugins import transport_classes
from gateway.transport import OutgoingMessage, Transport
from tests.support import parts, read_eml
from tests.transport_contract import Captured, TransportContract, make_message, ticket_of


class TestFileSinkContract(TransportContract):
    copies_after_sending_twice = 1  # one file per delivery id: the second write replaces the first

    @pytest.fixture
    async def transport(self, tmp_path: Path) -> AsyncIterator[Transport]:
        self.directory = tmp_path / "outbox"
        cls = transport_classes()["file"]  # through the entry point, as the gateway finds it
        transport = cls(FileSinkSettings(dir=self.directory))
        await transport.start()
        yield transport
        await transport.aclose()

    async def read_back(self, message: OutgoingMessage) -> list[Captured]:
        if not self.directory.is_dir():
            return []
        found = []
        for path in sorted(self.directory.glob("*.eml")):
            msg = read_eml(path)
            if msg["X-Ticket-ID"] != ticket_of(message):
                continue
            text, html = parts(msg)
            found.append(
                Captured(
                    sender=str(msg["From"]),
                    recipients=[str(msg["To"])],
                    subject=str(msg["Subject"]),
                    text=text,
                    html=html,
                    headers={k: str(v) for k, v in msg.items()},
                )
            )
        return found

    async def break_far_side(self) -> None:
        """A file where the outbox was: unusable whoever runs the tests (root ignores permissions)."""
        shutil.rmtree(self.directory)
        self.directory.write_text("not a directory\n")


@pytest.fixture
async def sink(tmp_path: Path) -> AsyncIterator[Transport]:
    transport = FileSinkTransport(FileSinkSettings(dir=tmp_path / "outbox"))
    await transport.start()
    yield transport


@pytest.mark.anyio
async def test_file_sink_leaves_no_temporary_files_behind(sink: Transport, tmp_path: Path) -> None:
    for _ in range(5):
        await sink.send(make_message())
    names = [p.name for p in (tmp_path / "outbox").iterdir()]
    assert len(names) == 5
    assert all(n.endswith(".eml") and not n.startswith(".") for n in names)


@pytest.mark.anyio
async def test_file_sink_message_is_multipart_alternative_utf8(sink: Transport, tmp_path: Path) -> None:
    await sink.send(make_message(text="ไทย\n"))
    [path] = (tmp_path / "outbox").glob("*.eml")
    msg = read_eml(path)
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    assert all(p.get_content_charset() == "utf-8" for p in msg.iter_parts())
    assert b"\r\n" in path.read_bytes()  # RFC 5322 line endings


@pytest.mark.anyio
async def test_file_sink_reads_its_directory_from_FILE_SINK_DIR(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FILE_SINK_DIR", str(tmp_path / "from-env"))
    assert transport_classes()["file"].settings_model is FileSinkSettings
    settings = FileSinkSettings(dir=tmp_path / "from-config")
    assert Path(settings.dir) == tmp_path / "from-env"


@pytest.mark.anyio
async def test_file_sink_directory_that_is_a_file_is_a_transport_level_failure(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    transport = FileSinkTransport(FileSinkSettings(dir=blocker))
    with pytest.raises(PermanentDeliveryError) as caught:
        await transport.send(make_message())
    assert caught.value.transport_level
    with pytest.raises(PermanentDeliveryError):
        await transport.check()

"""File sink transport: each message becomes one RFC 5322 `.eml` file, for development and tests.

Files are written atomically (a temporary file in the same directory, then a
rename), so a reader never sees half a message. Open them with any mail client.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic_settings import SettingsConfigDict

from gateway.errors import PermanentDeliveryError, TransientDeliveryError
from gateway.hookspecs import hookimpl
from gateway.transport import OutgoingMessage, Receipt, Transport, TransportSettings


class FileSinkSettings(TransportSettings):
    """`transports.file.dir` in config.yaml, or FILE_SINK_DIR."""

    model_config = SettingsConfigDict(env_prefix="FILE_SINK_")

    dir: Path = Path("var/outbox")


class FileSinkTransport(Transport):
    name = "file"
    settings_model = FileSinkSettings

    def __init__(self, settings: FileSinkSettings) -> None:
        super().__init__(settings)
        self.directory = settings.dir

    async def start(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PermanentDeliveryError(
                f"cannot create {self.directory}: {err.strerror}", transport_level=True
            ) from err

    async def send(self, message: OutgoingMessage) -> Receipt:
        data = message.as_bytes()
        target = self.directory / f"{message.delivery_id}.eml"
        try:
            await asyncio.to_thread(_write_atomically, target, data)
        except (PermissionError, NotADirectoryError, FileExistsError) as err:
            # A misconfigured directory: no retry helps, another transport might.
            raise PermanentDeliveryError(
                f"cannot write to {self.directory}: {err.strerror}", transport_level=True
            ) from err
        except OSError as err:
            raise TransientDeliveryError(f"writing {target.name} failed: {err.strerror}") from err
        return Receipt(status="sent", provider_id=target.name)

    async def check(self) -> None:
        if not self.directory.is_dir() or not os.access(self.directory, os.W_OK):
            raise PermanentDeliveryError(
                f"{self.directory} is not a writable directory", transport_level=True
            )


def _write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@hookimpl
def register_transports(register: Any) -> None:
    register(FileSinkTransport)

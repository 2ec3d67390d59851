"""`escalation-comms`: serve, send, status, check, preview, deliveries."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import sys
from collections.abc import Callable, Coroutine
from functools import wraps
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from sqlalchemy.exc import SQLAlchemyError

from gateway import logs
from gateway.config import Settings, load_settings
from gateway.errors import ConfigError, GatewayError, InputError

T = TypeVar("T")

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Config file (default: $ESCALATION_CONFIG or ./config.yaml).",
)


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _settings(config_path: Path | None, **overrides: Any) -> Settings:
    try:
        settings = load_settings(config_path, overrides={k: v for k, v in overrides.items() if v is not None})
    except ConfigError as err:
        _fail(str(err))
    logs.configure(settings.logging.level, settings.json_logs)
    return settings


def _gateway(settings: Settings) -> Any:
    from gateway.app import Gateway

    try:
        return Gateway(settings)
    except ConfigError as err:
        _fail(str(err))


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's work; expected failures become one line on stderr, not a traceback."""
    try:
        return asyncio.run(coro)
    except InputError as err:
        _fail(str(err), 2)
    except GatewayError as err:
        _fail(str(err))
    except (OSError, SQLAlchemyError) as err:
        # The store (or a transport) cannot be reached; the first line says which and why.
        first_line = (str(err).splitlines() or [repr(err)])[0]
        _fail(f"{type(err).__name__}: {first_line}")
    raise AssertionError("unreachable")


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def handles_errors(fn: Callable[..., None]) -> Callable[..., None]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except ConfigError as err:
            _fail(str(err))

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="escalation-comms")
def main() -> None:
    """EscalationComms: support-ticket escalation emails over MCP."""


@main.command()
@config_option
@click.option("--host", default=None, help="Bind address (default 127.0.0.1, or $HOST).")
@click.option("--port", type=int, default=None, help="Port (default 8078, or $PORT).")
@click.option("--stdio", is_flag=True, help="Serve MCP over stdin/stdout instead of HTTP.")
@click.option(
    "--insecure-no-auth",
    is_flag=True,
    help="Allow a non-loopback bind without MCP_AUTH_TOKEN (anyone who reaches it can send mail).",
)
@handles_errors
def serve(
    config_path: Path | None, host: str | None, port: int | None, stdio: bool, insecure_no_auth: bool
) -> None:
    """Run the MCP server (streamable HTTP at /mcp, or stdio)."""
    settings = _settings(config_path, **{"server.host": host, "server.port": port})
    gateway = _gateway(settings)
    from gateway.mcp_server import build_http_app, build_server, is_loopback

    if stdio:
        _freeze_start_up_objects()
        asyncio.run(build_server(gateway).run_stdio_async())
        return
    has_token = bool(settings.server.auth_tokens) or settings.server.auth_token_file is not None
    if not is_loopback(settings.server.host) and not has_token and not insecure_no_auth:
        _fail(
            f"refusing to serve on {settings.server.host} without authentication: anyone who can reach "
            "this port could send email as the bank. Set MCP_AUTH_TOKEN (or server.auth_token_file), "
            "or pass --insecure-no-auth if a proxy in front of it authenticates callers."
        )
    import uvicorn

    app = build_http_app(gateway)
    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_config=None,
        timeout_graceful_shutdown=max(1, int(settings.server.shutdown_grace_seconds)),
        server_header=False,
        lifespan="on",
    )
    logging.getLogger("gateway.cli").info(  # a log line, so prod's stderr stays one JSON object per line
        "EscalationComms serving MCP at http://%s:%s/mcp (transports: %s)",
        settings.server.host,
        settings.server.port,
        ",".join(settings.transport_chain),
    )
    server = uvicorn.Server(config)
    _freeze_start_up_objects()
    server.run()
    if not server.started:
        _fail("the server did not start; the log above says why")


def _freeze_start_up_objects() -> None:
    """Take what start-up made (modules, settings, compiled templates, the app) out of the
    garbage collector's view: it never becomes garbage, yet every full collection walked it,
    stopping the server for about 80 ms once or twice a second at 16 clients (bench/)."""
    gc.collect()
    gc.freeze()


@main.command()
@config_option
@click.option("--use-case", required=True, help="Configured use case, e.g. UC2.")
@click.option("--ticket-id", required=True)
@click.option("--customer-id", required=True)
@click.option("--customer-email", required=True)
@click.option("--query", required=True)
@click.option("--reason", required=True)
@handles_errors
def send(
    config_path: Path | None,
    use_case: str,
    ticket_id: str,
    customer_id: str,
    customer_email: str,
    query: str,
    reason: str,
) -> None:
    """Escalate one ticket, as the sendemail tool would; prints the tool's JSON."""
    gateway = _gateway(_settings(config_path))

    async def go() -> dict[str, Any]:
        async with gateway.running(background=False):
            result = await gateway.service.sendemail(
                ticket_id=ticket_id,
                customer_id=customer_id,
                customer_email=customer_email,
                query=query,
                use_case=use_case,
                reason=reason,
            )
            return result.model_dump(mode="json")

    _print_json(_run(go()))


@main.command()
@config_option
@click.argument("email_id")
@handles_errors
def status(config_path: Path | None, email_id: str) -> None:
    """Print an escalation's current state, as get_email_status would."""
    gateway = _gateway(_settings(config_path))

    async def go() -> dict[str, Any]:
        async with gateway.running(background=False):
            return (await gateway.service.status(email_id)).model_dump(mode="json")

    _print_json(_run(go()))


@main.command()
@config_option
@handles_errors
def check(config_path: Path | None) -> None:
    """Validate config, compile and render every template, check each transport's settings."""
    settings = _settings(config_path)
    gateway = _gateway(settings)
    click.echo(
        f"config OK: use cases {', '.join(settings.use_cases)}; "
        f"transports {' -> '.join(settings.transport_chain)}; "
        f"templates render in {gateway.renderer.slowest_render_seconds * 1000:.1f} ms at most"
    )


@main.command()
@config_option
@click.option("--use-case", "use_cases", multiple=True, help="Only these use cases (repeatable).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("var/preview"),
    show_default=True,
    help="Where to write the gallery.",
)
@handles_errors
def preview(config_path: Path | None, use_cases: tuple[str, ...], out_dir: Path) -> None:
    """Render every email with sample data into a browsable gallery (index.html)."""
    from gateway.preview import write_gallery

    settings = _settings(config_path)
    gateway = _gateway(settings)
    unknown = [u for u in use_cases if u.upper() not in settings.use_cases]
    if unknown:
        _fail(f"unknown use case {', '.join(unknown)}; configured: {', '.join(settings.use_cases)}")
    index = write_gallery(gateway.renderer, out_dir, [u.upper() for u in use_cases] or None)
    click.echo(str(index))


@main.group()
def deliveries() -> None:
    """List failed (or queued) deliveries, put failed ones back in the queue, scrub old ones."""


@deliveries.command("list")
@config_option
@click.option(
    "--status",
    "wanted",
    type=click.Choice(["failed", "queued", "sent", "delivered"]),
    default="failed",
    show_default=True,
)
@click.option("--limit", type=int, default=100, show_default=True)
@handles_errors
def list_deliveries(config_path: Path | None, wanted: str, limit: int) -> None:
    """Print deliveries with one status as JSON lines."""
    gateway = _gateway(_settings(config_path))

    async def go() -> list[dict[str, Any]]:
        async with gateway.running(background=False):
            found = await gateway.store.list_deliveries(wanted, limit)
        return [
            {
                "delivery_id": d.id,
                "email_id": d.email_id,
                "role": d.role,
                "address": d.address,
                "status": d.status,
                "transport": d.transport,
                "attempts": d.attempts,
                "error": d.last_error,
            }
            for d in found
        ]

    for row in _run(go()):
        click.echo(json.dumps(row, ensure_ascii=False))


@deliveries.command("scrub")
@config_option
@click.option(
    "--older-than-days",
    type=click.IntRange(min=1),
    default=None,
    help="Finished deliveries older than this (default: store.retention_days).",
)
@handles_errors
def scrub(config_path: Path | None, older_than_days: int | None) -> None:
    """Empty the bodies and mask the customer's address of old finished deliveries (retention).

    The tickets stay recorded, so a repeated sendemail call is still a replay, never a second email.
    """
    settings = _settings(config_path)
    days = older_than_days or settings.store.retention_days
    if days is None:
        _fail("pass --older-than-days N or set store.retention_days in the config file")
    if days * 24 <= settings.email.retry_horizon_hours:
        horizon = settings.email.retry_horizon_hours
        _fail(f"--older-than-days must be longer than email.retry_horizon_hours ({horizon:g} h)")
    gateway = _gateway(settings)

    async def go() -> int:
        async with gateway.running(background=False):
            scrubbed, _ = await gateway.dispatcher.scrub(days)
            return scrubbed

    click.echo(f"scrubbed {_run(go())} finished deliveries older than {days} days")


@deliveries.command("requeue")
@config_option
@click.argument("delivery_ids", nargs=-1)
@click.option("--all", "requeue_all", is_flag=True, help="Requeue every failed delivery.")
@handles_errors
def requeue(config_path: Path | None, delivery_ids: tuple[str, ...], requeue_all: bool) -> None:
    """Put failed deliveries back in the queue; a running server sends them."""
    if not delivery_ids and not requeue_all:
        _fail("name delivery ids (from `deliveries list`) or pass --all")
    gateway = _gateway(_settings(config_path))

    async def go() -> int:
        from datetime import timedelta

        from gateway.dispatcher import now_utc

        async with gateway.running(background=False):
            horizon = timedelta(hours=gateway.settings.email.retry_horizon_hours)
            return await gateway.store.requeue(
                None if requeue_all else list(delivery_ids), now_utc(), horizon
            )

    click.echo(f"requeued {_run(go())} deliveries")

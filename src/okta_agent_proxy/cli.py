"""The `okta-agent-proxy` command: serve, check, config-schema, demo, audit, doctor, keys."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import click

from okta_agent_proxy import __version__
from okta_agent_proxy.audit_command import audit_command
from okta_agent_proxy.config import config_schema
from okta_agent_proxy.config_loader import ConfigError, ConfigSources, LoadedConfig, load
from okta_agent_proxy.doctor import doctor_command
from okta_agent_proxy.keys_command import keys_group
from okta_agent_proxy.observability.log_stream import write_all_waiting
from okta_agent_proxy.observability.logging import configure, get_logger
from okta_agent_proxy.settings import is_loopback_host

EXIT_CONFIG = 2
log = get_logger(__name__)


def _load_or_exit(config: str | None, env_file: str | None) -> LoadedConfig:
    try:
        loaded = load(config, env_file=env_file)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        raise SystemExit(EXIT_CONFIG) from None
    for warning in loaded.warnings:
        click.echo(str(warning), err=True)
    return loaded


def run_loop(coro: Any) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        import asyncio

        asyncio.run(coro)
    else:
        uvloop.run(coro)


def _serve_one(
    config: str | None, env_file: str | None, host: str, port: int, reuse_port: bool, migrate_store: bool
) -> None:
    from okta_agent_proxy.app import run_until_stopped

    loaded = _load_or_exit(config, env_file)
    configure(loaded.settings.LOG_LEVEL, loaded.settings.LOG_FORMAT)
    try:
        run_loop(run_until_stopped(loaded, host, port, reuse_port=reuse_port, migrate_store=migrate_store))
    finally:
        write_all_waiting()  # a --workers process ends without atexit handlers


def _serve_workers(
    config: str | None, env_file: str | None, host: str, port: int, workers: int, migrate_store: bool
) -> None:
    """N processes accept on one port (SO_REUSEPORT); the kernel spreads connections between them. Migrations run
    once, here, before they start; metrics are aggregated across them through a shared directory."""
    from okta_agent_proxy.store.db import migrate

    if migrate_store:
        loaded = _load_or_exit(config, env_file)
        run_loop(migrate(loaded.settings.DATABASE_URL))
    metrics_dir = tempfile.mkdtemp(prefix="okta-agent-proxy-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # inherited by the spawned workers
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_serve_one, args=(config, env_file, host, port, True, False), name=f"worker-{i}")
        for i in range(workers)
    ]
    for process in processes:
        process.start()

    def stop(signum: int, _: Any) -> None:
        for process in processes:
            if process.is_alive():
                process.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    exit_codes = []
    for process in processes:
        process.join()
        exit_codes.append(process.exitcode or 0)
    shutil.rmtree(metrics_dir, ignore_errors=True)
    raise SystemExit(max(exit_codes))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="okta-agent-proxy")
def cli() -> None:
    """Okta Agent Proxy: a gateway between AI agents and an enterprise's MCP servers."""


_config_option = click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML path (default: $CONFIG_PATH).",
)
_env_file_option = click.option("--env-file", default=".env", show_default=True, help="The .env file to read.")


@cli.command()
@_config_option
@_env_file_option
@click.option("--host", default=None, help="Bind address (default: $GATEWAY_HOST).")
@click.option("--port", type=int, default=None, help="Port (default: $GATEWAY_PORT).")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True, help="Processes on one port.")
@click.option(
    "--migrate/--no-migrate",
    default=True,
    show_default=True,
    help="Upgrade the database schema at start (serialised across replicas).",
)
def serve(config: str | None, env_file: str, host: str | None, port: int | None, workers: int, migrate: bool) -> None:
    """Run the gateway."""
    loaded = _load_or_exit(config, env_file)
    host = host or loaded.settings.GATEWAY_HOST
    port = loaded.settings.GATEWAY_PORT if port is None else port
    if not loaded.settings.OKTA_ISSUER and not is_loopback_host(host):
        # Without an issuer no caller is authenticated, and every caller would reach the backends with the
        # gateway's credentials. Refuse to expose that beyond this machine.
        click.echo(
            f"error: refusing to listen on {host} without OKTA_ISSUER: unauthenticated mode serves loopback only",
            err=True,
        )
        raise SystemExit(EXIT_CONFIG)
    if workers == 1:
        _serve_one(config, env_file, host, port, False, migrate)
    else:
        _serve_workers(config, env_file, host, port, workers, migrate)


@cli.command()
@_config_option
@_env_file_option
def check(config: str | None, env_file: str) -> None:
    """Validate .env, the environment and the YAML; print the files read and every problem; exit 2 on errors."""
    try:
        loaded = load(config, env_file=env_file)
    except ConfigError as exc:
        _echo_files_read(exc.sources, env_file)
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        raise SystemExit(EXIT_CONFIG) from None
    _echo_files_read(loaded.sources, env_file)
    for warning in loaded.warnings:
        click.echo(str(warning), err=True)
    cfg = loaded.config
    click.echo(f"ok: {len(cfg.backends)} backend(s), {len(cfg.agents)} agent(s), {len(loaded.warnings)} warning(s)")


def _echo_files_read(sources: ConfigSources | None, env_file: str) -> None:
    """`read: <kind>: <path>` for each file the load read (never a content), so a wrong CONFIG_PATH shows."""
    sources = sources or ConfigSources()
    click.echo(f"read: env file: {sources.env_file or f'none ({env_file} does not exist)'}")
    if sources.yaml is not None:
        click.echo(f"read: config: {sources.yaml}")
    for secret_file in sources.secret_files:
        click.echo(f"read: secret file: {secret_file}")


@cli.command("config-schema")
@click.option("--markdown", is_flag=True, help="The reference tables of env variables and YAML keys instead.")
def config_schema_command(markdown: bool) -> None:
    """Print the JSON Schema of config.yaml."""
    if markdown:
        from okta_agent_proxy.config_reference import reference_markdown

        click.echo(reference_markdown(), nl=False)
    else:
        click.echo(json.dumps(config_schema(), indent=2))


@cli.group(invoke_without_command=True)
@click.option("--port", type=int, default=8000, show_default=True, help="Gateway port.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Where to write.")
@click.pass_context
def demo(ctx: click.Context, port: int, workdir: Path | None) -> None:
    """Run the Okta emulator, sample MCP backends and the gateway on loopback, and print commands to try."""
    if ctx.invoked_subcommand is not None:
        return
    from okta_agent_proxy.devkit.demo import run_demo

    configure("INFO", "console")
    run_loop(run_demo(port=port, workdir=workdir))


@demo.command("idp")
@click.option("--port", type=int, default=0, show_default=True, help="Emulator port (0: any free port).")
@click.option("--audience", default="http://localhost:8000", show_default=True, help="The gateway's audience.")
def demo_idp(port: int, audience: str) -> None:
    """Run only the Okta emulator, and print its issuer, JWKS URI and a user token."""
    from okta_agent_proxy.devkit.okta_emulator import run_emulator

    configure("INFO", "console")
    run_loop(run_emulator(port, audience=audience))


cli.add_command(audit_command)
cli.add_command(doctor_command)
cli.add_command(keys_group)


def main() -> None:
    cli(prog_name="okta-agent-proxy")


if __name__ == "__main__":  # pragma: no cover
    main()

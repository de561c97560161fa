"""`serve`: run the gateway, in one process or as `--workers N` processes sharing one port."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import click

from okta_agent_proxy.commands.options import EXIT_CONFIG, config_option, env_file_option, load_or_exit, run_loop
from okta_agent_proxy.config.loader import LoadedConfig
from okta_agent_proxy.config.settings import is_loopback_host
from okta_agent_proxy.http.drain import stop_budget
from okta_agent_proxy.observability.log_stream import write_all_waiting
from okta_agent_proxy.observability.logging import configure

JOIN_POLL_SECONDS = 0.5  # how often the parent looks at the time while it waits for its workers


def _serve_one(
    config: str | None,
    env_file: str | None,
    host: str,
    port: int,
    reuse_port: bool,
    migrate_store: bool,
    loaded: LoadedConfig | None = None,
) -> None:
    """One serving process: with the config `serve` loaded, or (a spawned worker) loading it for itself."""
    from okta_agent_proxy.app import run_until_stopped

    if loaded is None:
        loaded = load_or_exit(config, env_file)
    configure(loaded.settings.LOG_LEVEL, loaded.settings.LOG_FORMAT)
    try:
        run_loop(run_until_stopped(loaded, host, port, reuse_port=reuse_port, migrate_store=migrate_store))
    finally:
        write_all_waiting()  # a --workers process ends without atexit handlers


def _serve_workers(
    loaded: LoadedConfig,
    config: str | None,
    env_file: str | None,
    host: str,
    port: int,
    workers: int,
    migrate_store: bool,
) -> None:
    """N processes accept on one port (SO_REUSEPORT); the kernel spreads connections between them. From the config
    `serve` loaded (each worker loads it again for itself): migrations run once, here, before they start; metrics
    are summed across them through `DATA_DIR/metrics`, emptied first (a crashed run's samples must not count again);
    and the session key is made here, so all of them share it. SIGTERM and SIGINT are passed on to every worker as
    SIGTERM, and each drains by itself (`http/drain.py`); one still running after `stop_budget` is killed."""
    from okta_agent_proxy.mcp.sessions import session_keys
    from okta_agent_proxy.store.db import migrate

    if migrate_store:
        run_loop(migrate(loaded.settings.DATABASE_URL))
    session_keys(loaded.settings)  # generated now, if it is to be generated, before any worker needs it
    metrics_dir = Path(loaded.settings.DATA_DIR) / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # inherited by the spawned workers
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_serve_one, args=(config, env_file, host, port, True, False), name=f"worker-{i}")
        for i in range(workers)
    ]
    for process in processes:
        process.start()

    deadline: float | None = None  # once signalled: when a worker still running is killed

    def stop(signum: int, _: Any) -> None:
        nonlocal deadline
        if deadline is None:
            settings = loaded.settings
            deadline = time.monotonic() + stop_budget(settings.SHUTDOWN_DRAIN_SECONDS, settings.SHUTDOWN_GRACE_SECONDS)
        for process in processes:
            if process.is_alive():
                process.terminate()  # SIGTERM: each worker drains (Ctrl-C's SIGINT reaches them from the terminal)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    exit_codes = []
    for process in processes:
        while process.is_alive() and (deadline is None or time.monotonic() < deadline):
            process.join(JOIN_POLL_SECONDS)
        killed = process.is_alive()
        if killed:
            click.echo(f"error: {process.name} did not stop within its shutdown budget: killed", err=True)
            process.kill()
            process.join()
        exit_codes.append(1 if killed else process.exitcode or 0)
    shutil.rmtree(metrics_dir, ignore_errors=True)
    raise SystemExit(max(exit_codes))


@click.command()
@config_option
@env_file_option
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
    loaded = load_or_exit(config, env_file)
    host = host or loaded.settings.GATEWAY_HOST
    port = loaded.settings.GATEWAY_PORT if port is None else port
    if not loaded.settings.authenticates and not is_loopback_host(host):
        # Without an issuer or the front door no caller is authenticated, and every caller would reach the backends
        # with the gateway's credentials. Refuse to expose that beyond this machine.
        click.echo(
            f"error: refusing to listen on {host} without OKTA_ISSUER or FRONT_DOOR=on: unauthenticated mode serves "
            "loopback only",
            err=True,
        )
        raise SystemExit(EXIT_CONFIG)
    if loaded.settings.replicated and loaded.settings.SESSION_SECRET is None:
        # Replicas sharing Redis or PostgreSQL would each seal session ids with a key of their own (DESIGN.md §4).
        click.echo(
            "error: SESSION_SECRET is not set, while REDIS_URL or a PostgreSQL DATABASE_URL suggests several "
            "replicas: set the same SESSION_SECRET (at least 32 bytes) on every replica",
            err=True,
        )
        raise SystemExit(EXIT_CONFIG)
    if workers == 1:
        _serve_one(config, env_file, host, port, False, migrate, loaded)
    else:
        _serve_workers(loaded, config, env_file, host, port, workers, migrate)

"""What several commands share: the `--config`/`--env-file` options, loading the config or exiting 2, the loop."""

from __future__ import annotations

from typing import Any

import click

from okta_agent_proxy.config.loader import ConfigError, LoadedConfig, load

EXIT_CONFIG = 2

config_option = click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML path (default: $CONFIG_PATH).",
)
env_file_option = click.option("--env-file", default=".env", show_default=True, help="The .env file to read.")


def load_or_exit(config: str | None, env_file: str | None) -> LoadedConfig:
    """The loaded config, its warnings printed; every problem printed and exit 2 when it does not load."""
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

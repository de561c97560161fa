"""`check`: validate .env, the environment and the YAML; print the files read and every problem; exit 2 on errors.

The problems are the loader's, so `check` refuses exactly what `serve` refuses: with FRONT_DOOR on, that includes
each setting the front door cannot run with (`Settings.front_door_refusals`), as `error: env <NAME>: …`.
"""

from __future__ import annotations

import click

from okta_agent_proxy.commands.options import EXIT_CONFIG, config_option, env_file_option
from okta_agent_proxy.config.loader import ConfigError, ConfigSources, load


@click.command()
@config_option
@env_file_option
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
    front_door = "on" if loaded.settings.front_door else "off"
    click.echo(
        f"ok: {len(cfg.backends)} backend(s), {len(cfg.agents)} agent(s), front door {front_door}, "
        f"{len(loaded.warnings)} warning(s)"
    )


def _echo_files_read(sources: ConfigSources | None, env_file: str) -> None:
    """`read: <kind>: <path>` for each file the load read (never a content), so a wrong CONFIG_PATH shows."""
    sources = sources or ConfigSources()
    click.echo(f"read: env file: {sources.env_file or f'none ({env_file} does not exist)'}")
    if sources.yaml is not None:
        click.echo(f"read: config: {sources.yaml}")
    for secret_file in sources.secret_files:
        click.echo(f"read: secret file: {secret_file}")

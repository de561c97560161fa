"""`config-schema`: the JSON Schema of config.yaml, or (`--markdown`) the README's reference tables."""

from __future__ import annotations

import json

import click

from okta_agent_proxy.config.models import config_schema


@click.command("config-schema")
@click.option("--markdown", is_flag=True, help="The reference tables of env variables and YAML keys instead.")
def config_schema_command(markdown: bool) -> None:
    """Print the JSON Schema of config.yaml."""
    if markdown:
        from okta_agent_proxy.config.reference import reference_markdown

        click.echo(reference_markdown(), nl=False)
    else:
        click.echo(json.dumps(config_schema(), indent=2))

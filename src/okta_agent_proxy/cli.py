"""The `okta-agent-proxy` command: serve, check, config-schema, demo, audit, doctor, keys (one module each in
`commands/`)."""

from __future__ import annotations

import click

from okta_agent_proxy import __version__
from okta_agent_proxy.commands.audit import audit_command
from okta_agent_proxy.commands.check import check
from okta_agent_proxy.commands.config_schema import config_schema_command
from okta_agent_proxy.commands.demo import demo
from okta_agent_proxy.commands.doctor import doctor_command
from okta_agent_proxy.commands.keys import keys_group
from okta_agent_proxy.commands.serve import serve


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="okta-agent-proxy")
def cli() -> None:
    """Okta Agent Proxy: a gateway between AI agents and an enterprise's MCP servers."""


for command in (serve, check, config_schema_command, demo, audit_command, doctor_command, keys_group):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="okta-agent-proxy")


if __name__ == "__main__":  # pragma: no cover
    main()

"""`demo`: the Okta emulator, sample MCP backends and the gateway on loopback; `demo idp`: the emulator alone."""

from __future__ import annotations

from pathlib import Path

import click

from okta_agent_proxy.commands.options import run_loop
from okta_agent_proxy.observability.logging import configure


@click.group(invoke_without_command=True)
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
    from okta_agent_proxy.devkit.demo_idp import run_emulator

    configure("INFO", "console")
    run_loop(run_emulator(port, audience=audience))

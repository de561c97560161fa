"""`okta-agent-proxy keys generate --agent NAME`: a new RSA 2048 signing key for one agent.

Prints what goes under `agents.NAME` in config.yaml — the private key as PEM (PKCS#8), or, with `--out FILE`, a
`{file: …}` reference to FILE, written with mode 0600 — and the public JWK to register on the AI agent in Okta.
For an agent the YAML already has, the lines replace its `private_key` (and `key_id`): pasting a second `NAME:`
under `agents:` is a duplicate-key error.
The JWK's `kid` is the RFC 7638 thumbprint (what the gateway uses for a PEM key without `key_id`) unless `--kid`
names another, in which case the YAML gets `key_id` too, so both sides name the key the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from okta_agent_proxy.keys import generate_rsa_key, load_signing_key, private_pem

PUBLIC_JWK_HEADER = "# Public JWK"


@click.group("keys")
def keys_group() -> None:
    """Make agent signing keys."""


def _write_private(path: Path, pem: str) -> None:
    """Create `path` with mode 0600 (refusing to replace an existing file: it may be a key in use)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(pem)
    os.chmod(path, 0o600)  # whatever the umask


def _echo_where_it_goes(agent: str, kid: str | None) -> None:
    """A new agent takes the lines as they are; an existing one takes its key from them (a second `NAME:` under
    `agents:` would be a duplicate key, and an old key_id left beside a new key would name the wrong key)."""
    if kid is None:
        existing = f"replace agents.{agent}.private_key with the one below, and delete agents.{agent}.key_id if set"
    else:
        existing = f"replace agents.{agent}.private_key and agents.{agent}.key_id with the ones below"
    click.echo("# A new agent: paste under `agents:` in config.yaml, then add its client_id and backend_access.")
    click.echo(f"# An existing agent: {existing}")
    click.echo(f"# (a second `{agent}:` under `agents:` is a duplicate-key error).")


@keys_group.command("generate")
@click.option("--agent", "agent", required=True, help="The agent's name under `agents:` in config.yaml.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the private key to this new file (mode 0600) and print a {file: …} reference instead.",
)
@click.option("--kid", default=None, help="Key id to publish (default: the RFC 7638 thumbprint).")
def generate(agent: str, out: Path | None, kid: str | None) -> None:
    """Generate an RSA 2048 key pair for an agent: the YAML to paste, and the public JWK for Okta."""
    if kid is not None and not kid.strip():
        raise click.BadParameter("must not be empty", param_hint="--kid")
    pem = private_pem(generate_rsa_key())
    key = load_signing_key(pem, kid)
    if out is not None:
        try:
            _write_private(out, pem)
        except FileExistsError:
            raise click.ClickException(f"{out} exists; an existing key is never replaced") from None
        except OSError as exc:
            raise click.ClickException(f"cannot write {out}: {exc.strerror}") from None
        reference = out.resolve()
        click.echo(f"# Wrote the private key to {reference} (mode 0600); a relative {{file: …}} path is read from")
        click.echo("# the YAML's folder.")
        _echo_where_it_goes(agent, kid)
        click.echo(f"{agent}:")
        click.echo(f"  private_key: {{file: {json.dumps(str(reference))}}}")
    else:
        click.echo("# This is the private key: keep it out of git; better, put it in a file or a secret and use")
        click.echo("# {file: path} or ${ENV_NAME} (`--out FILE` writes the file).")
        _echo_where_it_goes(agent, kid)
        click.echo(f"{agent}:")
        click.echo("  private_key: |")
        for line in pem.strip().splitlines():
            click.echo(f"    {line}")
    if kid is not None:
        click.echo(f"  key_id: {json.dumps(kid)}")
    click.echo("")
    click.echo(f"{PUBLIC_JWK_HEADER} for Okta (Directory → AI agents → the agent → public keys), kid {key.kid}:")
    click.echo(json.dumps(key.public_jwk(), indent=2))

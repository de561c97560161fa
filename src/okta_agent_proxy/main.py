"""The seed's entry point: `python -m okta_agent_proxy.main http` runs the gateway (= `okta-agent-proxy serve`)."""

from __future__ import annotations

import sys

from okta_agent_proxy.cli import cli


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["http"]:
        args[0] = "serve"
    cli(args=args, prog_name="python -m okta_agent_proxy.main")


if __name__ == "__main__":
    main()

"""`python -m okta_agent_proxy serve` — the same as the `okta-agent-proxy` command."""

from okta_agent_proxy.cli import main

main()

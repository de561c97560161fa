"""Okta Agent Proxy: a gateway between AI agents and an enterprise's MCP servers."""

__version__ = "0.2.0"

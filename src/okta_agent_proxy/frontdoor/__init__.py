"""The OAuth front door (DESIGN.md §8): the gateway as the authorization server stock MCP clients log in through."""

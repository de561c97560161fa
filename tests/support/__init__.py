"""Helpers shared by the test suites: subprocess servers, Node tools, the MCP conformance fixture."""

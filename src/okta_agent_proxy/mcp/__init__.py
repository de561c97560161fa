"""Speaking MCP: inspecting messages, session bindings, and forwarding Streamable HTTP."""

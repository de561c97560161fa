"""Backend credentials: what the gateway sends to a backend in place of the caller's token."""

"""The HTTP server seam: the aiohttp binding, the edge checks, request bodies."""

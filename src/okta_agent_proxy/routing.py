"""Path-based routing: the longest configured path prefix wins (DESIGN.md §2, step 1).

A prefix matches the path itself and anything below it at a segment boundary: `/hr` matches `/hr` and `/hr/x`,
never `/hrx`. The upstream URL is the backend's `url` + the rest of the path, with the query string kept verbatim.
Disabled backends are left out of the table, so they answer exactly as an unknown path does.
"""

from __future__ import annotations

from dataclasses import dataclass

from okta_agent_proxy.config.models import Backend, GatewayConfig


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    backend: Backend
    prefix: str
    sub_path: str  # "" or starts with "/"

    def upstream_url(self, query_string: str) -> str:
        url = self.backend.url + self.sub_path
        return f"{url}?{query_string}" if query_string else url


class BackendRouter:
    def __init__(self, config: GatewayConfig) -> None:
        entries = [
            (prefix, name, backend)
            for name, backend in config.backends.items()
            if backend.enabled
            for prefix in backend.paths
        ]
        # Longest first, so the first match is the longest prefix.
        self._entries = sorted(entries, key=lambda entry: len(entry[0]), reverse=True)

    def match(self, path: str) -> Route | None:
        for prefix, name, backend in self._entries:
            if prefix == "/":
                return Route(name, backend, prefix, path if path != "/" else "")
            if path == prefix:
                return Route(name, backend, prefix, "")
            if path.startswith(prefix) and path[len(prefix)] == "/":
                return Route(name, backend, prefix, path[len(prefix) :])
        return None

    def prefix_for(self, path: str) -> str | None:
        route = self.match(path)
        return route.prefix if route else None

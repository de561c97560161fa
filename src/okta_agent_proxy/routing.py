"""Path-based routing: the longest configured path prefix wins (DESIGN.md §2, step 1).

A prefix matches the path itself and anything below it at a segment boundary: `/hr` matches `/hr` and `/hr/x`,
never `/hrx`. The upstream URL is the backend's `url` + the rest of the path, with the query string kept verbatim.
Disabled backends are left out of the table, so they answer exactly as an unknown path does. A path with `.` or
`..` segments has no route (a client must not reach around a prefix).
"""

from __future__ import annotations

from dataclasses import dataclass

import yarl

from okta_agent_proxy.config.models import Backend, GatewayConfig

MEMO_MAX = 1024  # paths remembered per table: what clients send fills it, so it is bounded


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    backend: Backend
    prefix: str
    sub_path: str  # "" or starts with "/"

    def upstream_url(self, query_string: str) -> str:
        url = self.backend.url + self.sub_path
        return f"{url}?{query_string}" if query_string else url

    def target(self, query_string: str) -> yarl.URL:
        """The upstream URL, taken as encoded: path and query go upstream byte for byte, as the client sent them."""
        return yarl.URL(self.upstream_url(query_string), encoded=True)


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


class RouteTable:
    """The route of each request path, found once per path and remembered (up to `MEMO_MAX` paths), with the
    upstream URL for requests without a query string."""

    def __init__(self, router: BackendRouter) -> None:
        self.router = router
        self._found: dict[str, tuple[Route | None, yarl.URL | None]] = {}

    def find(self, raw_path: str, path: str) -> tuple[Route | None, yarl.URL | None]:
        """(route, URL) for the raw path (query string included) and its decoded path; (None, None) for none. The
        URL is None when there is a query string: build it with `route.target(query)`."""
        raw, has_query, _ = raw_path.partition("?")
        found = self._found.get(raw)
        if found is None:
            segments = path.split("/")
            route = None if ".." in segments or "." in segments else self.router.match(raw)
            found = (route, route.target("") if route is not None else None)
            if len(self._found) < MEMO_MAX:
                self._found[raw] = found
        return (found[0], None) if has_query else found

"""BackendRouter (okta_agent_proxy.routing): longest prefix, segment boundaries, disabled backends, upstream URLs."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from okta_agent_proxy.config.models import GatewayConfig
from okta_agent_proxy.routing import BackendRouter


def _backend(url: str, paths: list[str], *, enabled: bool = True) -> dict[str, Any]:
    return {
        "url": url,
        "paths": paths,
        "enabled": enabled,
        "auth_method": "pre-shared-key",
        "auth_config": {"key": "k"},
    }


def router(backends: dict[str, dict[str, Any]]) -> BackendRouter:
    return BackendRouter(GatewayConfig.model_validate({"backends": backends}))


ROUTER = router(
    {
        "employees": _backend("http://localhost:9001/mcp", ["/employees", "/hr"]),
        "payroll": _backend("http://payroll.internal:8080", ["/hr/payroll"]),
        "deep": _backend("http://deep.internal/base/path", ["/a/b/c"]),
        "partners": _backend("http://localhost:9002/mcp/", ["/partners/"]),
        "reports": _backend("http://localhost:9003/mcp", ["/reports"], enabled=False),
    }
)


@pytest.mark.parametrize(
    ("path", "name", "prefix", "sub_path"),
    [
        ("/employees", "employees", "/employees", ""),
        ("/employees/", "employees", "/employees", "/"),
        ("/employees/x/y", "employees", "/employees", "/x/y"),
        ("/hr", "employees", "/hr", ""),
        ("/hr/people", "employees", "/hr", "/people"),
        ("/hr/payroll", "payroll", "/hr/payroll", ""),
        ("/hr/payroll/run", "payroll", "/hr/payroll", "/run"),
        ("/hr/payrollx", "employees", "/hr", "/payrollx"),
        ("/a/b/c/d", "deep", "/a/b/c", "/d"),
        ("/partners", "partners", "/partners", ""),
        ("/partners/mcp", "partners", "/partners", "/mcp"),
    ],
)
def test_longest_prefix_wins(path: str, name: str, prefix: str, sub_path: str) -> None:
    route = ROUTER.match(path)
    assert route is not None
    assert (route.name, route.prefix, route.sub_path) == (name, prefix, sub_path)
    assert ROUTER.prefix_for(path) == prefix


@pytest.mark.parametrize(
    "path",
    ["/hrx", "/hr-admin", "/employeesx/y", "/employee", "/", "/a/b", "/a/bc", "/unknown", "/HR", "/partnersx"],
)
def test_no_match_off_a_segment_boundary(path: str) -> None:
    assert ROUTER.match(path) is None
    assert ROUTER.prefix_for(path) is None


def test_disabled_backend_is_absent() -> None:
    assert ROUTER.match("/reports") is None
    assert ROUTER.match("/reports/x") is None


def test_disabled_backend_does_not_shadow_an_enabled_shorter_prefix() -> None:
    r = router(
        {
            "hr": _backend("http://hr", ["/hr"]),
            "payroll": _backend("http://payroll", ["/hr/payroll"], enabled=False),
        }
    )
    route = r.match("/hr/payroll/x")
    assert route is not None
    assert (route.name, route.sub_path) == ("hr", "/payroll/x")


def test_root_prefix_catches_everything_else() -> None:
    r = router({"everything": _backend("http://all:1/mcp", ["/"]), "hr": _backend("http://hr:2", ["/hr"])})
    hr = r.match("/hr/x")
    assert hr is not None
    assert hr.name == "hr"
    root = r.match("/")
    assert root is not None
    assert (root.name, root.prefix, root.sub_path) == ("everything", "/", "")
    assert root.upstream_url("") == "http://all:1/mcp"
    other = r.match("/hrx/y")
    assert other is not None
    assert (other.name, other.sub_path) == ("everything", "/hrx/y")
    assert other.upstream_url("q=1") == "http://all:1/mcp/hrx/y?q=1"


def test_empty_config_routes_nothing() -> None:
    assert router({}).match("/anything") is None


@pytest.mark.parametrize(
    ("path", "query", "expected"),
    [
        ("/employees", "", "http://localhost:9001/mcp"),
        ("/employees/", "", "http://localhost:9001/mcp/"),
        ("/employees/tools/list", "", "http://localhost:9001/mcp/tools/list"),
        ("/hr", "session=1&x=%20y", "http://localhost:9001/mcp?session=1&x=%20y"),
        ("/hr/a/b", "a=1&a=2", "http://localhost:9001/mcp/a/b?a=1&a=2"),
        ("/hr/payroll", "", "http://payroll.internal:8080"),
        ("/hr/payroll/x", "y", "http://payroll.internal:8080/x?y"),
        ("/a/b/c/d/e", "k=v", "http://deep.internal/base/path/d/e?k=v"),
        ("/partners/x", "", "http://localhost:9002/mcp/x"),
    ],
)
def test_upstream_url_keeps_sub_path_and_query(path: str, query: str, expected: str) -> None:
    route = ROUTER.match(path)
    assert route is not None
    assert route.upstream_url(query) == expected


# --- property: the chosen prefix is the longest one on a segment boundary ---------------------------------------------

_SEGMENTS = st.lists(st.sampled_from(["a", "b", "ab", "c"]), min_size=1, max_size=3)
_PREFIXES = st.lists(_SEGMENTS.map(lambda s: "/" + "/".join(s)), min_size=1, max_size=6, unique=True)


@settings(max_examples=100, deadline=None, database=None)
@given(prefixes=_PREFIXES, request_segments=st.lists(st.sampled_from(["a", "b", "ab", "c", "x"]), max_size=5))
def test_property_longest_segment_prefix(prefixes: list[str], request_segments: list[str]) -> None:
    r = router({f"b{i}": _backend(f"http://b{i}", [p]) for i, p in enumerate(prefixes)})
    path = "/" + "/".join(request_segments)
    candidates = [p for p in prefixes if path == p or path.startswith(p + "/")]
    route = r.match(path)
    if not candidates:
        assert route is None
        return
    assert route is not None
    best = max(candidates, key=len)
    assert route.prefix == best
    assert route.name == f"b{prefixes.index(best)}"
    assert best + route.sub_path == path

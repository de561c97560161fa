"""frontdoor/resources.py: RFC 8707 resources → backends, through the real router (routing.BackendRouter)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from okta_agent_proxy.config.models import GatewayConfig
from okta_agent_proxy.frontdoor.resources import InvalidTarget, Resource, ResourceMap, normalize_resource
from okta_agent_proxy.routing import BackendRouter

BASE = "https://gw.example.com"


def _backend(paths: list[str], *, enabled: bool = True) -> dict[str, Any]:
    return {
        "url": "http://backend.internal/mcp",
        "paths": paths,
        "enabled": enabled,
        "auth_method": "pre-shared-key",
        "auth_config": {"key": "k"},
    }


ROUTER = BackendRouter(
    GatewayConfig.model_validate(
        {
            "backends": {
                "employees": _backend(["/employees", "/hr"]),
                "payroll": _backend(["/hr/payroll"]),
                "partners": _backend(["/partners/"]),
                "reports": _backend(["/reports"], enabled=False),
            }
        }
    )
)


def router_match(path: str) -> str | None:
    route = ROUTER.match(path)
    return route.name if route is not None else None


RESOURCES = ResourceMap(BASE, router_match)


@pytest.mark.parametrize(
    ("resource", "url", "backend"),
    [
        ("https://gw.example.com/employees", "https://gw.example.com/employees", "employees"),
        ("https://gw.example.com/employees/", "https://gw.example.com/employees", "employees"),
        ("HTTPS://GW.Example.COM/employees", "https://gw.example.com/employees", "employees"),
        ("https://gw.example.com:443/employees", "https://gw.example.com/employees", "employees"),
        ("https://gw.example.com/employees/mcp", "https://gw.example.com/employees/mcp", "employees"),
        ("https://gw.example.com/hr", "https://gw.example.com/hr", "employees"),
        ("https://gw.example.com/hr/payroll", "https://gw.example.com/hr/payroll", "payroll"),
        ("https://gw.example.com/hr/payroll/", "https://gw.example.com/hr/payroll", "payroll"),
        ("https://gw.example.com/hr/payrollx", "https://gw.example.com/hr/payrollx", "employees"),
        ("https://gw.example.com/partners", "https://gw.example.com/partners", "partners"),
        ("https://gw.example.com/partners/", "https://gw.example.com/partners", "partners"),
    ],
)
def test_resource_names_the_backend_the_router_picks(resource: str, url: str, backend: str) -> None:
    assert RESOURCES.resolve(resource) == Resource(url, backend)
    assert router_match(url.removeprefix(BASE)) == backend


@pytest.mark.parametrize(
    ("resource", "why"),
    [
        (None, "required"),
        ("", "required"),
        ("https://gw.example.com", "names no backend"),  # no all-backends token
        ("https://gw.example.com/", "names no backend"),
        ("https://gw.example.com/employeesx", "names no backend"),  # segment boundary
        ("https://gw.example.com/Employees", "names no backend"),  # the path keeps its case, as routing does
        ("https://gw.example.com/%65mployees", "names no backend"),  # and its escapes: routing matches the raw path
        ("https://gw.example.com/reports", "names no backend"),  # disabled backend
        ("https://gw.example.com/nothing", "names no backend"),
        ("https://gw.example.com:8443/employees", "not a server behind this gateway"),
        ("http://gw.example.com/employees", "not a server behind this gateway"),
        ("https://gw.example.com.evil.com/employees", "not a server behind this gateway"),
        ("https://evil.com/employees", "not a server behind this gateway"),
        ("https://gw.example.co/employees", "not a server behind this gateway"),
        ("https://gw.example.com./employees", "not a server behind this gateway"),
        ("https://gw.example.com/employees#x", "fragment"),
        ("https://gw.example.com/employees#", "fragment"),
        ("https://gw.example.com/employees?x=1", "query"),
        ("https://gw.example.com/employees?", "query"),
        ("https://user@gw.example.com/employees", "userinfo"),
        ("https://gw.example.com/partners/../employees", "segments"),
        ("https://gw.example.com/employees/./mcp", "segments"),
        ("https://gw.example.com/partners/%2E%2e/employees", "segments"),
        ("gw.example.com/employees", "absolute"),
        ("/employees", "absolute"),
        ("ftp://gw.example.com/employees", "absolute"),
        ("https://gw.example.com:99999/employees", "absolute"),
        ("https://gw.example.com:0/employees", "absolute"),
        ("https://gw.example.com:x/employees", "absolute"),
        ("https://[::1/employees", "absolute"),
        ("https://gw.example.com/emp loyees", "absolute"),
        ("https://gw.example.com\\employees", "absolute"),
        ("https://gw.example.com/%zz", "absolute"),
        ("https:///employees", "absolute"),
        ("https://gw.example.com/" + "a" * 2100, "too long"),
    ],
)
def test_invalid_targets(resource: str | None, why: str) -> None:
    with pytest.raises(InvalidTarget, match=why) as refused:
        RESOURCES.resolve(resource)
    assert refused.value.error == "invalid_target"


def test_catch_all_backend_owns_the_origin() -> None:
    router = BackendRouter(GatewayConfig.model_validate({"backends": {"all": _backend(["/"])}}))
    resources = ResourceMap("http://localhost:8000", lambda p: r.name if (r := router.match(p)) else None)
    assert resources.resolve("http://localhost:8000") == Resource("http://localhost:8000", "all")
    assert resources.resolve("http://LOCALHOST:8000/") == Resource("http://localhost:8000", "all")
    assert resources.resolve("http://localhost:8000/x/y/") == Resource("http://localhost:8000/x/y", "all")
    with pytest.raises(InvalidTarget, match="not a server"):
        resources.resolve("http://localhost:8001/x")


def test_matcher_is_asked_each_time() -> None:
    """A config reload swaps the router: a map built over a callable that asks the current one follows it."""
    current: dict[str, str | None] = {"name": "first"}
    resources = ResourceMap(BASE, lambda path: current["name"])
    assert resources.resolve(BASE + "/x").backend == "first"
    current["name"] = None
    with pytest.raises(InvalidTarget):
        resources.resolve(BASE + "/x")


@pytest.mark.parametrize(
    ("value", "normal"),
    [
        ("HTTP://Example.COM:80/A/B/", "http://example.com/A/B"),
        ("https://example.com:443", "https://example.com"),
        ("https://example.com:0443/x", "https://example.com/x"),
        ("https://example.com:8443//", "https://example.com:8443"),
        ("http://example.com:443/x", "http://example.com:443/x"),  # 443 is only https's default
        ("https://example.com:/x", "https://example.com/x"),  # an empty port is the default (RFC 3986 §6.2.3)
        ("https://[::1]:8443/a", "https://[::1]:8443/a"),
        ("https://[FE80::1]/a", "https://[fe80::1]/a"),
        ("https://example.com/a%2fb", "https://example.com/a%2fb"),  # escapes untouched
    ],
)
def test_normalize(value: str, normal: str) -> None:
    assert normalize_resource(value) == normal


@pytest.mark.parametrize("base", ["https://gw.example.com/prefix", "not a url", "https://gw.example.com?x"])
def test_base_url_must_be_an_origin(base: str) -> None:
    with pytest.raises(ValueError, match="GATEWAY_BASE_URL"):
        ResourceMap(base, router_match)


def test_base_url_is_normalised_too() -> None:
    resources = ResourceMap("HTTPS://GW.example.com:443/", router_match)
    assert resources.origin == BASE
    assert resources.resolve(BASE + "/employees").backend == "employees"


# Properties

_SEGMENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789-_~%", min_size=1, max_size=8)
_PATH = st.lists(_SEGMENT, max_size=4).map(lambda parts: "".join("/" + p for p in parts))
_URLS = st.builds(
    lambda scheme, host, port, path, slashes: f"{scheme}://{host}{port}{path}{'/' * slashes}",
    st.sampled_from(["http", "https", "HTTP", "Https"]),
    st.sampled_from(["gw.example.com", "GW.Example.COM", "[::1]", "127.0.0.1", "a-b.c"]),
    st.sampled_from(["", ":80", ":443", ":8443", ":08443", ":"]),
    _PATH,
    st.integers(min_value=0, max_value=3),
)


@settings(max_examples=400, deadline=None)
@given(url=_URLS)
def test_normalisation_is_idempotent(url: str) -> None:
    try:
        once = normalize_resource(url)
    except InvalidTarget:
        return
    assert normalize_resource(once) == once
    assert not once.endswith("/")
    assert once == once.split("://")[0].lower() + "://" + once.split("://")[1]


@settings(max_examples=400, deadline=None)
@given(path=_PATH, slashes=st.integers(min_value=0, max_value=2), upper=st.booleans())
def test_resource_and_request_agree_on_the_backend(path: str, slashes: int, upper: bool) -> None:
    """For any path under the gateway, the resource names exactly the backend a request to that path reaches."""
    path = path + "/" * slashes
    origin = "HTTPS://GW.EXAMPLE.COM:443" if upper else BASE
    try:
        resource = RESOURCES.resolve(origin + path)
    except InvalidTarget:
        assert router_match(path or "/") is None or "%" in path
        return
    assert resource.backend == router_match(path or "/")
    assert resource.url == BASE + path.rstrip("/")


@settings(max_examples=200, deadline=None)
@given(host=st.text(alphabet="abcdefghijklmnopqrstuvwxyz.-", min_size=1, max_size=20), path=_PATH)
def test_foreign_origins_never_name_a_backend(host: str, path: str) -> None:
    if host == "gw.example.com":
        return
    with pytest.raises(InvalidTarget):
        RESOURCES.resolve(f"https://{host}/employees{path}")

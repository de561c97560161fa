"""frontdoor/redirects.py: which redirect URIs a client may register, and which registered one a request names."""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from okta_agent_proxy.frontdoor.redirects import (
    DEFAULT_REDIRECT_GLOBS,
    RedirectPolicy,
    RedirectProblem,
    RedirectUriRefused,
    compile_glob,
    match_redirect_uri,
)

DEFAULT = RedirectPolicy.from_setting(None)

# What the clients DESIGN §8 names really register (Cursor sends the first three in one registration).
REAL_CLIENT_URIS = [
    "cursor://anysphere.cursor-mcp/oauth/callback",
    "https://www.cursor.com/agents/mcp/oauth/callback",
    "http://localhost:8787/callback",
    "http://localhost:53682/callback",  # Claude Code: a free port each time
    "http://127.0.0.1:33418",  # VS Code: loopback without a path
    "https://vscode.dev/redirect",
    "http://[::1]:4000/cb",
    "claude://claude.ai/oauth/callback",
    "vscode://vscode.github-authentication/did-authenticate",
]


def _problem(policy: RedirectPolicy, uri: str) -> RedirectProblem:
    with pytest.raises(RedirectUriRefused) as refused:
        policy.check(uri)
    return refused.value.problem


@pytest.mark.parametrize("uri", REAL_CLIENT_URIS)
def test_default_globs_accept_what_real_clients_register(uri: str) -> None:
    DEFAULT.check(uri)
    assert DEFAULT.allows(uri)


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("https://app.example.com/cb#frag", RedirectProblem.FRAGMENT),
        ("https://app.example.com/cb#", RedirectProblem.FRAGMENT),  # an empty fragment is still a fragment
        ("http://localhost:3000/cb#x", RedirectProblem.FRAGMENT),
        ("https://user@app.example.com/cb", RedirectProblem.USERINFO),
        ("https://user:pw@app.example.com/cb", RedirectProblem.USERINFO),
        ("http://127.0.0.1:5000@evil.com/cb", RedirectProblem.USERINFO),
        ("https://app.example.com/a/../b", RedirectProblem.DOT_SEGMENT),
        ("https://app.example.com/a/./b", RedirectProblem.DOT_SEGMENT),
        ("https://app.example.com/%2e%2E/b", RedirectProblem.DOT_SEGMENT),
        ("https://app.example.com/a/..", RedirectProblem.DOT_SEGMENT),
        ("https://evil.com\\.example.com/cb", RedirectProblem.MALFORMED),  # browsers read "\" as "/"
        ("https://app.example.com/c b", RedirectProblem.MALFORMED),
        ("https://app.example.com/\u00e9", RedirectProblem.MALFORMED),
        ("https://app.example.com/%zz", RedirectProblem.MALFORMED),
        ("https://app.example.com/%4", RedirectProblem.MALFORMED),
        ("https:///cb", RedirectProblem.MALFORMED),
        ("https://app.example.com:0/cb", RedirectProblem.MALFORMED),
        ("https://app.example.com:65536/cb", RedirectProblem.MALFORMED),
        ("https://app.example.com:/cb", RedirectProblem.MALFORMED),
        ("https://app.example.com:8x/cb", RedirectProblem.MALFORMED),
        ("http://[::1/cb", RedirectProblem.MALFORMED),
        ("http://[fe80::1%25eth0]:80/cb", RedirectProblem.MALFORMED),
        ("http://[not-v6]/cb", RedirectProblem.MALFORMED),
        ("/relative/cb", RedirectProblem.MALFORMED),
        ("cb", RedirectProblem.MALFORMED),
        ("", RedirectProblem.MALFORMED),
        ("1https://app.example.com/cb", RedirectProblem.MALFORMED),
        ("https:", RedirectProblem.MALFORMED),
        ("https://app.example.com/" + "a" * 2048, RedirectProblem.MALFORMED),
        ("http://app.example.com/cb", RedirectProblem.INSECURE),
        ("http://127.0.0.1.evil.com/cb", RedirectProblem.INSECURE),  # the default glob's text would match it
        ("http://localhost.evil.com/cb", RedirectProblem.INSECURE),
        ("http://1evil.example/cb", RedirectProblem.INSECURE),  # fnmatch's "[::1]" class would match it
        ("http://10.0.0.1/cb", RedirectProblem.INSECURE),
        ("http://[0:0:0:0:0:0:0:1]/cb", RedirectProblem.INSECURE),  # only the three loopback spellings count
        ("javascript://x/%0aalert(1)", RedirectProblem.FORBIDDEN_SCHEME),
        ("data:text/html,hi", RedirectProblem.FORBIDDEN_SCHEME),
        ("file:///etc/passwd", RedirectProblem.MALFORMED),  # no host: malformed before the scheme is judged
        ("file://host/etc/passwd", RedirectProblem.FORBIDDEN_SCHEME),
        ("ftp://files.example.com/cb", RedirectProblem.NOT_ALLOWED),
        ("com.example.app:/cb", RedirectProblem.NOT_ALLOWED),
        ("cursorx://anysphere.cursor-mcp/cb", RedirectProblem.NOT_ALLOWED),
    ],
)
def test_refused_registrations(uri: str, problem: RedirectProblem) -> None:
    assert _problem(DEFAULT, uri) is problem
    assert not DEFAULT.allows(uri)


def test_forbidden_schemes_stay_forbidden_even_when_a_glob_lists_them() -> None:
    policy = RedirectPolicy(["javascript:*", "data:*", "http://*"])
    assert _problem(policy, "javascript:alert(1)") is RedirectProblem.FORBIDDEN_SCHEME
    assert _problem(policy, "data:text/html,x") is RedirectProblem.FORBIDDEN_SCHEME
    # A glob cannot make plain http to another host acceptable either.
    assert _problem(policy, "http://app.example.com/cb") is RedirectProblem.INSECURE
    policy.check("http://localhost:9/cb")


@pytest.mark.parametrize(
    "uri",
    [
        "https://evil.com/?x=.example.com/",
        "https://evil.com?.example.com/",
        "https://example.com.evil.com/cb",
        "https://evilexample.com/cb",
        "https://example.com/cb",  # no subdomain: `*.` needs the dot
        "https://a.example.com:8443/cb",  # the glob names no port
        "https://a.example.com",  # nor an empty path
        "https://a.example.com.evil.org/cb",
        "http://a.example.com/cb",
    ],
)
def test_operator_glob_cannot_be_reached_around(uri: str) -> None:
    policy = RedirectPolicy(["https://*.example.com/*"])
    assert _problem(policy, uri) in (RedirectProblem.NOT_ALLOWED, RedirectProblem.INSECURE)
    # Plain fnmatch over the whole URI would have let the first one through: the pitfall this module avoids.
    assert fnmatchcase("https://evil.com/?x=.example.com/", "https://*.example.com/*")


@pytest.mark.parametrize(
    "uri", ["https://a.example.com/cb", "https://a.b.example.com/x/y?z=1", "https://A.Example.COM/cb"]
)
def test_operator_glob_accepts_its_hosts(uri: str) -> None:
    RedirectPolicy(["https://*.example.com/*"]).check(uri)


def test_prefix_glob_after_a_host_is_any_port_and_path_never_more_host() -> None:
    policy = RedirectPolicy(["https://app.example.com*"])
    for uri in ("https://app.example.com", "https://app.example.com:8443/cb", "https://app.example.com/x?y"):
        policy.check(uri)
    for uri in ("https://app.example.com.evil.org/cb", "https://app.example.comx/cb", "https://app.example.co/cb"):
        assert _problem(policy, uri) is RedirectProblem.NOT_ALLOWED


def test_prefix_glob_after_a_partial_host_extends_the_host() -> None:
    policy = RedirectPolicy(["https://app-*"])
    policy.check("https://app-one.example.com/cb")
    assert _problem(policy, "https://ap.example.com/cb") is RedirectProblem.NOT_ALLOWED


def test_default_loopback_globs_mean_what_they_say() -> None:
    ipv4, localhost, ipv6 = (compile_glob(g) for g in ("http://127.0.0.1*", "http://localhost*", "http://[::1]*"))
    assert ipv4.match("http://127.0.0.1:3000/cb") and ipv4.match("http://127.0.0.1") and ipv4.match("http://127.0.0.1/")
    assert not ipv4.match("http://127.0.0.1.evil.com/cb")
    assert not ipv4.match("http://127.0.0.10:3000/cb")
    assert localhost.match("http://localhost:8787/callback") and not localhost.match("http://localhost.evil.com/")
    assert ipv6.match("http://[::1]:3000/cb") and not ipv6.match("http://1evil.example/cb")
    # Under fnmatch the default IPv6 glob is a character class: it misses the loopback and admits a stranger.
    assert not fnmatchcase("http://[::1]:3000/cb", "http://[::1]*")
    assert fnmatchcase("http://1evil.example/cb", "http://[::1]*")


def test_question_mark_and_brackets_are_literal() -> None:
    policy = RedirectPolicy(["https://app.example.com/cb?mode=a"])
    policy.check("https://app.example.com/cb?mode=a")
    assert _problem(policy, "https://app.example.com/cbXmode=a") is RedirectProblem.NOT_ALLOWED


def test_wildcard_in_the_path_matches_across_segments() -> None:
    policy = RedirectPolicy(["https://app.example.com/oauth/*"])
    policy.check("https://app.example.com/oauth/a/b?c=d")
    assert _problem(policy, "https://app.example.com/other") is RedirectProblem.NOT_ALLOWED
    assert _problem(policy, "https://app.example.com/oauth/../x") is RedirectProblem.DOT_SEGMENT


def test_scheme_and_host_compare_without_case_path_with_case() -> None:
    policy = RedirectPolicy(["HTTPS://App.Example.com/CB"])
    policy.check("https://app.example.com/CB")
    policy.check("HTTPS://APP.EXAMPLE.COM/CB")
    assert _problem(policy, "https://app.example.com/cb") is RedirectProblem.NOT_ALLOWED


def test_uri_without_authority_under_a_glob_for_one() -> None:
    policy = RedirectPolicy(["com.example.app:/*"])
    policy.check("com.example.app:/oauth2redirect")
    assert _problem(policy, "com.example.app://host/cb") is RedirectProblem.NOT_ALLOWED


@pytest.mark.parametrize("glob", ["*://x/*", "no-scheme", "https://a b/*", "https://a/#*", "", "://x"])
def test_bad_globs_are_configuration_errors(glob: str) -> None:
    with pytest.raises(ValueError, match="glob"):
        compile_glob(glob)


def test_setting_parsing() -> None:
    assert RedirectPolicy.from_setting(None).globs == tuple(DEFAULT_REDIRECT_GLOBS.split(","))
    assert RedirectPolicy.from_setting(" https://a.example.com/* , ,cursor://*").globs == (
        "https://a.example.com/*",
        "cursor://*",
    )
    nothing = RedirectPolicy.from_setting("")
    assert nothing.globs == ()
    assert _problem(nothing, "https://app.example.com/cb") is RedirectProblem.NOT_ALLOWED


# Matching at /oauth/authorize


def test_exact_match() -> None:
    registered = ["https://app.example.com/cb", "cursor://anysphere.cursor-mcp/oauth/callback"]
    assert match_redirect_uri("https://app.example.com/cb", registered) == "https://app.example.com/cb"
    assert match_redirect_uri("cursor://anysphere.cursor-mcp/oauth/callback", registered) == registered[1]


@pytest.mark.parametrize(
    "requested",
    [
        "https://app.example.com/cb/",  # trailing slash
        "https://app.example.com/cb?x=1",
        "https://app.example.com:443/cb",  # the same URL to a browser, not the same string
        "https://APP.example.com/cb",
        "https://app.example.com/CB",
        "https://app.example.com/c",
        "https://app.example.com:8443/cb",  # no port freedom for https
        "cursor://anysphere.cursor-mcp/oauth/callback/",
    ],
)
def test_non_loopback_needs_the_exact_string(requested: str) -> None:
    registered = ["https://app.example.com/cb", "cursor://anysphere.cursor-mcp/oauth/callback"]
    assert match_redirect_uri(requested, registered) is None


@pytest.mark.parametrize(
    ("registered", "requested"),
    [
        ("http://127.0.0.1:3000/cb", "http://127.0.0.1:54321/cb"),
        ("http://127.0.0.1/cb", "http://127.0.0.1:54321/cb"),  # registered without a port
        ("http://127.0.0.1:3000/cb", "http://127.0.0.1/cb"),  # requested without one
        ("http://[::1]:3000/cb", "http://[::1]:1/cb"),
        ("http://localhost:8787/callback", "http://localhost:61000/callback"),
        ("http://127.0.0.1:33418", "http://127.0.0.1:50000"),  # VS Code: no path
        ("http://127.0.0.1:3000/cb?a=1", "http://127.0.0.1:4000/cb?a=1"),
        ("http://localhost:8787/callback", "HTTP://LOCALHOST:9/callback"),  # scheme and host are case-blind
    ],
)
def test_loopback_matches_on_any_port(registered: str, requested: str) -> None:
    assert match_redirect_uri(requested, ["https://other.example.com/cb", registered]) == registered


@pytest.mark.parametrize(
    ("registered", "requested"),
    [
        ("http://127.0.0.1:3000/cb", "http://127.0.0.1:4000/cb/"),  # trailing slash differs
        ("http://127.0.0.1:3000/cb/", "http://127.0.0.1:4000/cb"),
        ("http://127.0.0.1:33418", "http://127.0.0.1:50000/"),
        ("http://127.0.0.1:3000/cb", "http://127.0.0.1:4000/cb?a=1"),  # query differs
        ("http://127.0.0.1:3000/cb", "http://127.0.0.1:4000/CB"),
        ("http://127.0.0.1:3000/cb", "http://localhost:3000/cb"),  # another host, even another loopback name
        ("http://localhost:3000/cb", "http://[::1]:3000/cb"),
        ("http://127.0.0.1:3000/cb", "https://127.0.0.1:4000/cb"),  # https gets no port freedom
        ("https://127.0.0.1:3000/cb", "https://127.0.0.1:4000/cb"),
        ("http://127.0.0.1:3000/cb", "http://127.0.0.1:4000@evil.com/cb"),
        ("http://127.0.0.1:3000/cb", "http://127.0.0.1:4000/cb#x"),
        ("http://127.0.0.1:3000/cb", "http://127.0.0.1:0/cb"),
        ("http://127.0.0.1:3000/cb", "http://127.0.0.1:4000/x/../cb"),
        ("http://127.0.0.1:3000/cb", "http://127.0.0.2:3000/cb"),
        ("http://127.0.0.1:3000/cb", "http://127.0.0.1.evil.com:3000/cb"),
    ],
)
def test_loopback_relaxes_the_port_only(registered: str, requested: str) -> None:
    assert match_redirect_uri(requested, [registered]) is None


def test_no_registered_uris_match_nothing() -> None:
    assert match_redirect_uri("http://127.0.0.1:3000/cb", []) is None


# Properties

_HOST_CHARS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-", min_size=1, max_size=30)
_PATHS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/_-=&?", max_size=20).map(lambda p: "/" + p)
_PORTS = st.integers(min_value=1, max_value=65535)
_LOOPBACK = st.sampled_from(["127.0.0.1", "[::1]", "localhost"])


@settings(max_examples=300, deadline=None)
@given(host=_HOST_CHARS, loopback=_LOOPBACK, path=_PATHS, port=_PORTS, other_port=_PORTS)
def test_loopback_freedom_never_reaches_another_host(
    host: str, loopback: str, path: str, port: int, other_port: int
) -> None:
    registered = f"http://{loopback}:{port}{path}"
    requested = f"http://{host}:{other_port}{path}"
    if host != loopback:
        assert match_redirect_uri(requested, [registered]) is None
    https = f"https://{loopback}:{other_port}{path}"
    assert match_redirect_uri(https, [registered]) is None


@settings(max_examples=300, deadline=None)
@given(loopback=_LOOPBACK, path=_PATHS, port=_PORTS, other_port=_PORTS)
def test_loopback_any_port_and_trailing_slash_is_never_equal(
    loopback: str, path: str, port: int, other_port: int
) -> None:
    registered = f"http://{loopback}:{port}{path}"
    if ".." in path.split("/") or "." in path.split("/"):
        return
    assert match_redirect_uri(f"http://{loopback}:{other_port}{path}", [registered]) == registered
    assert match_redirect_uri(f"http://{loopback}:{other_port}{path}/", [registered]) is None


@settings(max_examples=300, deadline=None)
@given(uri=st.text(max_size=60))
def test_registration_never_admits_fragments_userinfo_or_backslashes(uri: str) -> None:
    """Whatever the input, what the default policy accepts is a plain URI with none of the dangerous parts."""
    if not DEFAULT.allows(uri):
        return
    assert "#" not in uri and "\\" not in uri and uri.isascii() and uri.isprintable() and " " not in uri
    authority = re.match(r"[^:]+://([^/?]*)", uri)
    assert authority is None or "@" not in authority.group(1)


@settings(max_examples=300, deadline=None)
@given(label=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20), tail=_PATHS)
def test_subdomain_glob_admits_only_its_subdomains(label: str, tail: str) -> None:
    policy = RedirectPolicy(["https://*.example.com/*"])
    uri = f"https://{label}.evil.com{tail}.example.com/"
    assert not policy.allows(uri)
    inside = f"https://{label}.example.com{tail}"
    if ".." not in tail.split("/") and "." not in tail.split("/"):
        assert policy.allows(inside)

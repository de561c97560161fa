"""Redirect URIs of front-door clients (DESIGN.md §8): which ones a client may register, and which registered one the
`redirect_uri` of an authorization request is.

**Registration** (`POST /oauth/register`): each URI must be allowed by one of the `FRONT_DOOR_REDIRECT_URIS` globs and
be a plain absolute URI:
- no fragment (RFC 6749 §3.1.2: "The endpoint URI MUST NOT include a fragment component"), no userinfo, no `.` or
  `..` path segment (written plainly or as `%2e`), printable ASCII only — no backslash, which browsers read as `/`
  in http(s) URLs (`https://evil.com\\.example.com/` is evil.com to a browser), no space, no malformed `%` escape;
- plain `http` only on a loopback host, `127.0.0.1`, `[::1]` or `localhost`, whatever the globs say (MCP 2025-11-25,
  Authorization, Communication Security: "All redirect URIs MUST be either localhost or use HTTPS"): so the default
  glob `http://127.0.0.1*` cannot admit `http://127.0.0.1.evil.com/cb`;
- never a scheme whose "page" is made by the URI itself or reads local content (`javascript:`, `data:`, `file:`…).

**Globs** match the whole URI, with `*` the only wildcard. fnmatch's other two would be wrong over URIs: `?` opens a
query, and `[::1]` — the IPv6 loopback of the default list — is to fnmatch a class matching `:` or `1`, so the
fnmatch glob `http://[::1]*` misses `http://[::1]:3000/cb` and matches `http://1evil.example/cb`. Here both are
literal. A `*` in a glob's authority (between `://` and the next `/` or `?`) stays inside the authority, so the
operator glob `https://*.example.com/*` matches `https://a.example.com/cb` and not
`https://evil.com/?x=.example.com/`. A glob that ends inside its authority with `*` is a prefix: after a host
(`http://127.0.0.1*`, `https://*.example.com*`) the `*` is "any port, any path" — never more host, so not
`http://127.0.0.1.evil.com/`; after `://` or a partial host (`https://*`, `https://app-*`) it is "the rest of the
host, any port, any path". Scheme and host compare case-insensitively (RFC 3986 §6.2.2.1), the rest exactly; a
glob may not have a wildcard in its scheme.

**Matching** at `/oauth/authorize` is simple string comparison with a registered URI (RFC 9700 §2.1: "authorization
servers MUST utilize exact string matching except for port numbers in localhost redirection URIs of native apps"),
with that one exception, RFC 8252 §7.3 (Loopback Interface Redirection):

    The authorization server MUST allow any port to be specified at the time of the request for loopback IP
    redirect URIs, to accommodate clients that obtain an available ephemeral port from the operating system at
    the time of the request.

Claude Code and VS Code pick a free port for each login. So an `http` URI on `127.0.0.1`, `[::1]` or `localhost`
matches a registered one with the same host, path and query on any port. Nothing else is relaxed:
`http://127.0.0.1:5000/cb/` is not `http://127.0.0.1/cb`, and `127.0.0.1` never stands in for `localhost`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

DEFAULT_REDIRECT_GLOBS = "http://127.0.0.1*,http://localhost*,http://[::1]*,https://*,cursor://*,vscode://*,claude://*"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "[::1]", "localhost"})
# Schemes whose target is made by the URI itself or is local content: never a redirect target, whatever the globs.
FORBIDDEN_SCHEMES = frozenset({"javascript", "data", "vbscript", "file", "blob", "about", "filesystem", "view-source"})
MAX_URI_LENGTH = 2048

_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*\Z")
# RFC 3986 §2: unreserved, reserved (without "#": fragments are refused on their own) and "%".
_URI_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?\[\]@!$&'()*+,;=%]*\Z")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_REG_NAME = re.compile(r"[A-Za-z0-9\-._~]+\Z")
_PORT = re.compile(r"[0-9]{1,5}\Z")
_DOT = re.compile(r"%2e", re.IGNORECASE)
_HOST_END = re.compile(r"[A-Za-z0-9\]]\Z")  # a glob's authority text that ends where a host can end

_IN_AUTHORITY = r"[^/?#@\\]*"  # what a `*` in a glob's authority may stand for: never past the authority
_PORT_AND_REST = r"(?::[0-9]+)?(?:[/?].*)?"
_REST = r"(?:[/?].*)?"


class RedirectProblem(StrEnum):
    MALFORMED = "malformed"  # not a plain absolute URI (characters, scheme, host, port, escapes, length)
    FRAGMENT = "fragment"
    USERINFO = "userinfo"
    DOT_SEGMENT = "dot_segment"
    INSECURE = "insecure"  # plain http on a host that is not loopback
    FORBIDDEN_SCHEME = "forbidden_scheme"
    NOT_ALLOWED = "not_allowed"  # no FRONT_DOOR_REDIRECT_URIS glob matches


class RedirectUriRefused(Exception):
    """A redirect URI the front door will not register: `problem` says why, for the security event; the endpoint
    answers `invalid_redirect_uri` (RFC 7591 §3.2.2)."""

    def __init__(self, problem: RedirectProblem) -> None:
        super().__init__(f"redirect URI refused: {problem}")
        self.problem = problem


@dataclass(frozen=True, slots=True)
class _Parts:
    scheme: str  # lower-cased
    host: str | None  # lower-cased, an IPv6 literal in brackets; None for a URI without authority (`app:/cb`)
    port: str | None  # the digits as written
    rest: str  # path and query, as written

    def comparable(self) -> str:
        """The URI with scheme and host lower-cased: what globs match."""
        if self.host is None:
            return f"{self.scheme}:{self.rest}"
        port = f":{self.port}" if self.port is not None else ""
        return f"{self.scheme}://{self.host}{port}{self.rest}"


def _parse(uri: str) -> _Parts:
    if len(uri) > MAX_URI_LENGTH:
        raise RedirectUriRefused(RedirectProblem.MALFORMED)
    if "#" in uri:
        raise RedirectUriRefused(RedirectProblem.FRAGMENT)
    if not _URI_CHARS.match(uri) or _BAD_ESCAPE.search(uri):
        raise RedirectUriRefused(RedirectProblem.MALFORMED)
    scheme, colon, rest = uri.partition(":")
    scheme = scheme.lower()
    if not colon or not _SCHEME.match(scheme) or not rest:
        raise RedirectUriRefused(RedirectProblem.MALFORMED)
    host = port = None
    if rest.startswith("//"):
        after = rest[2:]
        cut = next((i for i, c in enumerate(after) if c in "/?"), len(after))
        authority, rest = after[:cut], after[cut:]
        if "@" in authority:
            raise RedirectUriRefused(RedirectProblem.USERINFO)
        host, port = _split_authority(authority)
    path = rest.partition("?")[0]
    if any(_DOT.sub(".", segment) in (".", "..") for segment in path.split("/")):
        raise RedirectUriRefused(RedirectProblem.DOT_SEGMENT)
    return _Parts(scheme, host, port, rest)


def _split_authority(authority: str) -> tuple[str, str | None]:
    if authority.startswith("["):
        literal, bracket, tail = authority[1:].partition("]")
        if not bracket or "%" in literal:  # no zone ids: a redirect goes to this machine, not an interface
            raise RedirectUriRefused(RedirectProblem.MALFORMED)
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            raise RedirectUriRefused(RedirectProblem.MALFORMED) from None
        host = f"[{literal}]"
    else:
        host = authority.partition(":")[0]
        tail = authority[len(host) :]
        if not _REG_NAME.match(host):
            raise RedirectUriRefused(RedirectProblem.MALFORMED)
    if not tail:
        return host.lower(), None
    port = tail[1:]
    if not tail.startswith(":") or not _PORT.match(port) or not 0 < int(port) <= 65535:
        raise RedirectUriRefused(RedirectProblem.MALFORMED)
    return host.lower(), port


def _literal_or_star(text: str, star: str) -> str:
    return star.join(re.escape(piece) for piece in text.split("*"))


def compile_glob(glob: str) -> re.Pattern[str]:
    """The regular expression for one `FRONT_DOOR_REDIRECT_URIS` glob (see the module docstring); ValueError for a
    glob that cannot be one (no scheme, a wildcard in the scheme, a space or a fragment)."""
    scheme, colon, rest = glob.partition(":")
    scheme = scheme.lower()
    if not colon or not _SCHEME.match(scheme) or not rest or "#" in glob or any(c.isspace() for c in glob):
        raise ValueError(f"redirect URI glob {glob!r}: must be `scheme:…` with `*` wildcards after the scheme")
    parts = [re.escape(scheme) + ":"]
    if rest.startswith("//"):
        after = rest[2:]
        cut = next((i for i, c in enumerate(after) if c in "/?"), len(after))
        authority, tail = after[:cut].lower(), after[cut:]
        parts.append("//")
        if not tail and authority.endswith("*"):
            head = authority[:-1]
            parts.append(_literal_or_star(head, _IN_AUTHORITY))
            parts.append(_PORT_AND_REST if _HOST_END.search(head) else _IN_AUTHORITY + _REST)
        else:
            parts.append(_literal_or_star(authority, _IN_AUTHORITY))
            parts.append(_literal_or_star(tail, ".*"))
    else:  # a glob without authority matches only URIs without one
        parts.append("(?!//)" + _literal_or_star(rest, ".*"))
    return re.compile("".join(parts) + r"\Z", re.DOTALL)


class RedirectPolicy:
    """Which redirect URIs may be registered: `FRONT_DOOR_REDIRECT_URIS` plus the fixed rules above."""

    def __init__(self, globs: Iterable[str]) -> None:
        self.globs = tuple(glob.strip() for glob in globs if glob.strip())
        self._patterns = tuple(compile_glob(glob) for glob in self.globs)

    @classmethod
    def from_setting(cls, value: str | None) -> RedirectPolicy:
        """From the comma-separated setting; unset → the default list."""
        return cls((DEFAULT_REDIRECT_GLOBS if value is None else value).split(","))

    def check(self, uri: str) -> None:
        """Return if `uri` may be registered; else raise RedirectUriRefused."""
        parts = _parse(uri)
        if parts.scheme in FORBIDDEN_SCHEMES:
            raise RedirectUriRefused(RedirectProblem.FORBIDDEN_SCHEME)
        if parts.scheme == "http" and parts.host not in LOOPBACK_HOSTS:
            raise RedirectUriRefused(RedirectProblem.INSECURE)
        comparable = parts.comparable()
        if not any(pattern.match(comparable) for pattern in self._patterns):
            raise RedirectUriRefused(RedirectProblem.NOT_ALLOWED)

    def allows(self, uri: str) -> bool:
        try:
            self.check(uri)
        except RedirectUriRefused:
            return False
        return True


def _loopback_key(uri: str) -> tuple[str, str] | None:
    """(host, path and query) of an `http` URI on a loopback host; None for any other URI."""
    try:
        parts = _parse(uri)
    except RedirectUriRefused:
        return None
    if parts.scheme != "http" or parts.host not in LOOPBACK_HOSTS:
        return None
    return parts.host, parts.rest


def match_redirect_uri(requested: str, registered: Iterable[str]) -> str | None:
    """The registered URI that `requested` is — equal to it, or the same loopback `http` URI on another port — or
    None. Redirect to `requested` (the port the client is listening on), never to the registered one."""
    candidates = tuple(registered)
    if requested in candidates:
        return requested
    key = _loopback_key(requested)
    if key is None:
        return None
    return next((uri for uri in candidates if _loopback_key(uri) == key), None)

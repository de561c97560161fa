"""The HTML pages the front door renders itself (DESIGN.md §8): the consent page and the error page.

Who is asking matters more here than anywhere: the consent page is where a user decides whether an application may
act as them. Most of what it shows comes from that application — a registered `client_name`, the name in a client
metadata document, its redirect URI — so every such value is untrusted text:

- escaped with `html.escape(quote=True)` wherever it goes, element text or attribute value;
- inside `<bdi>`, so right-to-left or override characters in a name cannot reorder the page's own words around it;
- control characters replaced by U+FFFD, and absurdly long values cut with an ellipsis (a 5 KB "name" must not push
  the buttons off the screen or pad the page with a fake second form of text);
- a name is shown as written — look-alike letters included, since refusing them would also refuse honest
  non-Latin names — and marked "unverified name" when nothing vouches for it (a dynamically registered client,
  RFC 7591). A client metadata document's name is as good as its URL's host, which is shown as verified.

The pages load nothing and run nothing: no JavaScript, no external resources, a little inline CSS, so
`HTML_HEADERS`' policy can be `default-src 'none'`. It has no `form-action` on purpose: Chrome applies
`form-action` to the redirect that follows the consent POST, and that redirect goes to the client's loopback or
custom-scheme (`cursor://…`) redirect URI, which no fixed list could name. `frame-ancestors 'none'` and
`X-Frame-Options: DENY` keep the consent buttons out of other sites' frames (clickjacking); `no-store` keeps the
page, with its CSRF token, out of caches.
"""

from __future__ import annotations

import html
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = [
    "CONSENT_ACTION",
    "CONTENT_TYPE",
    "HTML_HEADERS",
    "MAX_NAME_LENGTH",
    "MAX_TEXT_LENGTH",
    "ConsentView",
    "consent_page",
    "error_page",
]

CONTENT_TYPE = "text/html; charset=utf-8"
HTML_HEADERS: Mapping[str, str] = MappingProxyType(
    {
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; "
        "base-uri 'none'",
        "X-Frame-Options": "DENY",
        "Cache-Control": "no-store",
        "Pragma": "no-cache",
        # same-origin, not no-referrer: under no-referrer Chromium sends `Origin: null` with the consent form's POST,
        # which the edge refuses; the redirect to the client still carries no Referer
        "Referrer-Policy": "same-origin",
        "X-Content-Type-Options": "nosniff",
    }
)
CONSENT_ACTION = "/oauth/consent"
MAX_NAME_LENGTH = 100  # a client's name, in characters
MAX_TEXT_LENGTH = 200  # any other value shown (ids, hosts, scopes, the user, an error message)
_ELLIPSIS = "…"
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})

_STYLE = """
body{margin:0;font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;background:#f4f5f7}
main{box-sizing:border-box;max-width:34rem;margin:0 auto;padding:1.25rem}
section{background:#fff;border:1px solid #d8dbe0;border-radius:.75rem;padding:1.25rem}
h1{font-size:1.35rem;line-height:1.3;margin:0 0 1rem}
dl{margin:0 0 1rem}dt{font-size:.8rem;color:#5c6370;text-transform:uppercase;letter-spacing:.04em;margin-top:.75rem}
dd{margin:.15rem 0 0;overflow-wrap:anywhere}
code{font:.9em ui-monospace,SFMono-Regular,Menlo,monospace;background:#eef0f3;border-radius:.25rem;padding:0 .25rem}
ul{margin:.15rem 0 0;padding-left:1.25rem}
.tag{display:inline-block;font-size:.75rem;font-weight:600;border-radius:.25rem;padding:0 .4rem;margin-left:.35rem}
.unverified{background:#fff4ce;color:#6b4e00;border:1px solid #e6c65c}
.verified{background:#e3f4e6;color:#1d5b2a;border:1px solid #8fc79a}
.note{font-size:.9rem;color:#5c6370}
.buttons{display:flex;flex-wrap:wrap;gap:.75rem;margin-top:1.25rem}
button{flex:1 1 10rem;font:inherit;font-weight:600;padding:.75rem 1rem;border-radius:.5rem;cursor:pointer}
.deny{background:#fff;color:#1d1d1f;border:1px solid #9aa1ab}
.approve{background:#1662dd;color:#fff;border:1px solid #1662dd}
"""


@dataclass(frozen=True)
class ConsentView:
    """What the consent page shows. `client_name` is untrusted text, whoever supplied it."""

    client_name: str | None  # as registered, or from the client's metadata document
    client_id: str
    verified_host: str | None  # the host of a CIMD client_id URL (verified); None for a registered client
    redirect_host: str  # host (or scheme, for custom schemes like cursor://) of the redirect URI
    backend: str  # the backend's name
    resource: str  # the resource URL
    scopes: tuple[str, ...]
    user: str  # the user's name or email from the ID token
    csrf_token: str


def _shown(value: str, limit: int = MAX_TEXT_LENGTH) -> str:
    """`value` escaped for HTML, control characters replaced, cut at `limit` characters with an ellipsis."""
    clean = "".join("\ufffd" if unicodedata.category(c) == "Cc" else c for c in value)
    if len(clean) > limit:
        clean = clean[: limit - 1] + _ELLIPSIS
    return html.escape(clean, quote=True)


def _untrusted(value: str, limit: int = MAX_TEXT_LENGTH) -> str:
    return f"<bdi>{_shown(value, limit)}</bdi>"


def _document(title: str, body: str) -> bytes:
    page = (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="same-origin">'
        f"<title>{_shown(title)}</title><style>{_STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )
    return page.encode("utf-8")


def _client_rows(view: ConsentView) -> str:
    name = _untrusted(view.client_name, MAX_NAME_LENGTH) if view.client_name else "An application with no name"
    if view.verified_host is None:
        client_id = f"<dt>Client ID</dt><dd><code>{_untrusted(view.client_id)}</code></dd>"
        if not view.client_name:
            return f"<dt>Application</dt><dd>{name}</dd>{client_id}"
        return (
            f'<dt>Application</dt><dd>{name}<span class="tag unverified">unverified name</span></dd>{client_id}'
            '<dd class="note">The application chose this name itself when it registered: '
            "make sure it is the one you are signing in to.</dd>"
        )
    return (
        f"<dt>Application</dt><dd>{name}</dd>"
        f'<dt>Published by</dt><dd>{_untrusted(view.verified_host)}<span class="tag verified">verified</span></dd>'
        f"<dt>Client ID</dt><dd><code>{_untrusted(view.client_id)}</code></dd>"
    )


def _redirect_row(host: str) -> str:
    name = host.lower().rsplit(":", 1)[0] if not host.endswith("]") else host.lower()
    where = " (an application on this device)" if host.lower() in _LOOPBACK_HOSTS or name in _LOOPBACK_HOSTS else ""
    return f"<dt>Sends you back to</dt><dd>{_untrusted(host)}{where}</dd>"


def _scope_list(scopes: Iterable[str]) -> str:
    items = "".join(f"<li><code>{_untrusted(scope)}</code></li>" for scope in scopes)
    return f"<ul>{items}</ul>" if items else "none beyond signing you in"


def consent_page(view: ConsentView, *, action: str = CONSENT_ACTION) -> bytes:
    """The consent page (UTF-8): who asks, for what, as whom; one POST form to `action` carrying the CSRF token and
    the two `decision` buttons. Deny comes first: it is the form's default button."""
    body = (
        "<section>"
        f"<h1>Allow access to {_untrusted(view.backend)}?</h1>"
        "<dl>"
        f"{_client_rows(view)}"
        f"{_redirect_row(view.redirect_host)}"
        f"<dt>Wants to use</dt><dd>{_untrusted(view.backend)} (<code>{_untrusted(view.resource)}</code>)</dd>"
        f"<dt>With permissions</dt><dd>{_scope_list(view.scopes)}</dd>"
        f"<dt>As you</dt><dd>{_untrusted(view.user)}</dd>"
        "</dl>"
        f'<form method="post" action="{_shown(action)}">'
        f'<input type="hidden" name="csrf" value="{html.escape(view.csrf_token, quote=True)}">'
        '<div class="buttons">'
        '<button type="submit" name="decision" value="deny" class="deny">Deny</button>'
        '<button type="submit" name="decision" value="approve" class="approve">Allow</button>'
        "</div></form>"
        "</section>"
    )
    return _document("Allow access?", body)


def error_page(title: str, message: str) -> bytes:
    """A page for an error the front door cannot send back to the client (UTF-8). Both texts are escaped; the
    caller must not put anything secret in them (a token, a code, the IdP's raw answer)."""
    body = f"<section><h1>{_shown(title)}</h1><p>{_shown(message, 2 * MAX_TEXT_LENGTH)}</p></section>"
    return _document(title, body)

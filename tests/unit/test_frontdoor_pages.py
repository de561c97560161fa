"""The front door's own HTML (`frontdoor/pages.py`), read back with the standard library's HTML parser — what a
browser would build, not what the source looks like: hostile client names and ids stay text (no element, no
attribute, no script), a look-alike name is shown as written and marked unverified, the consent page has exactly
one form with the CSRF token and the two decisions, and the headers forbid scripts, frames and caching."""

from __future__ import annotations

import dataclasses
from html.parser import HTMLParser

import pytest

from okta_agent_proxy.frontdoor.pages import (
    CONTENT_TYPE,
    HTML_HEADERS,
    MAX_NAME_LENGTH,
    ConsentView,
    consent_page,
    error_page,
)

CSRF = "Zm9vYmFyLWNzcmYtdG9rZW4tMTIzNDU2Nzg5MGFiY2RlZg"
HOSTILE = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
# "Claude Code" with a Cyrillic С (U+0421) and а (U+0430): looks the same, is not the same.
LOOK_ALIKE = "\u0421l\u0430ude Code"
# Tags a browser builds from the pages, and nothing else: no script, no image, no link, no frame.
EXPECTED_TAGS = {
    "html", "head", "meta", "title", "style", "body", "main", "section", "h1", "dl", "dt", "dd", "code", "bdi",
    "span", "ul", "li", "form", "input", "div", "button", "p",
}  # fmt: skip


@dataclasses.dataclass
class Element:
    tag: str
    attrs: dict[str, str | None]


class Page(HTMLParser):
    """A parsed page: its elements in order, its visible text (without `<style>` and `<title>`), and the text of
    each `<bdi>` (where untrusted values go)."""

    def __init__(self, body: bytes) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[Element] = []
        self.text_parts: list[str] = []
        self.bdi: list[str] = []
        self.title = ""
        self._open: list[str] = []
        self.feed(body.decode("utf-8"))
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append(Element(tag, dict(attrs)))
        if tag not in {"meta", "input"}:  # void elements have no end tag
            self._open.append(tag)
        if tag == "bdi":
            self.bdi.append("")

    def handle_endtag(self, tag: str) -> None:
        assert self._open and self._open[-1] == tag, (self._open, tag)
        self._open.pop()

    def handle_data(self, data: str) -> None:
        if "title" in self._open:
            self.title += data
        elif "style" not in self._open:
            self.text_parts.append(data)
            if "bdi" in self._open:
                self.bdi[-1] += data

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.text_parts).split())

    def all(self, tag: str) -> list[Element]:
        return [element for element in self.elements if element.tag == tag]


def a_view(**changes: object) -> ConsentView:
    view = ConsentView(
        client_name="Cursor",
        client_id="tZ3b9YF0f6Oq5-registered-client",
        verified_host=None,
        redirect_host="127.0.0.1",
        backend="employees",
        resource="https://gw.example.com/employees",
        scopes=("mcp:read", "employees:read"),
        user="ada@example.com",
        csrf_token=CSRF,
    )
    return dataclasses.replace(view, **changes)  # type: ignore[arg-type]


def assert_inert(page: Page, body: bytes) -> None:
    """Nothing that runs or loads: known tags only, no event handler, no URL attribute, no script anywhere."""
    assert {element.tag for element in page.elements} <= EXPECTED_TAGS
    for element in page.elements:
        for name in element.attrs:
            assert not name.startswith("on"), element
            assert name not in {"src", "href", "srcset", "style", "formaction"}, element
    assert b"<script" not in body.lower()
    assert b"url(" not in body.lower() and b"@import" not in body.lower()


# ---------------------------------------------------------------- the consent page


def test_consent_page_has_exactly_one_form_with_the_csrf_token_and_two_decisions() -> None:
    page = Page(consent_page(a_view()))
    (form,) = page.all("form")
    assert form.attrs == {"method": "post", "action": "/oauth/consent"}
    inputs = page.all("input")
    assert [element.attrs for element in inputs] == [{"type": "hidden", "name": "csrf", "value": CSRF}]
    buttons = page.all("button")
    assert [(b.attrs["type"], b.attrs["name"], b.attrs["value"]) for b in buttons] == [
        ("submit", "decision", "deny"),
        ("submit", "decision", "approve"),
    ]
    assert not page.all("textarea") and not page.all("select")


def test_consent_page_posts_to_the_given_action() -> None:
    (form,) = Page(consent_page(a_view(), action="/oauth/consent?x=\"'<")).all("form")
    assert form.attrs["action"] == "/oauth/consent?x=\"'<"


def test_consent_page_shows_who_asks_for_what_as_whom() -> None:
    page = Page(consent_page(a_view()))
    for shown in ("Cursor", "tZ3b9YF0f6Oq5-registered-client", "127.0.0.1", "employees", "mcp:read"):
        assert shown in page.bdi
    assert "https://gw.example.com/employees" in page.bdi
    assert "employees:read" in page.bdi
    assert "ada@example.com" in page.bdi
    assert "an application on this device" in page.text


def test_consent_page_is_utf8_readable_on_a_phone_and_loads_nothing() -> None:
    body = consent_page(a_view(client_name=LOOK_ALIKE))
    page = Page(body)
    assert body.startswith(b"<!doctype html>")
    metas = [element.attrs for element in page.all("meta")]
    assert {"charset": "utf-8"} in metas
    assert {"name": "viewport", "content": "width=device-width, initial-scale=1"} in metas
    assert_inert(page, body)
    assert CONTENT_TYPE == "text/html; charset=utf-8"


@pytest.mark.parametrize(
    "field", ["client_name", "client_id", "verified_host", "redirect_host", "backend", "resource", "user"]
)
def test_hostile_values_stay_text(field: str) -> None:
    body = consent_page(a_view(**{field: HOSTILE}))
    page = Page(body)
    assert HOSTILE in page.bdi  # shown exactly as written, as text
    assert_inert(page, body)
    assert len(page.all("form")) == 1 and len(page.all("input")) == 1 and len(page.all("button")) == 2


def test_hostile_scope_and_csrf_token_stay_text() -> None:
    token = CSRF + '"><input name="decision" value="approve'
    body = consent_page(a_view(scopes=(HOSTILE,), csrf_token=token))
    page = Page(body)
    assert HOSTILE in page.bdi
    assert [element.attrs for element in page.all("input")] == [{"type": "hidden", "name": "csrf", "value": token}]
    assert_inert(page, body)


def test_look_alike_name_is_shown_as_written_and_marked_unverified() -> None:
    page = Page(consent_page(a_view(client_name=LOOK_ALIKE)))
    assert LOOK_ALIKE in page.bdi
    assert "Claude Code" not in page.text
    assert "unverified name" in page.text


def test_name_from_a_verified_metadata_document_is_not_marked_unverified() -> None:
    view = a_view(
        client_name="Claude Code",
        client_id="https://claude.ai/oauth/claude-code-client-metadata",
        verified_host="claude.ai",
    )
    page = Page(consent_page(view))
    assert "Claude Code" in page.bdi and "claude.ai" in page.bdi
    assert "unverified" not in page.text
    assert "verified" in page.text


def test_registered_client_without_a_name_shows_its_id() -> None:
    page = Page(consent_page(a_view(client_name=None)))
    assert "no name" in page.text
    assert "tZ3b9YF0f6Oq5-registered-client" in page.bdi


def test_absurdly_long_name_is_cut_with_an_ellipsis() -> None:
    name = "Claude Code " + "x" * 5000
    page = Page(consent_page(a_view(client_name=name)))
    (shown,) = [text for text in page.bdi if text.startswith("Claude Code ")]
    assert len(shown) == MAX_NAME_LENGTH
    assert shown.endswith("…") and name.startswith(shown[:-1])
    assert "x" * 200 not in page.text


def test_control_and_direction_characters_cannot_escape_the_name() -> None:
    """A right-to-left override stays inside its `<bdi>`; control characters are replaced, not sent."""
    name = "evil\u202e\x1b[31m\x00edoC edualC"
    body = consent_page(a_view(client_name=name))
    page = Page(body)
    assert "evil\u202e\ufffd[31m\ufffdedoC edualC" in page.bdi
    assert b"\x1b" not in body and b"\x00" not in body


def test_no_scopes_says_so() -> None:
    page = Page(consent_page(a_view(scopes=())))
    assert not page.all("ul")
    assert "none beyond signing you in" in page.text


# ---------------------------------------------------------------- the error page


def test_error_page_escapes_title_and_message() -> None:
    body = error_page(HOSTILE, "redirect_uri " + HOSTILE + " is not registered")
    page = Page(body)
    assert page.title == HOSTILE
    assert HOSTILE in page.text and "is not registered" in page.text
    assert not page.all("form")
    assert_inert(page, body)


# ---------------------------------------------------------------- headers


def test_headers_forbid_scripts_frames_caching_and_sniffing() -> None:
    policy = {
        directive.split()[0]: directive.split()[1:]
        for directive in (part.strip() for part in HTML_HEADERS["Content-Security-Policy"].split(";"))
    }
    assert policy == {
        "default-src": ["'none'"],
        "style-src": ["'unsafe-inline'"],
        "frame-ancestors": ["'none'"],
        "base-uri": ["'none'"],
    }
    # No form-action: Chrome would apply it to the redirect to the client's loopback or custom-scheme URI.
    assert "form-action" not in HTML_HEADERS["Content-Security-Policy"]
    assert HTML_HEADERS["X-Frame-Options"] == "DENY"
    assert HTML_HEADERS["Cache-Control"] == "no-store"
    assert HTML_HEADERS["Pragma"] == "no-cache"
    assert HTML_HEADERS["Referrer-Policy"] == "same-origin"
    assert HTML_HEADERS["X-Content-Type-Options"] == "nosniff"
    assert "Content-Type" not in HTML_HEADERS  # the answer's content type is CONTENT_TYPE
    with pytest.raises(TypeError):
        HTML_HEADERS["X-Frame-Options"] = "SAMEORIGIN"  # type: ignore[index]

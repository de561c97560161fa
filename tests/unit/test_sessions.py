"""mcp/sessions.py: a session id continues only the conversation of the principal that started it."""

from __future__ import annotations

import pytest

from okta_agent_proxy.mcp.sessions import SessionBindings, SessionNotFound, SessionOwner

ALICE = SessionOwner("https://idp/oauth2/x", "alice@example.com", "cursor")
BOB = SessionOwner("https://idp/oauth2/x", "bob@example.com", "cursor")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_owner_continues_other_principal_gets_404() -> None:
    bindings = SessionBindings()
    bindings.bind("s1", ALICE)
    bindings.check("s1", ALICE)
    with pytest.raises(SessionNotFound) as caught:
        bindings.check("s1", BOB)
    assert caught.value.status == 404
    bindings.check("s1", ALICE)


def test_same_user_through_another_agent_is_another_principal() -> None:
    bindings = SessionBindings()
    bindings.bind("s1", ALICE)
    with pytest.raises(SessionNotFound):
        bindings.check("s1", SessionOwner(ALICE.issuer, ALICE.subject, "claude-code"))


def test_unknown_session_is_404() -> None:
    with pytest.raises(SessionNotFound):
        SessionBindings().check("never-issued", ALICE)


def test_rebinding_to_another_owner_is_ignored() -> None:
    bindings = SessionBindings()
    bindings.bind("s1", ALICE)
    bindings.bind("s1", BOB)
    with pytest.raises(SessionNotFound):
        bindings.check("s1", BOB)


def test_drop_and_idle_expiry() -> None:
    clock = Clock()
    bindings = SessionBindings(idle_seconds=60, clock=clock)
    bindings.bind("s1", ALICE)
    bindings.bind("s2", ALICE)
    bindings.drop("s1")
    with pytest.raises(SessionNotFound):
        bindings.check("s1", ALICE)
    clock.now += 59
    bindings.check("s2", ALICE)  # use refreshes the idle timer
    clock.now += 59
    bindings.check("s2", ALICE)
    clock.now += 61
    with pytest.raises(SessionNotFound):
        bindings.check("s2", ALICE)


def test_bounded() -> None:
    bindings = SessionBindings(max_sessions=2)
    for name in ("a", "b", "c"):
        bindings.bind(name, ALICE)
    with pytest.raises(SessionNotFound):
        bindings.check("a", ALICE)
    bindings.check("c", ALICE)

"""mcp/sessions.py: a sealed session id opens only for the backend and the principal it was sealed for."""

from __future__ import annotations

import base64
import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from okta_agent_proxy.config.settings import Settings
from okta_agent_proxy.errors import SessionNotFound
from okta_agent_proxy.mcp.sessions import (
    KEY_FILE,
    NOBODY,
    PREFIX,
    SessionOwner,
    SessionSeal,
    derive_key,
    session_keys,
)
from okta_agent_proxy.sealing import generated_key

ALICE = SessionOwner("https://idp/oauth2/x", "00u-alice", "cursor")
BOB = SessionOwner("https://idp/oauth2/x", "00u-bob", "cursor")
ALICE_VIA_CLAUDE = SessionOwner("https://idp/oauth2/x", "00u-alice", "claude-code")
SECRET = "a-session-secret-of-at-least-32-bytes!"
OTHER_SECRET = "another-session-secret-of-32-bytes-or-more"


def seal() -> SessionSeal:
    return SessionSeal([derive_key(SECRET)])


def test_the_owner_gets_the_backends_own_id_back() -> None:
    sealer = seal()
    sealed = sealer.seal("employees", "backend-session-1", ALICE)
    assert sealed.startswith(PREFIX) and "backend-session-1" not in sealed
    assert sealer.open(sealed, "employees", ALICE) == "backend-session-1"
    assert SessionSeal([derive_key(SECRET)]).open(sealed, "employees", ALICE) == "backend-session-1"  # any replica


@pytest.mark.parametrize(
    ("backend", "owner"), [("employees", BOB), ("employees", ALICE_VIA_CLAUDE), ("partners", ALICE)]
)
def test_another_principal_or_backend_gets_404(backend: str, owner: SessionOwner) -> None:
    sealer = seal()
    sealed = sealer.seal("employees", "backend-session-1", ALICE)
    with pytest.raises(SessionNotFound) as caught:
        sealer.open(sealed, backend, owner)
    assert (caught.value.status, caught.value.code) == (404, "session_not_found")


def _altered(sealed: str) -> str:
    body = sealed[len(PREFIX) :]
    raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    raw[-1] ^= 1
    return PREFIX + base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "mangle",
    [
        lambda s: s[:-5],  # truncated
        _altered,  # one bit of the tag flipped
        lambda s: s.replace(PREFIX, "oap2."),  # another format
        lambda s: s[len(PREFIX) :],  # no prefix
        lambda s: PREFIX + "!!!not-base64!!!",
        lambda s: PREFIX,
        lambda s: "backend-session-1",  # the raw id itself
        lambda s: s + "A" * 5000,  # oversized
    ],
)
def test_an_id_that_does_not_open_gets_404(mangle: object) -> None:
    sealer = seal()
    sealed = sealer.seal("employees", "backend-session-1", ALICE)
    with pytest.raises(SessionNotFound):
        sealer.open(mangle(sealed), "employees", ALICE)  # type: ignore[operator]


def test_seals_differ_each_time_and_hide_the_id() -> None:
    sealer = seal()
    first, second = sealer.seal("b", "same", ALICE), sealer.seal("b", "same", ALICE)
    assert first != second  # a fresh nonce each time


def test_rotation_previous_key_opens_until_removed() -> None:
    old = SessionSeal([derive_key(OTHER_SECRET)]).seal("employees", "s-1", ALICE)
    rotating = SessionSeal([derive_key(SECRET), derive_key(OTHER_SECRET)])
    assert rotating.open(old, "employees", ALICE) == "s-1"
    new = rotating.seal("employees", "s-2", ALICE)
    assert seal().open(new, "employees", ALICE) == "s-2"  # sealed with the new key
    with pytest.raises(SessionNotFound):
        seal().open(old, "employees", ALICE)  # the previous key removed


def test_without_an_issuer_ids_are_sealed_to_the_backend_alone() -> None:
    sealer = seal()
    sealed = sealer.seal("employees", "s-1", NOBODY)
    assert sealer.open(sealed, "employees", NOBODY) == "s-1"
    with pytest.raises(SessionNotFound):
        sealer.open(sealed, "partners", NOBODY)


def test_keys_from_settings(tmp_path: Path) -> None:
    from pydantic import SecretStr

    with_secret = Settings(SESSION_SECRET=SecretStr(SECRET), DATA_DIR=str(tmp_path))
    assert session_keys(with_secret) == [derive_key(SECRET)]
    assert not (tmp_path / KEY_FILE).exists()
    rotating = Settings(
        SESSION_SECRET=SecretStr(SECRET), SESSION_SECRET_PREVIOUS=SecretStr(OTHER_SECRET), DATA_DIR=str(tmp_path)
    )
    assert session_keys(rotating) == [derive_key(SECRET), derive_key(OTHER_SECRET)]
    generated = session_keys(Settings(DATA_DIR=str(tmp_path / "data")))
    assert generated == session_keys(Settings(DATA_DIR=str(tmp_path / "data")))  # made once, then read
    key_file = tmp_path / "data" / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(generated[0]) == 32
    with pytest.raises(ValueError, match="at least 32 bytes"):
        Settings(SESSION_SECRET=SecretStr("too short"))


def _make_key(path: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    queue.put(generated_key(Path(path)).hex())


def test_processes_starting_together_share_one_generated_key(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue = context.Queue()  # type: ignore[type-arg]
    path = str(tmp_path / "shared" / KEY_FILE)
    processes = [context.Process(target=_make_key, args=(path, queue)) for _ in range(4)]
    for process in processes:
        process.start()
    keys = {queue.get(timeout=30) for _ in processes}
    for process in processes:
        process.join(30)
    assert len(keys) == 1 and not [p for p in os.listdir(tmp_path / "shared") if p != KEY_FILE]


def test_a_damaged_key_file_is_an_error_not_a_new_key(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_text("not a key\n")
    with pytest.raises(ValueError, match="32-byte key"):
        generated_key(tmp_path / KEY_FILE)

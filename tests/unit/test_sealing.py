"""`sealing.Sealer`: what opens and what does not."""

from __future__ import annotations

from okta_agent_proxy.sealing import NONCE_BYTES, Sealer, derive_key

OLD, NEW = derive_key(b"old secret", b"purpose"), derive_key(b"new secret", b"purpose")


def test_a_sealed_blob_opens_only_for_its_aad_and_keys() -> None:
    sealed = Sealer([NEW]).seal(b"plain", b"here")
    assert Sealer([NEW]).open(sealed, b"here") == b"plain"
    assert Sealer([NEW]).open(sealed, b"elsewhere") is None
    assert Sealer([OLD]).open(sealed, b"here") is None
    assert Sealer([NEW]).open(sealed[:-1], b"here") is None
    assert Sealer([NEW]).open(sealed[: NONCE_BYTES - 1], b"here") is None
    assert Sealer([NEW]).open(b"", b"here") is None
    altered = bytearray(sealed)
    altered[NONCE_BYTES] ^= 1
    assert Sealer([NEW]).open(bytes(altered), b"here") is None


def test_the_first_key_seals_and_every_key_opens() -> None:
    rotating = Sealer([NEW, OLD])
    assert rotating.open(Sealer([OLD]).seal(b"before", b"a"), b"a") == b"before"
    assert Sealer([NEW]).open(rotating.seal(b"after", b"a"), b"a") == b"after"


def test_purposes_never_share_a_key_and_nonces_are_fresh() -> None:
    assert derive_key(b"secret", b"one") != derive_key(b"secret", b"two")
    sealer = Sealer([NEW])
    assert sealer.seal(b"same", b"a") != sealer.seal(b"same", b"a")

"""`okta-agent-proxy keys generate`: what it prints loads as the agent's key, with the kid it tells Okta."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from okta_agent_proxy.commands.keys import PUBLIC_JWK_HEADER, keys_group
from okta_agent_proxy.config.loader import ConfigError, LoadedConfig, load


def generate(*args: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(the YAML snippet, the public JWK, the whole output)."""
    result = CliRunner().invoke(keys_group, ["generate", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    snippet, _, rest = result.output.partition(PUBLIC_JWK_HEADER)
    jwk_text = rest.split("\n", 1)[1]
    return yaml.safe_load(snippet), json.loads(jwk_text), result.output


def load_agent(tmp_path: Path, name: str, entry: dict[str, Any]) -> LoadedConfig:
    config = {"agents": {name: {"client_id": "wlp_test_agent", **entry}}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env_file = tmp_path / "test.env"
    env_file.write_text(f"CONFIG_PATH={path}\n")
    return load(path, environ={}, env_file=str(env_file))


def test_printed_private_key_loads_with_the_printed_kid(tmp_path: Path) -> None:
    snippet, jwk, _ = generate("--agent", "cursor")
    assert list(snippet) == ["cursor"]
    assert snippet["cursor"]["private_key"].startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8
    loaded = load_agent(tmp_path, "cursor", snippet["cursor"])
    key = loaded.config.agents["cursor"].private_key
    assert key is not None
    assert key.kid == jwk["kid"]
    assert key.public_jwk() == jwk
    assert (jwk["kty"], jwk["alg"], jwk["use"]) == ("RSA", "RS256", "sig")
    assert "d" not in jwk and "p" not in jwk
    assert len(jwk["n"]) >= 342  # 2048 bits, base64url


def test_custom_kid_is_published_and_configured(tmp_path: Path) -> None:
    snippet, jwk, _ = generate("--agent", "cursor", "--kid", "cursor-2026-01")
    assert jwk["kid"] == "cursor-2026-01"
    assert snippet["cursor"]["key_id"] == "cursor-2026-01"
    key = load_agent(tmp_path, "cursor", snippet["cursor"]).config.agents["cursor"].private_key
    assert key is not None and key.kid == "cursor-2026-01"


def test_out_writes_a_0600_file_referenced_from_the_yaml(tmp_path: Path) -> None:
    out = tmp_path / "keys" / "cursor.pem"
    out.parent.mkdir()
    snippet, jwk, output = generate("--agent", "cursor", "--out", str(out))
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert "PRIVATE KEY-----" not in output  # the key itself is only in the file
    assert snippet["cursor"]["private_key"] == {"file": str(out.resolve())}
    loaded = load_agent(tmp_path, "cursor", snippet["cursor"])
    key = loaded.config.agents["cursor"].private_key
    assert key is not None and key.kid == jwk["kid"]
    assert not [w for w in loaded.warnings if "private_key" in w.path]  # a file reference is no literal secret


def test_out_never_replaces_an_existing_file(tmp_path: Path) -> None:
    out = tmp_path / "cursor.pem"
    out.write_text("keep me")
    result = CliRunner().invoke(keys_group, ["generate", "--agent", "cursor", "--out", str(out)])
    assert result.exit_code != 0
    assert out.read_text() == "keep me"


def test_each_run_makes_a_new_key() -> None:
    assert generate("--agent", "a")[1]["kid"] != generate("--agent", "a")[1]["kid"]


def _instructions(output: str) -> str:
    return "\n".join(line for line in output.splitlines() if line.startswith("#"))


def test_pasting_a_second_entry_for_an_existing_agent_is_refused_and_the_printed_way_works(tmp_path: Path) -> None:
    """The output's own advice: a new `cursor:` beside the existing one is a duplicate key (never a silently
    dropped key); replacing the existing entry's private_key, and deleting its old key_id, loads the new key."""
    _, old_jwk, _ = generate("--agent", "cursor", "--kid", "old-kid")
    snippet, jwk, output = generate("--agent", "cursor")
    existing = {"client_id": "wlp_test_agent", "private_key": "${OLD_KEY}", "key_id": "old-kid"}
    pasted = yaml.safe_dump({"agents": {"cursor": existing}}) + "".join(
        f"  {line}\n" for line in output.partition(PUBLIC_JWK_HEADER)[0].splitlines() if line.strip()
    )
    path = tmp_path / "config.yaml"
    path.write_text(pasted)
    with pytest.raises(ConfigError) as refused:
        load(path, environ={"OLD_KEY": "unused"}, env_file=None)
    duplicate = [p for p in refused.value.problems if p.path == "agents.cursor" and p.severity == "error"]
    assert len(duplicate) == 1, [str(p) for p in refused.value.problems]

    advice = _instructions(output)
    assert "agents.cursor.private_key" in advice and "agents.cursor.key_id" in advice
    replaced = {k: v for k, v in existing.items() if k != "key_id"} | {"private_key": snippet["cursor"]["private_key"]}
    key = load_agent(tmp_path, "cursor", replaced).config.agents["cursor"].private_key
    assert key is not None and key.kid == jwk["kid"] != old_jwk["kid"]


def test_with_a_kid_the_advice_for_an_existing_agent_replaces_its_key_id_too(tmp_path: Path) -> None:
    snippet, jwk, output = generate("--agent", "cursor", "--kid", "cursor-2026-02")
    assert "agents.cursor.key_id" in _instructions(output)
    existing = {"client_id": "wlp_test_agent", "key_id": "cursor-2026-01"}
    key = load_agent(tmp_path, "cursor", existing | snippet["cursor"]).config.agents["cursor"].private_key
    assert key is not None and key.kid == jwk["kid"] == "cursor-2026-02"

"""What a config reload logs as changed (okta_agent_proxy.reload.changed_names): names only, never values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from okta_agent_proxy.config.models import GatewayConfig
from okta_agent_proxy.reload import changed_names
from tests.unit.helpers import ec_key, load_config, pem, private_jwk, rsa_key, write_yaml

ENVIRON = {"PSK": "partner-key-1", "CURSOR_KEY": pem(rsa_key())}


def document() -> dict[str, Any]:
    psk = {"auth_method": "pre-shared-key", "auth_config": {"key": "${PSK}"}}
    return {
        "backends": {
            "partners": {"url": "http://partners.internal/mcp", "paths": ["/partners"], **psk},
            "reports": {"url": "http://reports.internal/mcp", "paths": ["/reports"], **psk},
        },
        "agents": {
            "cursor": {"client_id": "0oa_cursor", "private_key": "${CURSOR_KEY}", "backend_access": ["partners"]},
            "claude-code": {"client_id": "0oa_claude", "backend_access": ["reports"]},
        },
        "audit": {"when_full": "drop"},
    }


def loaded(tmp_path: Path, doc: dict[str, Any], environ: dict[str, str] = ENVIRON) -> GatewayConfig:
    return load_config(write_yaml(tmp_path, doc), environ).config


def test_the_same_file_loaded_twice_changes_nothing(tmp_path: Path) -> None:
    """A signing key loads as a new object each time; it is compared by what it is, not by identity."""
    changes = changed_names(loaded(tmp_path, document()), loaded(tmp_path, document()))
    assert changes == {
        "backends_added": [],
        "backends_removed": [],
        "backends_changed": [],
        "agents_added": [],
        "agents_removed": [],
        "agents_changed": [],
        "audit_changed": False,
        "rate_limits_changed": False,
        "front_door_changed": False,
    }


def test_added_removed_and_changed_are_named(tmp_path: Path) -> None:
    before = loaded(tmp_path, document())
    doc = document()
    doc["backends"]["billing"] = {**doc["backends"].pop("reports"), "paths": ["/billing"]}
    doc["backends"]["partners"]["timeout_seconds"] = 5
    doc["agents"]["claude-code"]["backend_access"] = ["billing"]
    doc["agents"]["windsurf"] = {"client_id": "0oa_windsurf"}
    del doc["agents"]["cursor"]
    doc["audit"]["when_full"] = "block"
    doc["front_door"] = {"default_scopes": ["mcp:read", "mcp:write"]}
    changes = changed_names(before, loaded(tmp_path, doc))
    assert changes == {
        "backends_added": ["billing"],
        "backends_removed": ["reports"],
        "backends_changed": ["partners"],
        "agents_added": ["windsurf"],
        "agents_removed": ["cursor"],
        "agents_changed": ["claude-code"],
        "audit_changed": True,
        "rate_limits_changed": False,
        "front_door_changed": True,
    }


def test_a_rotated_secret_or_key_is_a_change_of_its_owner_and_no_value_is_named(tmp_path: Path) -> None:
    before = loaded(tmp_path, document())
    rotated = {"PSK": "partner-key-2", "CURSOR_KEY": json.dumps(private_jwk(ec_key()))}
    changes = changed_names(before, loaded(tmp_path, document(), rotated))
    assert changes["backends_changed"] == ["partners", "reports"]
    assert changes["agents_changed"] == ["cursor"]
    text = json.dumps(changes)
    assert "partner-key" not in text and "PRIVATE KEY" not in text

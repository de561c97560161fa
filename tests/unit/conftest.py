"""Unit tests run against a clean environment: no gateway variable leaks in from the shell, no stray `.env`.

The one variable set is OKTA_ISSUER (a custom authorization server, as in a real deployment), so that tests about
the YAML see no environment warning; tests about an unset issuer remove it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from okta_agent_proxy.config.settings import Settings

TEST_ISSUER = "https://example.okta.com/oauth2/aus-test"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OKTA_ISSUER", TEST_ISSUER)
    monkeypatch.chdir(tmp_path)

"""The README's configuration reference is exactly what the models generate (so it cannot drift from the code)."""

from __future__ import annotations

from pathlib import Path

from okta_agent_proxy.config.models import AuditConfig, BackendCommon, CrossAppAuth
from okta_agent_proxy.config.reference import reference_markdown
from okta_agent_proxy.config.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_reference_is_generated_from_the_models() -> None:
    text = README.read_text(encoding="utf-8")
    start = text.index("<!-- config-reference:start -->\n") + len("<!-- config-reference:start -->\n")
    end = text.index("<!-- config-reference:end -->")
    assert text[start:end] == reference_markdown(), "run `okta-agent-proxy config-schema --markdown` into README.md"


def test_every_setting_and_key_is_listed() -> None:
    reference = reference_markdown()
    for name in Settings.model_fields:
        assert f"| `{name}` |" in reference
    for model in (BackendCommon, CrossAppAuth, AuditConfig):
        for name in model.model_fields:
            assert f"| `{name}` |" in reference
